"""What a kfac/ekfac fit holds per process, before running it: `fit --dry-run`, docs/scaling.md.

Shapes: I in-features (+1 bias), O out-features, b_I, b_O diagonal blocks of A and S, B batch, T positions.
Per tracked layer, in elements:

    covariances A + S:   I²/b_I + O²/b_O        eigenvectors Q_A + Q_S: the same        eigenvalues: I + O
    Λ:                   O · I

The steps are those of `fit` (and of its measurement, `fit.HELD_BYTES`), with the layers a process
holds: all of them, or (sharded) those `assign_owners` gives it; the figure of a step is that of
the busiest process:

    covariance pass:    local sums of every layer's A, S in accumulate_dtype (sharded or not)
    covariances reduced: held A, S in float64
    eigendecomposed:    held A, S, Q_A, Q_S, eigenvalues in float64
    correction pass:    the above + every layer's local Λ sums in accumulate_dtype + (sharded) the
                        eigenvectors of the layers held elsewhere in the pass's working dtype
    fitted:             held A, S, Q_A, Q_S, eigenvalues, Λ in float64 (then stored in factor_dtype)

Beside them: the model's weights (÷ world with FSDP), one batch's captured ā and g of the tracked
layers, and one reduce bucket. Not counted: the model's own activations in forward and backward,
eigh's workspace, allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import FactorConfig
from .factors import assign_owners, factor_blocks, layer_factor_bytes
from .model import TrackedLayer

REDUCE_BUCKET_BYTES = 2**28  # distributed._BUCKET_BYTES
BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
STEPS = ("covariance pass: local sums", "covariances reduced", "eigendecomposed",
         "correction pass: local sums and eigenvectors", "fitted")


@dataclass
class FitPlan:
    """Bytes per process (the busiest one) of a kfac/ekfac fit; `steps` match `fit.HELD_BYTES`."""

    world: int
    sharded: bool
    layers: int
    model_bytes: int
    buffer_bytes: int
    steps: dict[str, int] = field(default_factory=dict)
    stored_bytes: int = 0  # the fitted factors this process keeps (all groups), in factor_dtype

    @property
    def factor_peak(self) -> int:
        return max(self.steps.values())

    @property
    def peak(self) -> int:
        return self.model_bytes + self.buffer_bytes + self.factor_peak

    def fits(self, device_bytes: float) -> bool:
        return self.peak <= device_bytes

    def table(self, device_bytes: float | None = None) -> str:
        """The plan as lines of text, GiB with two decimals."""
        lines = [f"world {self.world}, {self.layers} tracked layers, factors "
                 f"{'sharded by layer' if self.sharded else 'on every process'}; bytes per process (the busiest):",
                 f"  {'model weights':<56}{gib(self.model_bytes):>12}",
                 f"  {'buffers (one batch of ā, g; a reduce bucket)':<56}{gib(self.buffer_bytes):>12}"]
        lines += [f"  {'factors, ' + step:<56}{gib(value):>12}" for step, value in self.steps.items()]
        lines += [f"  {'peak = model + buffers + largest factor step':<56}{gib(self.peak):>12}",
                  f"  {'factors kept after the fit (factor_dtype)':<56}{gib(self.stored_bytes):>12}"]
        if device_bytes is not None:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(f"  {verdict} in {gib(device_bytes)} of device memory")
        return "\n".join(lines)


def factor_bytes(layer: TrackedLayer, config: FactorConfig | None = None) -> int:
    """Memory of one layer's factors while fitted: A, S, Q_A, Q_S (b× less with b blocks) and Λ in float64."""
    return layer_factor_bytes(layer.out_features, layer.in_dim, config)


def layer_groups(layers: list[TrackedLayer], budget_gb: float | None,
                 config: FactorConfig | None = None) -> list[list[TrackedLayer]]:
    """Consecutive groups of layers whose factors fit in the budget (one group without a budget).

    Each group costs its own passes over the data (two for ekfac), so a tight budget trades memory
    for time; a layer larger than the budget on its own gets a group of its own.
    """
    if budget_gb is None:
        return [layers]
    budget, groups, size = budget_gb * 2**30, [[]], 0
    for layer in layers:
        if groups[-1] and size + factor_bytes(layer, config) > budget:
            groups.append([])
            size = 0
        groups[-1].append(layer)
        size += factor_bytes(layer, config)
    return groups


def gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB"


