"""Engine benchmark: EK-FAC fitting and scoring time, each as a ratio to one training epoch.

A tiny Llama (built in code, float32) on real text: Python's own documentation
(`pydoc_data.topics`) as bytes (vocab 256), packed into N training sequences of T tokens. It times

    epoch        forward + backward + AdamW step over the N sequences: the unit
    fit          fit_factors(strategy="ekfac"); then its steps one by one (covariances, eigh, correction)
    score Q=...  compute_scores of the N sequences for Q held-out prompt/completion queries, Q = 1, 16,
                 128 at rank 32 and 128 at full rank; the step-by-step split for Q = 16 and Q = 128 rank 32
    self-influence  self_influence of the N sequences (a corpus audit: one pass, no queries), exact and with
                 a tolerance ε (`--tolerance`, 0.05) on a copy of the model trained for 3 epochs first (an
                 untrained model's spectrum is flat, so ε saves nothing there); prints the error measured

and prints each stage's seconds, its ratio to the epoch, and the aim it is held to (docs/benchmarks.md);
then the multiply-adds per sequence of a training step and of the self-influence pass's parts (torch's
FlopCounterMode on one batch): what the self-influence ratios tend to where the time goes to products.

Run from the repository root (about 3 minutes on 2 CPU cores; the figures go into docs/benchmarks.md):

    python scripts/bench_engine.py                        # N=256, T=128, every stage twice
    python scripts/bench_engine.py --quick                # smoke test, about a minute
    python scripts/bench_engine.py --sequences 512 --length 128
    python scripts/bench_engine.py --wait-idle 600        # first wait for other processes to leave the CPUs
    python scripts/bench_engine.py --profile              # also: which operators the fit and scoring spend on
    python scripts/bench_engine.py --floor                # also: the parts of a scoring pass, timed apart
    python scripts/bench_engine.py --device cuda          # on a GPU

Protocol. Every timed stage is followed by a timed epoch, and its ratio is taken to the mean of the
epochs just before and just after it, so that a machine that speeds up or slows down over the run
(a shared or virtual machine) biases the ratios as little as it can. Each stage runs `--repeats` times;
the table shows the median and the range of its ratios, and the share of the machine that other
processes used meanwhile (any other load makes CPU timings unreliable: rerun when it is not 0%).
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ekfac_influence as ei
from ekfac_influence.factors import eigendecompose
from ekfac_influence.model import select_layers
from ekfac_influence.passes import capture_pass, device_of, evaluation_mode
from ekfac_influence.factors import check_factors_match
from ekfac_influence.fit import collect_covariances, correct_eigenvalues
from ekfac_influence.influence import query_gradients, score_training_set
from ekfac_influence.precondition import compress, precondition

IGNORE_INDEX = -100

# The aims, in epochs over the same N sequences.
AIM_FIT, AIM_SCORE_16, AIM_SCORE_128_RANK_32, AIM_SELF_INFLUENCE = 3.0, 0.9, 1.2, 1.1


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
    """Held-out prompt/completion pairs: consecutive windows of the text after the training tokens.

    Labels are −100 on the prompt: the measurement is f = log p(completion | prompt) (docs/design.md §1).
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


def train_epoch(model, optimizer, batches: list[dict]) -> None:
    """One epoch as a user trains: the HF loss, backward, an AdamW step per batch."""
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trained_copy(model, batches: list[dict], objective, config: ei.FactorConfig, epochs: int = 3):
    """A copy of the model trained for a few epochs (AdamW, lr 3e-3; untimed) and its factors: a spectrum that
    falls fast, as on the models users audit."""
    trained = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    for _ in range(epochs):
        train_epoch(trained, optimizer, batches)
    trained.eval()
    return trained, ei.fit_factors(trained, batches, objective, config, show_progress=False)


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(all CPU ticks, busy ticks of the machine, ticks of this process) from /proc; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the command name; own[0] is field 3 (state)
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields)
    return total, total - fields[3] - fields[4], int(own[11]) + int(own[12])  # utime + stime, all threads


