"""Accuracy you can measure: LDS and planted-fact recall per strategy on the digits MLP and on the demo's LM.

digits: scikit-learn's digits, a 64 → 24 → 10 tanh MLP (1,810 parameters, float64) trained on 1,000
digits to convergence: full-batch L-BFGS (500 iterations) on mean cross-entropy + (l2/2)‖θ‖², l2 = 1e-3,
so that the Hessian of the training objective is about G + l2·I and damping λ = l2 is the theory's.
Every retraining starts from the same initialisation (seed 0; seed 1 for the second retraining seed).
f_q = log p(y_q | x_q) on 50 held-out digits. Planted "facts": 30 held-out digits given invented labels
(the true label plus 1..9, mod 10) are added to the training set and the model is trained on, from its
own weights (500 more L-BFGS iterations); each is queried with a noisy copy of its image (+ N(0, 0.4²),
clipped to [0, 1]) and its invented label: does influence rank the planted digit first among the 1,030?
(With noise 0.05 every strategy finds all of them: recall@1 = 1.)

lm: the demo's LM at its --quick sizes (Llama-style, hidden 32, 2 layers, BPE vocabulary 512;
43,168 parameters) over 12 pydoc topics in 742 sequences of 64 tokens, trained for 8 epochs like the
full demo (AdamW 2e-3, one-cycle, batch 32); `ekfac_influence.evaluate.evaluate_lm` retrains it from
the same initialisation on each subset, measures f = log p(completion | prompt) on the demo's 4
questions and 32 held-out sequences, plants 16 invented facts and fine-tunes on them for one epoch.
The full-size demo LM (1.1M parameters, 79 topics) takes about 9 minutes per training on the shared
2-core machine this was measured on, so 30-40 minutes would hold only 4 retrained models.

    python scripts/bench_accuracy.py digits          # about 18 minutes on one shared core (200 retrainings)
    python scripts/bench_accuracy.py lm --subsets 128  # about 30 minutes on one core
    python scripts/bench_accuracy.py lm --measurements planted --planted-steps 240 --planted-lr 2e-3 \
        --out runs/accuracy-tuned                      # the facts learned harder
    python scripts/bench_accuracy.py all --quick     # a smoke run, about 2 minutes

Each writes runs/accuracy/<setting>/evaluation.{json,html} and prints the table. Retrained subsets are
cached there: a rerun resumes, and a rerun with another variant retrains nothing (--subsets raises M
and trains only the new subsets).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ekfac_influence.config import EvaluateConfig
from ekfac_influence.data import pack
from ekfac_influence.demo import QUERIES, DemoConfig, build_model, demo_documents, training
from ekfac_influence.evaluate import evaluate_lm
from ekfac_influence.lds import linear_datamodeling_score
from ekfac_influence.metrics import lds_per_query, mean_and_se
from ekfac_influence.objectives import ClassificationObjective
from ekfac_influence.planted import planted_recall
from ekfac_influence.query_inputs import Query
from ekfac_influence.scorecard import format_table, plain, write_evaluation
from ekfac_influence.train import train_lm, train_tokenizer
from ekfac_influence.variants import variant, variants_from_config

L2 = 1e-3
NOISE = 0.4  # of the planted digits' query copies: small noise makes every strategy find them (recall@1 = 1)
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "lissa", "exact")


# ----------------------------------------------------------------------------- digits


def digits_data(quick: bool):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)
    num_train = 300 if quick else 1000
    return X[:num_train], y[:num_train], X[1000:1050], y[1000:1050], X[1100:1130], y[1100:1130]


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).double()


def fit_lbfgs(model: nn.Module, X: torch.Tensor, y: torch.Tensor, iterations: int) -> nn.Module:
    """Full-batch L-BFGS on mean cross-entropy + (l2/2)‖θ‖²: converged, deterministic."""
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iterations, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y) + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model.eval()


def digits_variants() -> list:
    """Every strategy at λ = l2 (the training objective's own damping), and ekfac/exact at the default relative one."""
    fixed = [variant(s, name=f"{s} λ={L2:g}", damping=L2, factor_dtype="float64", compute_dtype="float64")
             for s in STRATEGIES]
    relative = [variant(s, name=f"{s} λ={f:g}·mean", damping_factor=f, factor_dtype="float64", compute_dtype="float64")
                for f, strategies in ((0.1, ("kfac", "ekfac", "exact")), (1.0, ("ekfac", "exact"))) for s in strategies]
    closer = [variant("ekfac", name=f"ekfac λ={L2:g} + {k} refinement steps", damping=L2, refine_steps=k,
                      refine_tolerance=0.0, factor_dtype="float64", compute_dtype="float64") for k in (1, 3, 10)]
    closer.append(variant("ekfac", name=f"ekfac λ={L2:g}, 4 label samples", damping=L2, label_samples=4,
                          factor_dtype="float64", compute_dtype="float64"))
    return fixed + relative + closer


def fit_adamw(model: nn.Module, X: torch.Tensor, y: torch.Tensor, keep_N: np.ndarray, epochs: int, seed: int):
    """Minibatch AdamW (3e-3, batch 64, mean cross-entropy, no regulariser): epoch e visits a permutation of all
    N digits drawn from `seed` and keeps those in the subset (the same order minus the removed ones)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator).numpy()
        order = order[keep_N[order]]
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(X[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def bench_digits(out: Path, quick: bool, subsets: int | None, measurements: tuple[str, ...] = ("lds", "planted"),
                 adamw_epochs: int | None = None) -> dict:
    """L-BFGS to convergence (the default), or minibatch AdamW for `adamw_epochs` epochs (LDS only)."""
    torch.set_num_threads(1)
    Xtr, ytr, Xq, yq, Xp, yp = digits_data(quick)
    iterations = 100 if quick else 500
    batches = [(Xtr[i : i + 100], ytr[i : i + 100]) for i in range(0, len(Xtr), 100)]
    queries = [(Xq, yq)]
    objective = ClassificationObjective()

    def train_fn(indices: np.ndarray, seed: int) -> nn.Module:
        if adamw_epochs is None:
            return fit_lbfgs(make_mlp(seed), Xtr[indices], ytr[indices], iterations)
        keep_N = np.zeros(len(Xtr), dtype=bool)
        keep_N[indices] = True
        return fit_adamw(make_mlp(seed), Xtr, ytr, keep_N, adamw_epochs, seed)

    trainer = f"L-BFGS to convergence (l2 = {L2})" if adamw_epochs is None else f"AdamW for {adamw_epochs} epochs"
    reference = train_fn(np.arange(len(Xtr)), 0)
    accuracy = float((reference(Xq).argmax(1) == yq).double().mean())
    train_accuracy = float((reference(Xtr).argmax(1) == ytr).double().mean())
    results = {"title": f"digits MLP: {len(Xtr)} training digits, {trainer}"}
    if "lds" in measurements:
        config = EvaluateConfig(num_subsets=subsets or (8 if quick else 100), retrain_seeds=2)
        started = time.time()
        lds = linear_datamodeling_score(reference, batches, queries, objective, train_fn, digits_variants(), config,
                                        cache_dir=out / "lds", cache_key=(f"digits lbfgs l2={L2} it={iterations}" if adamw_epochs is None
                                                   else f"digits adamw epochs={adamw_epochs}"))
        seed0 = {name: mean_and_se(lds_per_query(scores_QN, lds.subsets_MN, lds.f_MRQ[:, 0]))
                 for name, scores_QN in lds.scores.items()}
        results["lds"] = {**lds.to_dict(), "seed0_only": seed0, "query_accuracy": accuracy,
                          "train_accuracy": train_accuracy, "seconds": time.time() - started}
    if "planted" in measurements and adamw_epochs is None:
        results["planted"] = planted_digits(reference, Xtr, ytr, Xp, yp, iterations)
    return plain(results)


def planted_digits(reference: nn.Module, Xtr, ytr, Xp, yp, iterations: int) -> dict:
    """Held-out digits with invented labels added and trained on; queried by noisy copies with those labels."""
    objective = ClassificationObjective()
    rng = np.random.default_rng(0)
    y_planted = (yp + torch.from_numpy(rng.integers(1, 10, len(yp)))) % 10
    X_all, y_all = torch.cat([Xtr, Xp]), torch.cat([ytr, y_planted])
    tuned = make_mlp(0)
    tuned.load_state_dict(reference.state_dict())
    fit_lbfgs(tuned, X_all, y_all, iterations)
    noisy = (Xp + NOISE * torch.from_numpy(rng.standard_normal(tuple(Xp.shape)))).clamp(0, 1)
    planted = planted_recall(tuned, [(X_all[i : i + 100], y_all[i : i + 100]) for i in range(0, len(X_all), 100)],
                             [(noisy, y_planted)], objective, digits_variants(), [[len(Xtr) + i] for i in range(len(Xp))],
                             ks=(1, 10, 100), show_progress=False)
    learned = float((tuned(noisy).argmax(1) == y_planted).double().mean())
    return {**planted, "num_facts": len(Xp), "num_sequences": len(X_all), "fine_tune_steps": iterations,
            "planted_label_accuracy_on_noisy_copies": learned}


# ----------------------------------------------------------------------------- the demo's LM


def bench_lm(out: Path, quick: bool, subsets: int | None, measurements: tuple[str, ...] = ("lds", "planted"),
             planted_steps: int | None = None, planted_lr: float = 1e-3) -> dict:
    torch.set_num_threads(1)
    sizes = DemoConfig.quick()
    sizes = DemoConfig(vocab_size=sizes.vocab_size, hidden=sizes.hidden, layers=sizes.layers, topics=sizes.topics,
                       epochs=1 if quick else 8)
    documents = demo_documents(sizes)
    tokenizer = train_tokenizer([text for _, text in documents], sizes.vocab_size)
    corpus = pack(documents, tokenizer, length=64, separate_documents=True)
    model = build_model(sizes, len(tokenizer), 64)
    train_lm(model, corpus.tokens_NT, corpus.lengths_N, training(sizes))
    closer = ({"name": "ekfac, 4 label samples", "strategy": "ekfac", "label_samples": 4},
              *({"name": f"ekfac + {k} refinement steps", "strategy": "ekfac", "refine_steps": k, "refine_batches": 8,
                 "refine_tolerance": 0.0} for k in (3, 10)))
    config = EvaluateConfig(variants=("identity", "diagonal", "kfac", "ekfac", *closer), num_subsets=subsets or (4 if quick else 64),
                            heldout_queries=4 if quick else 32, epochs=sizes.epochs, batch_size=sizes.batch_size,
                            learning_rate=sizes.learning_rate, planted_facts=2 if quick else 16, shortlist_k=100,
                            measurements=measurements, planted_steps=planted_steps, planted_learning_rate=planted_lr)
    queries = [Query(prompt, completion, None, qid) for qid, prompt, completion, _ in QUERIES]
    return evaluate_lm(model, tokenizer, corpus, queries, variants_from_config(config.variants), config, out=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=("digits", "lm", "all"))
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--subsets", type=int, help="number of LDS subsets (default: 100 digits, 64 lm)")
    parser.add_argument("--out", default="runs/accuracy", help="results go to <out>/<setting>/")
    parser.add_argument("--measurements", default="lds,planted", help="lds, planted or both (comma-separated)")
    parser.add_argument("--adamw-epochs", type=int, help="digits: train by minibatch AdamW for this many epochs "
                                                         "instead of L-BFGS to convergence (LDS only)")
    parser.add_argument("--planted-steps", type=int, help="lm: fine-tuning steps on the planted corpus (default: one epoch)")
    parser.add_argument("--planted-lr", type=float, default=1e-3, help="lm: its peak learning rate")
    args = parser.parse_args()
    for setting in ("digits", "lm") if args.setting == "all" else (args.setting,):
        name = setting + (f"-adamw{args.adamw_epochs}" if setting == "digits" and args.adamw_epochs else "")
        out = Path(args.out) / (name + ("-quick" if args.quick else ""))
        started = time.time()
        if setting == "digits":
            results = bench_digits(out, args.quick, args.subsets, tuple(args.measurements.split(",")), args.adamw_epochs)
            write_evaluation(out, results)
            print(format_table(results))
            if "lds" in results:
                print("LDS with seed 0 only: " + ", ".join(f"{k} {v['mean']:.3f} ± {v['se']:.3f}"
                                                           for k, v in results["lds"]["seed0_only"].items()))
        else:
            bench_lm(out, args.quick, args.subsets, tuple(args.measurements.split(",")), args.planted_steps, args.planted_lr)
        print(f"{setting}: {time.time() - started:.0f} s; {out}/evaluation.json, {out}/evaluation.html")


if __name__ == "__main__":
    main()
