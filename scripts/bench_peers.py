"""Side by side: this package and kronfluence 1.0.1 fitting EK-FAC and scoring 16 queries, in one run.

The engine benchmark's set-up (scripts/bench_engine.py): its Llama built in code (float32), Python's
documentation as bytes packed into N sequences of T = 128, the 12 MLP linears tracked, damping
0.1 × mean(Λ) per layer (both packages' heuristic), 16 held-out prompt/completion queries. Each
stage of each package runs between two timed training epochs (forward + backward + AdamW over the
same N sequences) and is reported as a ratio to their mean; the packages take turns, repeat after
repeat, so that both see the same machine. Beside wall time it reports the ratio of this process's CPU
time (one torch thread by default), steadier than wall time on a machine that others share. The
scores of the two packages are compared (Pearson).

    python scripts/bench_peers.py                          # N=256, 2 rounds: 8-12 minutes on 2 shared CPU cores
    python scripts/bench_peers.py --sequences 512
    python scripts/bench_peers.py --sequences 3072 --repeats 1   # about 15 minutes
    python scripts/bench_peers.py --quick                  # smoke test
    python scripts/bench_peers.py --no-kronfluence         # this package only

kronfluence is never a dependency of this package: the first run makes its own virtual environment
(`--venv`, default .venv-peers; `python -m venv --system-site-packages`, plus a .pth file naming the
running environment's site-packages, so that it reuses this environment's torch and transformers)
and installs `kronfluence==1.0.1` there with --no-deps, with einconv and opt-einsum, then runs again
under that environment's python. If the install fails, kronfluence is skipped and the reason printed.

Conventions aligned: kronfluence's score is ∇m_qᵀ (G + λ)⁻¹ ∇L(z_n) with m_q its measurement; its
measurement here is the completion's loss −log p(c | p) = −f, so its score equals this package's
∇fᵀ (G + λ)⁻¹ ∇log p(z_n) (positive = helpful) with the same sign. Both sum the loss over tokens.
The label draws of the Fisher differ (each package its own random stream), so the scores agree
closely but not exactly.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KRONFLUENCE = "kronfluence==1.0.1"
_REEXEC = "EKFAC_BENCH_PEERS_VENV"


# ----------------------------------------------------------------------------- kronfluence's environment


def ensure_kronfluence(venv: Path) -> str | None:
    """Re-run this script under a venv holding kronfluence; returns why not when it cannot (then we go on)."""
    if importlib.util.find_spec("kronfluence") is not None:
        return None
    if os.environ.get(_REEXEC):
        return "kronfluence is not importable even in its own venv"
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
            target = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                                    capture_output=True, text=True).stdout.strip()
            import site

            Path(target, "reuse-parent-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        if subprocess.run([str(python), "-c", "import kronfluence"], capture_output=True).returncode != 0:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", KRONFLUENCE, "einconv", "opt-einsum",
                            "einops"], check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"could not install {KRONFLUENCE} into {venv}: {error}"
    env = dict(os.environ, **{_REEXEC: "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.execve(str(python), [str(python), __file__, *sys.argv[1:]], env)
    return None  # not reached


def kronfluence_runner(model, train: list[dict], queries: list[dict], tracked: list[str], batch_size: int,
                       query_batch_size: int, workdir: str):
    """(fit(), score() -> scores_QN) of kronfluence 1.0.1 on a copy of the model (it wraps the tracked modules)."""
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class CausalLM(Task):
        """Summed token losses; labels −100 are not predicted (the prompt of a query)."""

        def _logits_labels(self, batch, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            return logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)

        def compute_train_loss(self, batch, model, sample=False):
            logits, labels = self._logits_labels(batch, model)
            if sample:  # labels from the model's own distribution (true Fisher), as this package's fit
                with torch.no_grad():
                    drawn = torch.multinomial(logits.softmax(-1), 1).flatten()
                labels = drawn.masked_fill(labels == -100, -100)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):  # the completion's loss −log p(c | p) = −f
            logits, labels = self._logits_labels(batch, model)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, batches):
            self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    task = CausalLM()
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer("bench_peers", wrapped, task, cpu=True, disable_tqdm=True, disable_model_save=True,
                        output_dir=workdir)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    train_set, query_set = Rows(train), Rows(queries)

    def fit():
        analyzer.fit_all_factors("ekfac", train_set, per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)

    def score():
        analyzer.compute_pairwise_scores("scores", "ekfac", query_set, train_set,
                                         per_device_query_batch_size=query_batch_size,
                                         per_device_train_batch_size=batch_size,
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"].double()

    return fit, score


# ----------------------------------------------------------------------------- the run


def pearson(x, y) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=256, help="N training sequences (default 256)")
    parser.add_argument("--length", type=int, default=128, help="T tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="training sequences per batch (default 8)")
    parser.add_argument("--queries", type=int, default=16, help="Q queries, scored in one batch (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every stage (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-peers", help="kronfluence's venv (default .venv-peers)")
    parser.add_argument("--no-kronfluence", action="store_true", help="time this package only")
    parser.add_argument("--quick", action="store_true", help="N=32, T=64, one round: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.length, args.repeats = 32, 64, 1
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp.GradScaler on a CPU
    skipped = "--no-kronfluence" if args.no_kronfluence else ensure_kronfluence(args.venv)
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch

    import ekfac_influence as ei
    from bench_engine import Bench, Measurement, package_version, pydoc_bytes, query_batches, tiny_llama, train_batches, \
        train_epoch
    from ekfac_influence.model import select_layers

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    ids = pydoc_bytes()
    train = train_batches(ids, args.sequences, args.length, args.batch_size)
    queries = query_batches(ids, args.sequences * args.length, args.queries, 64, 32, args.queries)
    model = tiny_llama(128, 512, 4, 4, "sdpa").eval()
    objective = ei.CausalLMObjective()
    factor_config = ei.FactorConfig(strategy="ekfac")  # damping_factor 0.1: λ = 0.1 × mean(Λ) per layer
    tracked = [layer.name for layer in select_layers(model, factor_config.layers)]
    trainee = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4)

    fitted = {}  # the factors of the last timed fit, which the next scoring uses

    def ours_fit(batches=train):
        fitted["factors"] = ei.fit_factors(model, batches, objective, factor_config, show_progress=False)

    stages = {"fit (this package)": ours_fit, "score Q=%d (this package)" % args.queries: lambda: ei.compute_scores(
        model, fitted["factors"], queries, train, objective, ei.ScoreConfig(), show_progress=False).scores}
    workdir = tempfile.mkdtemp(prefix="bench_peers_")
    warm_up = [lambda: ours_fit(train[:2]), stages["score Q=%d (this package)" % args.queries]]
    if skipped is None:
        kron_fit, kron_score = kronfluence_runner(model, train, queries, tracked, args.batch_size, args.queries, workdir)
        stages["fit (kronfluence 1.0.1)"] = kron_fit
        stages["score Q=%d (kronfluence 1.0.1)" % args.queries] = kron_score
        small_fit, small_score = kronfluence_runner(model, train[:2], queries, tracked, args.batch_size, args.queries,
                                                    tempfile.mkdtemp(prefix="bench_peers_warm_up_"))
        warm_up += [small_fit, small_score]
    for fn in warm_up:  # kernels, allocator, lazy imports: on two batches
        fn()
    print("## Peers benchmark (scripts/bench_peers.py)\n")
    print(f"- {time.strftime('%Y-%m-%d %H:%M')}; {package_version()}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPU cores; kronfluence: "
          f"{'1.0.1' if skipped is None else 'skipped: ' + skipped}")
    print(f"- N={args.sequences} × T={args.length}, batches of {args.batch_size}; Q={args.queries} queries "
          f"(64-byte prompt + 32-byte completion); tracked: {len(tracked)} MLP linears; {args.repeats} round(s)")
    print(f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    train_epoch(trainee, optimizer, train[:2])
    cpu: list[float] = []  # this process's CPU seconds of each timed call, in order

    def on_cpu(fn):
        def run():
            start = time.process_time()
            result = fn()
            cpu.append(time.process_time() - start)
            return result
        return run

    bench = Bench(on_cpu(lambda: train_epoch(trainee, optimizer, train)), device, retries=0)
    bench.epoch()
    ratios = {name: [] for name in stages}
    cpu_ratios = {name: [] for name in stages}
    seconds = {name: [] for name in stages}
    others = {name: [] for name in stages}
    results = {}
    for _ in range(args.repeats):
        for name, fn in stages.items():  # the packages take turns
            m, results[name] = bench.stage(on_cpu(fn), 1)
            ratios[name] += m.ratios
            cpu_ratios[name].append(cpu[-2] / ((cpu[-3] + cpu[-1]) / 2))  # epoch before, stage, epoch after
            seconds[name].append(m.seconds)
            others[name].append(m.others or 0.0)
    unit = bench.unit()
    print(f"- epochs: {' '.join(f'{t.seconds:.2f}' for t in bench.epochs)} s (median {unit.seconds:.2f} s)")
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| stage | seconds | × epoch (median) | ratios | CPU time × epoch CPU time (median) | ratios | other load (max) |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: |")
    for name in stages:
        m = Measurement(statistics.median(seconds[name]), ratios[name], max(others[name]))
        print(f"| {name} | {m.seconds:.2f} | {m.ratio:.2f} | {' '.join(f'{r:.2f}' for r in m.ratios)} | "
              f"{statistics.median(cpu_ratios[name]):.2f} | {' '.join(f'{r:.2f}' for r in cpu_ratios[name])} | "
              f"{100 * m.others:.0f}% |")
    print("\nCPU time: this process's user + system seconds (time.process_time), which other processes on the machine "
          "disturb far less than wall time when the machine is shared.")
    if skipped is None:
        ours = results["score Q=%d (this package)" % args.queries]
        theirs = results["score Q=%d (kronfluence 1.0.1)" % args.queries]
        per_query = [pearson(a, b) for a, b in zip(ours, theirs)]
        print(f"\nscores agree: Pearson {pearson(ours, theirs):.4f} over all {ours.numel()} (query, sequence) pairs; "
              f"per query min {min(per_query):.4f}, median {statistics.median(per_query):.4f}; "
              f"ratio of norms (ours / kronfluence) {float(ours.double().norm() / theirs.norm()):.4f}")


if __name__ == "__main__":
    main()