@dataclass
class Timing:
    seconds: float
    others: float | None  # share of the machine's CPU time that other processes used meanwhile (0-1)


def timed(fn: Callable, device: torch.device) -> tuple[Timing, object]:
    """(Timing, result) of fn()."""
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


@dataclass
class Measurement:
    seconds: float  # median over repeats
    ratios: list[float]  # seconds / the mean of the epochs around each repeat
    others: float | None  # the most other load seen during the repeats and their epochs

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


DISTURBED = 0.1  # other processes using more than this share of the machine make a CPU timing unreliable


def _max_others(timings: list[Timing]) -> float | None:
    seen = [t.others for t in timings if t.others is not None]
    return max(seen) if seen else None


def _disturbed(timings: list[Timing]) -> bool:
    return any(t.others is not None and t.others > DISTURBED for t in timings)


class Bench:
    """Times stages between epochs; a stage's ratio is to the mean of the epochs just before and after it.

    A run that other processes disturbed (stage or either epoch) is run again, up to `retries` times,
    after waiting up to `idle_wait` seconds for the machine to go idle and timing a fresh epoch.
    """

    def __init__(self, epoch_fn: Callable, device: torch.device, retries: int = 2, idle_wait: float = 300):
        self.epoch_fn, self.device, self.retries, self.idle_wait = epoch_fn, device, retries, idle_wait
        self.epochs: list[Timing] = []
        self.reruns = 0

    def epoch(self) -> Timing:
        timing, _ = timed(self.epoch_fn, self.device)
        self.epochs.append(timing)
        return timing

    def _between_epochs(self, fn: Callable) -> tuple[Timing, Timing, Timing, object]:
        """(epoch before, fn's timing, epoch after, fn's result), rerun while other load disturbs them."""
        for attempt in range(self.retries + 1):
            before = self.epochs[-1]
            timing, result = timed(fn, self.device)
            after = self.epoch()
            if attempt == self.retries or not _disturbed([before, timing, after]):
                return before, timing, after, result
            self.reruns += 1
            wait_for_idle(self.idle_wait)
            self.epoch()

    def stage(self, fn: Callable, repeats: int) -> tuple[Measurement, object]:
        seconds, ratios, seen, result = [], [], [], None
        for _ in range(repeats):
            before, timing, after, result = self._between_epochs(fn)
            seconds.append(timing.seconds)
            ratios.append(timing.seconds / ((before.seconds + after.seconds) / 2))
            seen += [before, timing, after]
        return Measurement(statistics.median(seconds), ratios, _max_others(seen)), result

    def steps(self, fn: Callable[[], dict[str, Timing]]) -> dict[str, Measurement]:
        """fn() times its own steps; they share the epochs around the whole call as their unit."""
        before, _, after, steps = self._between_epochs(fn)
        unit = (before.seconds + after.seconds) / 2
        return {name: Measurement(t.seconds, [t.seconds / unit], _max_others([before, t, after]))
                for name, t in steps.items()}

    def unit(self) -> Measurement:
        """The median epoch, over the undisturbed epochs when there are any."""
        clean = [t for t in self.epochs if not _disturbed([t])] or self.epochs
        median = statistics.median(t.seconds for t in clean)
        return Measurement(median, [t.seconds / median for t in clean], _max_others(clean))


# ----------------------------------------------------------------------------- the stages, step by step


def fit_in_steps(model, batches: list[dict], objective, config: ei.FactorConfig, device: torch.device) -> dict:
    """Timings of the three steps of an EK-FAC fit, called one by one as fit_factors calls them."""
    layers = select_layers(model, config.layers)
    steps = {}
    with evaluation_mode(model):
        steps["covariances (a pass)"], (fitted, _, _) = timed(
            lambda: collect_covariances(model, layers, batches, objective, config, show_progress=False), device)

        def eigh_all():
            for layer in fitted:
                layer.eigA_I, layer.QA_II = eigendecompose(layer.A_II)
                layer.eigS_O, layer.QS_OO = eigendecompose(layer.S_OO)

        steps["eigendecomposition"], _ = timed(eigh_all, device)
        steps["eigenvalue correction (a pass)"], _ = timed(
            lambda: correct_eigenvalues(model, layers, fitted, batches, objective, config, show_progress=False), device)
    return steps