def plan_fit(model: nn.Module, layers: list[TrackedLayer], config: FactorConfig, world: int, *,
             model_dtype: str = "float32", batch_size: int = 8, length: int = 512, fsdp: bool = False) -> FitPlan:
    """The memory of fitting `config` (kfac/ekfac) on `world` processes; `model` may live on the meta device.

    With `memory_budget_gb` the layers are fitted in groups: a step's figure is then the largest
    group's; the factors of the groups done wait in host memory (counted in `stored_bytes` only).
    """
    if config.strategy not in ("kfac", "ekfac"):
        raise ValueError(f"the dry run plans kfac and ekfac fits; strategy {config.strategy!r} holds other tensors")
    sharded = config.shard == "auto" and world > 1
    owners = assign_owners({l.name: factor_bytes(l, config) for l in layers}, world) \
        if sharded else {l.name: 0 for l in layers}
    groups, ranks = layer_groups(layers, config.memory_budget_gb, config), range(world if sharded else 1)
    steps_by_rank = [_steps(group, owners, rank, config, model_dtype) for group in groups for rank in ranks]
    stored = max(sum(_steps(group, owners, rank, config, model_dtype)[1] for group in groups) for rank in ranks)
    params = sum(p.numel() for p in model.parameters())
    captured = batch_size * length * sum(l.in_dim + l.out_features for l in layers) * BYTES[model_dtype]
    return FitPlan(
        world=world, sharded=sharded, layers=len(layers),
        model_bytes=params * BYTES[model_dtype] // (world if fsdp else 1),
        buffer_bytes=captured + (REDUCE_BUCKET_BYTES if world > 1 else 0),
        steps={step: max(s.get(step, 0) for s, _ in steps_by_rank) for step in steps_by_rank[0][0]},
        stored_bytes=stored,
    )


def _steps(layers: list[TrackedLayer], owners: dict[str, int], rank: int, config: FactorConfig,
           model_dtype: str) -> tuple[dict[str, int], int]:
    """({step: bytes}, bytes stored) of process `rank` fitting `layers`."""
    acc, work = BYTES[config.accumulate_dtype], 8 if model_dtype == "float64" else 4
    own = [l for l in layers if owners[l.name] == rank]
    elsewhere = [l for l in layers if owners[l.name] != rank]
    cov = {l.name: _covariance_elements(l, config) for l in layers}
    held_cov = sum(cov[l.name] for l in own)
    eig = sum(l.in_dim + l.out_features for l in own)
    lam_all = sum(l.out_features * l.in_dim for l in layers)
    steps = {STEPS[0]: acc * sum(cov.values()),
             STEPS[1]: 8 * held_cov,
             STEPS[2]: 8 * (2 * held_cov + eig)}
    if config.strategy == "ekfac":
        steps[STEPS[3]] = steps[STEPS[2]] + acc * lam_all + work * sum(cov[l.name] for l in elsewhere)
    steps[STEPS[4]] = steps[STEPS[2]] + 8 * sum(l.out_features * l.in_dim for l in own)
    stored = BYTES[config.factor_dtype] * (2 * held_cov + eig + sum(l.out_features * l.in_dim for l in own))
    return steps, stored


def _covariance_elements(layer: TrackedLayer, config: FactorConfig) -> int:
    """Elements of A and S as kept (their diagonal blocks when blocked), as `blocked_covariance` makes them."""
    total = 0
    for size in (layer.in_dim, layer.out_features):
        blocks = factor_blocks(size, config)
        bounds = [round(i * size / blocks) for i in range(blocks + 1)]
        total += sum((b - a) ** 2 for a, b in zip(bounds, bounds[1:]))
    return total


def parse_bytes(text: str) -> float:
    """'80GB', '80 GiB', '141e9' → bytes (GB and GiB both read as 2^30, as GPU makers' '80GB' means)."""
    cleaned = text.strip().upper().replace(" ", "")
    scale = 1
    for suffix, factor in (("TIB", 2**40), ("TB", 2**40), ("GIB", 2**30), ("GB", 2**30), ("MIB", 2**20), ("MB", 2**20),
                           ("B", 1)):
        if cleaned.endswith(suffix):
            cleaned, scale = cleaned[: -len(suffix)], factor
            break
    try:
        return float(cleaned) * scale
    except ValueError:
        raise ValueError(f"device memory {text!r} is not a size like 80GB, 141GiB or 8e10") from None
