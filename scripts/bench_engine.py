"""Engine benchmark: EK-FAC fitting and scoring time, each as a ratio to one training epoch.

A tiny Llama (built in code, float32) on real text: Python's own documentation
(`pydoc_data.topics`), byte-level tokens (vocab 256), packed into N sequences of T tokens.
In the same run it times

    epoch        forward + backward + AdamW step over the N training sequences (the unit)
    fit          fit_factors(strategy="ekfac"), and its steps: covariances, eigh, eigenvalue correction
    score Q=...  compute_scores of the N sequences against Q held-out prompt/completion queries

and prints each stage's seconds, its ratio to the epoch and the aim it is held to (docs/benchmarks.md).

Run (about 3 minutes on 2 CPU cores; figures go into docs/benchmarks.md):

    python scripts/bench_engine.py                        # N=256, T=128
    python scripts/bench_engine.py --quick                # smoke test, under a minute
    python scripts/bench_engine.py --sequences 512 --length 128
    python scripts/bench_engine.py --profile              # also: where the time of fit and scoring goes
    python scripts/bench_engine.py --device cuda          # on a GPU

The epoch is timed before and after the engine stages (its median is the unit, its spread a sign of
other load on the machine: the ratios are only as good as that spread is small).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from dataclasses import dataclass

import torch

import ekfac_influence as ei
from ekfac_influence.factors import eigendecompose
from ekfac_influence.model import select_layers
from ekfac_influence.passes import evaluation_mode
from ekfac_influence.pipeline import collect_covariances, correct_eigenvalues

IGNORE_INDEX = -100

# Aims, in epochs (DESIGN issue: fitting within 3 epochs, 16 queries within 0.9, 128 at rank 32 within 1.2).
AIM_FIT, AIM_SCORE_16, AIM_SCORE_128_RANK_32 = 3.0, 0.9, 1.2


# ----------------------------------------------------------------------------- data and model


def pydoc_bytes() -> list[int]:
    """Byte-level tokens (vocab 256) of every topic of Python's documentation, in sorted-key order."""
    from pydoc_data.topics import topics

    return list("\n".join(topics[key] for key in sorted(topics)).encode("utf-8"))


def train_batches(ids: list[int], num_sequences: int, length: int, batch_size: int) -> list[dict]:
    """The first N·T tokens packed into N sequences of T; every token is real and predicted."""
    if num_sequences * length > len(ids):
        raise SystemExit(f"--sequences {num_sequences} × --length {length} exceeds the {len(ids)} tokens of the corpus")
    tokens_NT = torch.tensor(ids[: num_sequences * length]).view(num_sequences, length)
    return [{"input_ids": ids_BT, "attention_mask": torch.ones_like(ids_BT), "labels": ids_BT.clone()}
            for ids_BT in tokens_NT.split(batch_size)]


def query_batches(ids: list[int], start: int, num_queries: int, prompt: int, completion: int,
                  batch_size: int) -> list[dict]:
    """Held-out prompt/completion pairs from the text after the training tokens.

    Labels are −100 on the prompt: the measurement is f = log p(completion | prompt) (DESIGN §1).
    """
    width = prompt + completion
    if start + num_queries * width > len(ids):
        raise SystemExit("not enough held-out text for the queries; lower --sequences or --length")
    tokens_QT = torch.tensor(ids[start : start + num_queries * width]).view(num_queries, width)
    batches = []
    for ids_BT in tokens_QT.split(batch_size):
        labels_BT = ids_BT.clone()
        labels_BT[:, :prompt] = IGNORE_INDEX
        batches.append({"input_ids": ids_BT, "attention_mask": torch.ones_like(ids_BT), "labels": labels_BT})
    return batches


def tiny_llama(hidden: int, intermediate: int, layers: int, heads: int, attention: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=False, attn_implementation=attention)
    return LlamaForCausalLM(config).float()


def to_device(batches: list[dict], device: torch.device) -> list[dict]:
    return [{key: value.to(device) for key, value in batch.items()} for batch in batches]


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(all CPU ticks, busy ticks of the machine, ticks of this process) from /proc; None elsewhere than Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the command name: field 3 (state) is own[0]
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields)
    return total, total - fields[3] - fields[4], int(own[11]) + int(own[12])  # utime + stime