TRAINING_PASS = "training pass"


def score_in_steps(model, factors, query_batches: list[dict], batches: list[dict], objective,
                   config: ei.ScoreConfig, device: torch.device) -> dict:
    """Timings of the steps of compute_scores: all but the training pass are paid per query, whatever N is."""
    layers = check_factors_match(factors, model)
    dtype = getattr(torch, config.compute_dtype)
    steps = {}
    with evaluation_mode(model):
        steps["query gradients"], grads = timed(
            lambda: query_gradients(model, layers, query_batches, objective, show_progress=False), device)
        if config.rank is not None and "rank" in inspect.signature(precondition).parameters:
            steps[f"precondition at rank {config.rank}"], preconditioned = timed(
                lambda: precondition(grads, factors, dtype, rank=config.rank), device)
        else:
            steps["precondition"], preconditioned = timed(lambda: precondition(grads, factors, dtype), device)
            if config.rank is not None:
                steps[f"compress to rank {config.rank}"], preconditioned = timed(
                    lambda: {name: compress(P, config.rank) for name, P in preconditioned.items()}, device)
        steps[TRAINING_PASS], _ = timed(
            lambda: score_training_set(model, layers, preconditioned, batches, objective, config, show_progress=False),
            device)
    return steps


def floor_in_steps(model, factors, query_batches: list[dict], batches: list[dict], objective,
                   trainee, device: torch.device) -> dict:
    """What a scoring pass is made of, each part timed on its own over the same N sequences.

    forward + backward with weight gradients but no optimizer step (what an epoch costs without
    AdamW); the capture pass alone (forward + backward to the tracked outputs, no weight gradients);
    the same plus the per-sequence gradients D_BOI of every tracked layer; the whole scoring pass
    for these queries (the product with the query gradients added).
    """
    layers = check_factors_match(factors, model)
    steps = {}

    def forward_backward():
        trainee.train()
        for batch in batches:
            trainee(**batch).loss.backward()
        trainee.zero_grad(set_to_none=True)

    def capture(per_sequence: bool):
        with evaluation_mode(model):
            for item in capture_pass(model, layers, batches, objective, loss="real", show_progress=False):
                if per_sequence:
                    for layer in layers:
                        torch.bmm(item.grads[layer.name].transpose(1, 2), item.acts[layer.name])

    with evaluation_mode(model):
        preconditioned = precondition(query_gradients(model, layers, query_batches, objective, show_progress=False),
                                      factors)
    steps["forward + backward, no optimizer step"], _ = timed(forward_backward, device)
    steps["capture pass (no weight gradients)"], _ = timed(lambda: capture(False), device)
    steps["capture pass + per-sequence gradients"], _ = timed(lambda: capture(True), device)
    with evaluation_mode(model):
        steps[f"scoring pass, Q={len(preconditioned[layers[0].name])}"], _ = timed(
            lambda: score_training_set(model, layers, preconditioned, batches, objective, ei.ScoreConfig(),
                                       show_progress=False), device)
    return steps


def _batched_product(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FLOPs of an in-place baddbmm_ (FlopCounterMode counts only the out-of-place one)."""
    batch, rows, inner = a_shape
    return 2 * batch * rows * inner * b_shape[-1]


def self_influence_arithmetic(args, trained, factors, batch: dict, objective, tolerance: float) -> str:
    """Multiply-adds per sequence of a training step and of the self-influence pass, counted by torch's
    FlopCounterMode on one batch, as shares of a step: where a machine's time goes to products (a large GPU batch),
    the ratios the table above measures tend to these.

    Counted on an eager-attention copy of the trained model (the counter has no formula for the CPU's fused
    attention); the pass's kernels (`audit.group_self_influence`) exactly as they run, with and without the
    near-duplicate sketch, exact and with the tolerance.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ekfac_influence import audit

    eager = tiny_llama(args.hidden, args.intermediate, args.layers, args.heads, "eager")
    eager.load_state_dict(trained.state_dict())
    eager.to(device_of(trained))
    layers = check_factors_match(factors, eager)
    B = len(batch["input_ids"])

    def per_sequence(fn) -> float:
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _batched_product}) as counter:
            fn()
        return counter.get_total_flops() / 2 / B

    def step():
        eager.train()
        eager(**batch).loss.backward()
        eager.zero_grad(set_to_none=True)

    captured = []

    def capture():
        with evaluation_mode(eager):
            captured.extend(capture_pass(eager, layers, [batch], objective, loss="real", show_progress=False,
                                         check=False))

    def kernels(**config) -> float:
        plan = audit.plan_audit(factors, ei.SelfInfluenceConfig(**config), device_of(trained))
        return per_sequence(lambda: audit.group_self_influence(captured, factors, plan)) / unit

    unit = per_sequence(step)
    capture_share = per_sequence(capture) / unit
    T = batch["input_ids"].shape[1]
    dw = sum(T * layer.out_dim * layer.in_dim for layer in factors.layers) / unit
    rows = [("a training step (forward + backward)", 1.0), ("capture (forward + backward to the tracked outputs)",
            capture_share), ("+ the per-sequence gradients DW", capture_share + dw)]
    for name, config in ((f"ε = {tolerance:g}", dict(tolerance=tolerance)),
                         (f"ε = {tolerance:g}, no sketch", dict(tolerance=tolerance, duplicate_sketch=0)),
                         ("exact", {}), ("exact, no sketch", dict(duplicate_sketch=0))):
        rows.append((f"self-influence pass, {name}", capture_share + kernels(**config)))
    lines = ["\nMultiply-adds per sequence (torch's FlopCounterMode on one batch of an eager-attention copy of the "
             "trained model; products only):\n", "| | multiply-adds (M) | × training step |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {share * unit / 1e6:.0f} | {share:.2f} |" for name, share in rows]
    return "\n".join(lines)


def break_even(label: str, steps: dict[str, Measurement], num_sequences: int, aim: float) -> str:
    """From which N a scoring stage meets its aim: per-query work is fixed, the training pass grows with N."""
    fixed = sum(m.seconds for name, m in steps.items() if name != TRAINING_PASS)
    pass_ratio = steps[TRAINING_PASS].ratio  # epochs per epoch: the same at every N
    epoch = steps[TRAINING_PASS].seconds / pass_ratio
    head = (f"- {label}: {fixed:.2f} s of per-query work (independent of N) + a training pass of {pass_ratio:.2f} "
            f"epochs; the aim of {aim:g} epochs is met ")
    if pass_ratio >= aim:
        return head + f"at no N (the training pass alone, {pass_ratio:.3f} epochs, is not under it)"
    return head + f"from N ≈ {fixed / ((aim - pass_ratio) * epoch / num_sequences):,.0f} sequences of this length"


# ----------------------------------------------------------------------------- report


@dataclass
class Row:
    stage: str
    measurement: Measurement
    aim: float | None = None  # in epochs
    step: bool = False  # a step of the stage above