@dataclass
class Timing:
    seconds: float
    others: float | None  # share of the machine's CPU time used by other processes meanwhile (0-1)


def timed(fn, device: torch.device) -> tuple[Timing, object]:
    """(Timing, result) of fn(). `others` says how much other load may have slowed it down."""
    synchronize(device)
    before, start = _cpu_ticks(), time.perf_counter()
    result = fn()
    synchronize(device)
    seconds, after = time.perf_counter() - start, _cpu_ticks()
    others = None
    if before is not None and after is not None and after[0] > before[0]:
        others = max(0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])
    return Timing(seconds, others), result


def wait_for_idle(limit_s: float, threshold: float = 0.1) -> None:
    """Wait (at most limit_s) until other processes use under `threshold` of the machine for 2 s."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        timing, _ = timed(lambda: time.sleep(2), torch.device("cpu"))
        if timing.others is None or timing.others < threshold:
            return
    print(f"- the machine did not go idle within {limit_s:.0f} s; timing anyway")


def train_epoch(model, optimizer, batches: list[dict]) -> None:
    """One epoch as a user trains: HF loss, backward, AdamW step."""
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fit_in_steps(model, batches: list[dict], objective, config: ei.FactorConfig, device: torch.device) -> dict:
    """Timings of the three steps of an EK-FAC fit, called one by one as fit_factors calls them."""
    layers = select_layers(model, config.layers)
    steps = {}
    with evaluation_mode(model):
        steps["covariances"], (fitted, _, _) = timed(
            lambda: collect_covariances(model, layers, batches, objective, config, show_progress=False), device)

        def eigh_all():
            for layer in fitted:
                layer.eigA_I, layer.QA_II = eigendecompose(layer.A_II)
                layer.eigS_O, layer.QS_OO = eigendecompose(layer.S_OO)

        steps["eigendecomposition"], _ = timed(eigh_all, device)
        steps["eigenvalue correction"], _ = timed(
            lambda: correct_eigenvalues(model, layers, fitted, batches, objective, config, show_progress=False), device)
    return steps


@dataclass
class Row:
    stage: str
    timing: Timing
    aim: float | None = None  # in epochs
    step: bool = False  # a step of the stage above


def print_table(rows: list[Row], epoch: float) -> None:
    print("| stage | seconds | × epoch | aim | met | other load |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        ratio = row.timing.seconds / epoch
        aim = "" if row.aim is None else f"≤ {row.aim:g}"
        met = "" if row.aim is None else ("yes" if ratio <= row.aim else "**no**")
        others = "?" if row.timing.others is None else f"{100 * row.timing.others:.0f}%"
        stage = ("&nbsp;&nbsp;↳ " if row.step else "") + row.stage
        print(f"| {stage} | {row.timing.seconds:.2f} | {ratio:.2f} | {aim} | {met} | {others} |")
    print("\nother load: share of the machine's CPU time that other processes used during the stage "
          "(0% = the stage had the machine to itself).")


def profile(label: str, fn, rows: int) -> None:
    """torch.profiler's table of the operators that took the most time (self CPU) in fn()."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        fn()
    print(f"\n### profile: {label}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=256, help="N training sequences (default 256)")
    parser.add_argument("--length", type=int, default=128, help="T tokens per training sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="training sequences per batch (default 8)")
    parser.add_argument("--query-batch-size", type=int, default=16, help="queries per batch (default 16)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per query (default 64)")
    parser.add_argument("--completion", type=int, default=32, help="completion tokens per query (default 32)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--rank", type=int, default=32, help="rank of the compressed query gradients (default 32)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs before the engine stages (default 3)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the step-by-step fit")
    parser.add_argument("--no-full-rank-128", action="store_true", help="skip Q=128 at full rank")
    parser.add_argument("--profile", action="store_true", help="also profile one fit and the Q=128 rank-k scoring")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for other processes to leave the CPUs idle")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="N=64, T=64, one timed epoch: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.length, args.epochs = 64, 64, 1
    return args


def describe(args, device: torch.device, model, tracked) -> None:
    import transformers

    shapes = ", ".join(sorted({f"{l.out_features}×{l.in_dim}" for l in tracked}))
    print("## Engine benchmark (scripts/bench_engine.py)\n")
    print(f"- {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}; device {device}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPU cores")
    print(f"- model: Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} "
          f"heads, vocab 256, float32, attention {args.attention}; {sum(p.numel() for p in model.parameters()):,} "
          f"parameters; tracked: {len(tracked)} MLP linears (O×I {shapes}), {sum(l.num_params for l in tracked):,} "
          "parameters")
    print(f"- data: pydoc_data.topics as bytes, N={args.sequences} sequences × T={args.length} tokens, batches of "
          f"{args.batch_size}; queries: held-out {args.prompt}-token prompt + {args.completion}-token completion, "
          f"batches of {args.query_batch_size}")
    print(f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ids = pydoc_bytes()
    train = to_device(train_batches(ids, args.sequences, args.length, args.batch_size), device)
    held_out = args.sequences * args.length
    queries = {q: to_device(query_batches(ids, held_out, q, args.prompt, args.completion, args.query_batch_size), device)
               for q in (1, 16, 128)}
    model = tiny_llama(args.hidden, args.intermediate, args.layers, args.heads, args.attention).to(device).eval()
    objective = ei.CausalLMObjective()
    factor_config = ei.FactorConfig(strategy="ekfac")
    describe(args, device, model, select_layers(model, factor_config.layers))
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)

    # Warm-up: kernels, allocator and lazy imports of every code path, on two batches.
    trainee = copy.deepcopy(model)  # trained by the timed epochs; `model` stays as the factors saw it
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
    train_epoch(trainee, optimizer, train[:2])
    small = ei.fit_factors(model, train[:2], objective, factor_config, show_progress=False)
    for rank in (None, args.rank):
        ei.compute_scores(model, small, queries[16][:1], train[:2], objective, ei.ScoreConfig(rank=rank),
                          show_progress=False)

    epochs = [timed(lambda: train_epoch(trainee, optimizer, train), device)[0] for _ in range(args.epochs)]
    print(f"- epochs before the engine stages: {' '.join(f'{e.seconds:.2f}' for e in epochs)} s", flush=True)

    rows = []
    fit, factors = timed(lambda: ei.fit_factors(model, train, objective, factor_config, show_progress=False), device)
    rows.append(Row("fit_factors (ekfac)", fit, AIM_FIT))
    if not args.no_breakdown:
        steps = fit_in_steps(model, train, objective, factor_config, device)
        rows += [Row(name, timing, step=True) for name, timing in steps.items()]

    score_runs = [("score Q=1", 1, None, None), ("score Q=16", 16, None, AIM_SCORE_16),
                  (f"score Q=128, rank {args.rank}", 128, args.rank, AIM_SCORE_128_RANK_32)]
    if not args.no_full_rank_128:
        score_runs.append(("score Q=128, full rank", 128, None, None))
    for label, num_queries, rank, aim in score_runs:
        timing, _ = timed(lambda: ei.compute_scores(model, factors, queries[num_queries], train, objective,
                                                    ei.ScoreConfig(rank=rank), show_progress=False), device)
        rows.append(Row(label, timing, aim))

    epochs.append(timed(lambda: train_epoch(trainee, optimizer, train), device)[0])
    median = sorted(epochs, key=lambda e: e.seconds)[len(epochs) // 2]
    print(f"- epoch after the engine stages: {epochs[-1].seconds:.2f} s; the unit is the median of {len(epochs)} "
          f"epochs: {median.seconds:.2f} s (range {min(e.seconds for e in epochs):.2f}-"
          f"{max(e.seconds for e in epochs):.2f} s)")
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print_table([Row("epoch (forward + backward + AdamW)", median)] + rows, median.seconds)

    if args.profile:
        profile("fit_factors (ekfac)",
                lambda: ei.fit_factors(model, train, objective, factor_config, show_progress=False), rows=20)
        profile(f"compute_scores Q=128, rank {args.rank}",
                lambda: ei.compute_scores(model, factors, queries[128], train, objective, ei.ScoreConfig(rank=args.rank),
                                          show_progress=False), rows=20)


if __name__ == "__main__":
    main()