def print_table(rows: list[Row]) -> None:
    print("| stage | seconds | × epoch | range | aim | met | other load |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        m = row.measurement
        spread = f"{min(m.ratios):.2f}-{max(m.ratios):.2f}" if len(m.ratios) > 1 else ""
        aim = "" if row.aim is None else f"≤ {row.aim:g}"
        met = "" if row.aim is None else ("yes" if m.ratio <= row.aim else "**no**")
        if met and m.others is not None and m.others > DISTURBED:
            met += " (disturbed)"
        others = "?" if m.others is None else f"{100 * m.others:.0f}%"
        stage = ("&nbsp;&nbsp;↳ " if row.step else "") + row.stage
        print(f"| {stage} | {m.seconds:.2f} | {m.ratio:.2f} | {spread} | {aim} | {met} | {others} |")


def profile(label: str, fn: Callable, rows: int = 20) -> None:
    """torch.profiler's table of the operators that took the most time (self CPU) in fn()."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        fn()
    print(f"\n### profile: {label}\n")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                             max_name_column_width=36, max_shapes_column_width=48))


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(description=parts[0], epilog="\n\n".join(parts[4:6]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=256, help="N training sequences (default 256)")
    parser.add_argument("--length", type=int, default=128, help="T tokens per training sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="training sequences per batch (default 8)")
    parser.add_argument("--query-batch-size", type=int, default=16, help="queries per batch (default 16)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per query (default 64)")
    parser.add_argument("--completion", type=int, default=32, help="completion tokens per query (default 32)")
    parser.add_argument("--hidden", type=int, default=128, help="Llama hidden size (default 128)")
    parser.add_argument("--intermediate", type=int, default=512, help="Llama MLP size (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="Llama blocks (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="(default sdpa)")
    parser.add_argument("--rank", type=int, default=32, help="rank of the compressed query gradients (default 32)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="ε of the self-influence row with a tolerance (default 0.05)")
    parser.add_argument("--repeats", type=int, default=2, help="times each stage runs (default 2)")
    parser.add_argument("--retries", type=int, default=2,
                        help=f"reruns of a stage that other processes disturbed (over {100 * DISTURBED:.0f}%% of the machine; "
                             "default 2)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the step-by-step fit and scoring")
    parser.add_argument("--no-full-rank-128", action="store_true", help="skip Q=128 at full rank")
    parser.add_argument("--profile", action="store_true", help="then profile one fit and one Q=128 rank-k scoring")
    parser.add_argument("--floor", action="store_true",
                        help="also time the parts of a Q=16 scoring pass: forward + backward without the optimizer, "
                             "the capture pass, + per-sequence gradients, the whole pass")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for other processes to leave the CPUs idle")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="N=64, T=64, each stage once: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.length, args.repeats = 64, 64, 1
    return args


def package_version() -> str:
    """ekfac_influence's version, and the git commit of the checkout it runs from (+ "dirty" when edited)."""
    import subprocess

    where = os.path.dirname(os.path.abspath(ei.__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=where, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"ekfac_influence {ei.__version__}" + (f" (commit {commit}{', edited' if dirty else ''})" if commit else "")


def describe(args, device: torch.device, model, tracked) -> None:
    import transformers

    shapes = ", ".join(sorted({f"{layer.out_features}×{layer.in_dim}" for layer in tracked}))
    print("## Engine benchmark (scripts/bench_engine.py)\n")
    print(f"- {time.strftime('%Y-%m-%d %H:%M')}; {package_version()}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          f"python {platform.python_version()}; device {device}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPU cores")
    print(f"- model: Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} "
          f"heads, vocab 256, float32, attention {args.attention}; {sum(p.numel() for p in model.parameters()):,} "
          f"parameters; tracked: {len(tracked)} MLP linears (O×I {shapes}), "
          f"{sum(layer.num_params for layer in tracked):,} parameters")
    print(f"- data: pydoc_data.topics as bytes, N={args.sequences} sequences × T={args.length} tokens, batches of "
          f"{args.batch_size}; queries: held-out {args.prompt}-token prompt + {args.completion}-token completion, "
          f"batches of {args.query_batch_size}; each stage run {args.repeats}×")
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

    # Warm-up on two batches: kernels, allocator and lazy imports of every code path.
    trainee = copy.deepcopy(model)  # trained by the timed epochs; `model` stays as the factors saw it
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
    train_epoch(trainee, optimizer, train[:2])
    small = ei.fit_factors(model, train[:2], objective, factor_config, show_progress=False)
    for rank in (None, args.rank):
        ei.compute_scores(model, small, queries[16][:1], train[:2], objective, ei.ScoreConfig(rank=rank),
                          show_progress=False)
    ei.self_influence(model, small, train[:2], objective, show_progress=False)

    bench = Bench(lambda: train_epoch(trainee, optimizer, train), device, args.retries,
                  idle_wait=max(args.wait_idle, 60))
    bench.epoch()
    bench.epoch()
    rows, break_evens = [], []
    fit, factors = bench.stage(
        lambda: ei.fit_factors(model, train, objective, factor_config, show_progress=False), args.repeats)
    rows.append(Row("fit_factors (ekfac)", fit, AIM_FIT))
    if not args.no_breakdown:
        steps = bench.steps(lambda: fit_in_steps(model, train, objective, factor_config, device))
        rows += [Row(name, m, step=True) for name, m in steps.items()]

    score_runs = [("score Q=1", 1, None, None), ("score Q=16", 16, None, AIM_SCORE_16),
                  (f"score Q=128, rank {args.rank}", 128, args.rank, AIM_SCORE_128_RANK_32)]
    if not args.no_full_rank_128:
        score_runs.append(("score Q=128, full rank", 128, None, None))
    for label, num_queries, rank, aim in score_runs:
        config = ei.ScoreConfig(rank=rank)
        run = functools.partial(ei.compute_scores, model, factors, queries[num_queries], train, objective, config,
                                show_progress=False)
        rows.append(Row(label, bench.stage(run, args.repeats)[0], aim))
        if aim is not None and not args.no_breakdown:
            steps = bench.steps(lambda: score_in_steps(model, factors, queries[num_queries], train, objective, config,
                                                       device))
            rows += [Row(name, m, step=True) for name, m in steps.items()]
            break_evens.append(break_even(label, steps, args.sequences, aim))

    audit = functools.partial(ei.self_influence, model, factors, train, objective, show_progress=False)
    rows.append(Row("self_influence (ekfac)", bench.stage(audit, args.repeats)[0], AIM_SELF_INFLUENCE))
    trained, trained_factors = trained_copy(model, train, objective, factor_config)
    audits = {}
    for tolerance in (0.0, args.tolerance):
        audit = functools.partial(ei.self_influence, trained, trained_factors, train, objective,
                                  ei.SelfInfluenceConfig(tolerance=tolerance), show_progress=False)
        measured, audits[tolerance] = bench.stage(audit, args.repeats)
        rows.append(Row(f"self_influence (ekfac, trained, ε={tolerance:g})", measured, AIM_SELF_INFLUENCE))

    if args.floor:
        steps = bench.steps(lambda: floor_in_steps(model, factors, queries[16], train, objective, trainee, device))
        rows += [Row(name, m, step=i > 0) for i, (name, m) in enumerate(steps.items())]

    unit = bench.unit()
    print(f"- epochs, in the order run: {' '.join(f'{t.seconds:.2f}' for t in bench.epochs)} s; the table's seconds "
          f"are medians, its ratios are to the epochs around each run; {bench.reruns} run(s) repeated for other load")
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print_table([Row("epoch (forward + backward + AdamW)", unit)] + rows)
    print("\nrange: the ratio of each repeat. other load: the most CPU that other processes used during a repeat "
          "or its epochs, as a share of the machine (0% = it had the machine to itself; over "
          f"{DISTURBED:.0%} = disturbed, the ratio is unreliable).")
    exact, cut = audits[0.0], audits[args.tolerance]
    relative = ((cut.values.double() - exact.values.double()) / exact.values.double()).abs().max()
    print(f"\nε = {args.tolerance:g} on the trained model: s(n) off the exact pass by at most {relative:.2e} of itself "
          f"(the bound it reports: {cut.max_relative_error():.2e}; ε / (1 − ε) = "
          f"{args.tolerance / (1 - args.tolerance):.2e})")
    print(self_influence_arithmetic(args, trained, trained_factors, train[0], objective, args.tolerance))
    if break_evens:
        print("\nPer-query work is paid once, whatever N; the training pass grows with N like an epoch does:\n")
        print("\n".join(break_evens))

    if args.profile:
        profile("fit_factors (ekfac)", lambda: ei.fit_factors(model, train, objective, factor_config,
                                                              show_progress=False))
        profile(f"compute_scores Q=128, rank {args.rank}",
                lambda: ei.compute_scores(model, factors, queries[128], train, objective, ei.ScoreConfig(rank=args.rank),
                                          show_progress=False))


if __name__ == "__main__":
    main()
