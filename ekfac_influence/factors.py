"""Curvature factors: covariances, eigendecomposition, eigenvalue correction, damping.

Shapes: B sequences, T positions, I in-features (+1 bias column), O out-features.
For a tracked layer with inputs ā_t and output gradients g_t of the sampled-label loss:

    A = E_tokens[ā āᵀ]   (I × I)        S = E_tokens[g gᵀ]   (O × O)
    A = Q_A Λ_A Q_Aᵀ,  S = Q_S Λ_S Q_Sᵀ   (eigh in float64 of the symmetrised matrices)
    DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ            (O × I, one sequence)
    ekfac:    Λ = E_sequences[(Q_Sᵀ DW_n Q_A)²]
    kfac:     Λ = T̄ · Λ_S ⊗ Λ_A   (T̄ = tokens per sequence, so both estimate the per-sequence G)
    diagonal: Λ = E_sequences[DW_n²]
    damping:  λ = damping_factor × mean(Λ), or a fixed value

This module holds the math, the containers and their files (safetensors + a JSON manifest, written
atomically by `storage`); the passes over data that fit them live in `fit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import ROTATION_ORDERS, FactorConfig, from_dict, to_dict
from .model import TrackedLayer, candidate_layers, fingerprint
from .storage import (FACTORS_FILE, StorageError, read_manifest, read_shard_files, shard_file, write_sharded_stage,
                      write_stage)
from .version import __version__


def block_slices(size: int, blocks: int) -> list[slice]:
    """`blocks` contiguous slices of 0..size, as even as possible (one slice when blocks == 1)."""
    bounds = [round(i * size / blocks) for i in range(blocks + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def factor_blocks(size: int, config: FactorConfig) -> int:
    """How many diagonal blocks a factor of this size is split into (the paper's 52B setting: 2)."""
    return config.blocks if size >= config.block_min_dim else 1


@dataclass
class BlockDiagonal:
    """A square matrix that is zero off its diagonal blocks, kept as the blocks: b× less memory.

    Multiplies like the dense matrix it stands for (`Q @ x` acts on x's rows, `x @ Q` on its
    columns, `Q.T`), so the rotations of fitting and preconditioning take it unchanged, at b× fewer
    flops. Stored as `{name}#0`, `{name}#1`, ... (see `storage`).
    """

    blocks: list[Tensor]

    @property
    def size(self) -> int:
        return sum(block.shape[0] for block in self.blocks)

    @property
    def shape(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    def numel(self) -> int:
        return sum(block.numel() for block in self.blocks)

    def _slices(self) -> list[slice]:
        bounds = [0]
        for block in self.blocks:
            bounds.append(bounds[-1] + block.shape[0])
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    @property
    def T(self) -> "BlockDiagonal":
        return BlockDiagonal([block.T for block in self.blocks])

    def dense(self) -> Tensor:
        return torch.block_diag(*self.blocks)

    def to(self, *args, **kwargs) -> "BlockDiagonal":
        return BlockDiagonal([block.to(*args, **kwargs) for block in self.blocks])

    def map(self, fn) -> "BlockDiagonal":
        return BlockDiagonal([fn(block) for block in self.blocks])

    def __matmul__(self, x: Tensor) -> Tensor:  # self @ x, x [..., D, K]
        return torch.cat([block @ x[..., rows, :] for block, rows in zip(self.blocks, self._slices())], dim=-2)

    def __rmatmul__(self, x: Tensor) -> Tensor:  # x @ self, x [..., K, D]
        return torch.cat([x[..., cols] @ block for block, cols in zip(self.blocks, self._slices())], dim=-1)

    def __add__(self, other: "BlockDiagonal") -> "BlockDiagonal":
        return BlockDiagonal([a + b for a, b in zip(self.blocks, other.blocks)])

    def __truediv__(self, value: float) -> "BlockDiagonal":
        return self.map(lambda block: block / value)


def parts(value: "Tensor | BlockDiagonal") -> list[Tensor]:
    """The tensors holding a factor: itself, or its blocks (for reduces and broadcasts in place)."""
    return value.blocks if isinstance(value, BlockDiagonal) else [value]


def blocked_covariance(x_NX: Tensor, blocks: int, dtype: torch.dtype = torch.float64) -> "Tensor | BlockDiagonal":
    """Σ_n x_n x_nᵀ, or with blocks > 1 only its diagonal blocks: blocks× fewer flops and memory."""
    return add_covariance(None, x_NX, blocks, dtype)


def add_covariance(sum_XX: "Tensor | BlockDiagonal | None", x_NX: Tensor, blocks: int,
                   dtype: torch.dtype = torch.float64) -> "Tensor | BlockDiagonal":
    """sum_XX + Σ_n x_n x_nᵀ (its diagonal blocks when blocks > 1), added in place; a new sum if None.

    Products in the input's precision (at least float32), sums in `dtype`.
    """
    X = x_NX.shape[1]
    if sum_XX is None:
        sizes = [b.stop - b.start for b in block_slices(X, blocks)]
        zeros = [torch.zeros(n, n, dtype=dtype, device=x_NX.device) for n in sizes]
        sum_XX = zeros[0] if blocks == 1 else BlockDiagonal(zeros)
    x_NX = x_NX if x_NX.dtype == torch.float64 else x_NX.float()
    for target, block in zip(parts(sum_XX), block_slices(X, blocks)):
        _add_gram_(target, x_NX[:, block])
    return sum_XX


_HALVES_FROM = 256  # from this size on, xᵀx as three products of its halves (upper triangle): ~17% faster


def _add_gram_(sum_XX: Tensor, x_NX: Tensor) -> None:
    """sum_XX += x_NXᵀ x_NX; a large one as [[tᵀt, tᵀb], [(tᵀb)ᵀ, bᵀb]], a quarter of the flops spared."""
    X = x_NX.shape[1]
    if X < _HALVES_FROM:
        sum_XX += x_NX.T @ x_NX
        return
    h = X // 2
    top, bottom = x_NX[:, :h], x_NX[:, h:]
    corner = top.T @ bottom
    sum_XX[:h, :h] += top.T @ top
    sum_XX[h:, h:] += bottom.T @ bottom
    sum_XX[:h, h:] += corner
    sum_XX[h:, :h] += corner.T


def eigendecompose(cov_XX: "Tensor | BlockDiagonal") -> "tuple[Tensor, Tensor | BlockDiagonal]":
    """(eigenvalues_X, eigenvectors_XX) of the symmetrised matrix, in float64, eigenvalues ≥ 0.

    A block-diagonal matrix is decomposed block by block (blocks² fewer flops); Q is block-diagonal.
    """
    if isinstance(cov_XX, BlockDiagonal):
        pairs = [eigendecompose(block) for block in cov_XX.blocks]
        return torch.cat([values for values, _ in pairs]), BlockDiagonal([Q for _, Q in pairs])
    cov_XX = cov_XX.double()
    eigenvalues_X, eigenvectors_XX = torch.linalg.eigh((cov_XX + cov_XX.T) / 2)
    return eigenvalues_X.clamp_min(0), eigenvectors_XX.contiguous()  # row-major, as stored: same sums after a reload


def sequence_gradients(g_BTO: "Tensor | list[Tensor]", a_BTI: "Tensor | list[Tensor]") -> Tensor:
    """DW_BOI = Σ_t g_t ā_tᵀ per sequence (a batched product of gᵀ, read transposed: 0.38 ms against einsum's
    0.47 ms on [8, 128, 512] × [8, 128, 128] here, which copies g first).

    Lists of batches (g and ā of each) give one [ΣB, O, I] tensor: each batch's product is written into its rows,
    so the tokens are never copied together.
    """
    if isinstance(g_BTO, Tensor):
        return torch.bmm(g_BTO.transpose(1, 2), a_BTI)
    if len(g_BTO) == 1:
        return sequence_gradients(g_BTO[0], a_BTI[0])
    DW_BOI = g_BTO[0].new_empty(sum(len(g) for g in g_BTO), g_BTO[0].shape[2], a_BTI[0].shape[2])
    start = 0
    for g, a in zip(g_BTO, a_BTI, strict=True):
        torch.bmm(g.transpose(1, 2), a, out=DW_BOI[start:start + len(g)])
        start += len(g)
    return DW_BOI


def rotation_costs(T: int, O: int, I: int) -> dict[str, int]:
    """Multiply-adds per sequence of R = Q_Sᵀ (Σ_t g_t ā_tᵀ) Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ ā_t)ᵀ in each order.

    tokens: rotate every g_t and ā_t, then sum the products; sequences: form DW, then rotate both of
    its sides; inputs first: rotate the ā_t, sum, then Q_Sᵀ from the left (cheaper when I < T < O);
    outputs first: rotate the g_t, sum, then Q_A from the right (when O < T < I).
    """
    return {"tokens": T * (O * O + I * I) + T * O * I, "sequences": T * O * I + O * I * (O + I),
            "inputs first": T * I * I + T * O * I + O * O * I, "outputs first": T * O * O + T * O * I + O * I * I}


def rotation_order(T: int, O: int, I: int) -> str:
    costs = rotation_costs(T, O, I)
    return min(costs, key=costs.get)  # ties go to the order listed first


def rotated_gradients(g_BTO: "Tensor | list[Tensor]", a_BTI: "Tensor | list[Tensor]", QS_OO, QA_II, order: str = "auto"
                      ) -> tuple[Tensor, "Tensor | list[Tensor] | None", "Tensor | list[Tensor] | None"]:
    """(R_BOI = Q_Sᵀ DW_n Q_A, the rotated g_BTO Q_S or None, the rotated ā_BTI Q_A or None) in `order`, or with
    "auto" the cheapest one (`rotation_costs`, at the longest batch's T). The EK-FAC correction squares R;
    self-influence weighs it. Lists of batches, as `sequence_gradients` takes them, give lists of rotated tokens."""
    several = not isinstance(g_BTO, Tensor)
    if order == "auto":
        T = max(g.shape[1] for g in g_BTO) if several else g_BTO.shape[1]
        order = rotation_order(T, (g_BTO[0] if several else g_BTO).shape[2], (a_BTI[0] if several else a_BTI).shape[2])
    rotate = (lambda x, Q: [part @ Q for part in x]) if several else (lambda x, Q: x @ Q)  # noqa: E731
    if order == "tokens":
        g_BTO, a_BTI = rotate(g_BTO, QS_OO), rotate(a_BTI, QA_II)
        return sequence_gradients(g_BTO, a_BTI), g_BTO, a_BTI
    if order == "sequences":
        return QS_OO.T @ sequence_gradients(g_BTO, a_BTI) @ QA_II, None, None
    if order == "inputs first":
        a_BTI = rotate(a_BTI, QA_II)
        return QS_OO.T @ sequence_gradients(g_BTO, a_BTI), None, a_BTI
    if order == "outputs first":
        g_BTO = rotate(g_BTO, QS_OO)
        return sequence_gradients(g_BTO, a_BTI) @ QA_II, g_BTO, None
    raise ValueError(f"rotation order must be auto or one of {', '.join(ROTATION_ORDERS)}, not {order!r}")


def damping_for(lambda_OI: Tensor, config: FactorConfig) -> float:
    if config.damping is not None:
        return float(config.damping)
    return float(config.damping_factor * lambda_OI.double().mean())


def layer_factor_bytes(out_dim: int, in_dim: int, config: FactorConfig | None = None) -> int:
    """Memory of one layer's factors while fitted: A, S, Q_A, Q_S (b× less with b blocks) and Λ in float64."""
    b_I, b_O = (1, 1) if config is None else (factor_blocks(in_dim, config), factor_blocks(out_dim, config))
    return 8 * (2 * in_dim * in_dim // b_I + 2 * out_dim * out_dim // b_O + out_dim * in_dim)


def assign_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """{layer: owning process}: greedy by bytes, the largest layer first to the least loaded process.

    Deterministic (ties: the earlier layer first, then the lower rank), so every process and every
    later load with the same world size computes the same assignment without talking.
    """
    load, owners, order = [0] * world, {}, {name: i for i, name in enumerate(sizes)}
    for name in sorted(sizes, key=lambda n: (-sizes[n], order[n])):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += sizes[name]
    return {name: owners[name] for name in sizes}


@dataclass
class LayerFactors:
    """Everything the preconditioner of one layer needs. Unused fields stay None."""

    name: str
    out_dim: int
    in_dim: int
    damping: float = 0.0
    A_II: Tensor | BlockDiagonal | None = None  # activation covariance (mean over tokens)
    S_OO: Tensor | BlockDiagonal | None = None  # output-gradient covariance (mean over tokens)
    QA_II: Tensor | BlockDiagonal | None = None
    QS_OO: Tensor | BlockDiagonal | None = None
    eigA_I: Tensor | None = None
    eigS_O: Tensor | None = None
    lambda_OI: Tensor | None = None  # eigenvalues of G's block in the (Q_S ⊗ Q_A) basis, or its diagonal

    TENSORS = ("A_II", "S_OO", "QA_II", "QS_OO", "eigA_I", "eigS_O", "lambda_OI")

    def tensors(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in self.TENSORS if getattr(self, key) is not None}

    def __repr__(self) -> str:
        return f"LayerFactors({self.name}, O×I = {self.out_dim}×{self.in_dim}, {', '.join(self.tensors())})"

    def to(self, dtype: torch.dtype, device=None) -> "LayerFactors":
        moved = {key: value.to(device=device, dtype=dtype) for key, value in self.tensors().items()}
        return LayerFactors(self.name, self.out_dim, self.in_dim, self.damping, **moved)


def _nbytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(block) for block in getattr(value, "blocks", []))


@dataclass
class Factors:
    """Fitted curvature for a set of tracked layers of one model.

    `ggn_PP` (exact strategy) is the dense Gauss-Newton over all tracked parameters, ordered layer by
    layer, each layer's O × I gradient flattened row-major. `lissa_scale` is used by LiSSA.
    """

    strategy: str
    layers: list[LayerFactors]
    fingerprint: str
    config: FactorConfig
    num_sequences: int
    num_tokens: int
    ggn_PP: Tensor | None = None
    lissa_scale: float | None = None
    meta: dict = field(default_factory=dict)
    owners: dict[str, int] | None = None  # sharded: {layer: process holding its tensors}; None = all held here

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def held(self, name: str) -> bool:
        """Whether this process holds the layer's tensors (always, unless the factors are sharded)."""
        return bool(self.layer(name).tensors()) or self.strategy == "identity"

    def __repr__(self) -> str:
        """One line: strategy, layers, data, fingerprint and size (the dataclass default would print every tensor)."""
        names = self.layer_names
        shown = ", ".join(names[:2]) + (f", ... {names[-1]}" if len(names) > 3 else "".join(f", {n}" for n in names[2:]))
        tensors = [t for layer in self.layers for t in layer.tensors().values()]
        tensors += [self.ggn_PP] if self.ggn_PP is not None else []
        size = sum(_nbytes(t) for t in tensors)
        return (f"Factors({self.strategy}, {len(names)} layers [{shown}], {self.num_sequences:,} sequences, "
                f"{self.num_tokens:,} tokens, fingerprint {self.fingerprint}, {size / 2**20:.1f} MiB)")

    def layer(self, name: str) -> LayerFactors:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no factors for layer {name!r}; fitted layers: {', '.join(self.layer_names)}")

    def save(self, path, *, overwrite: bool = False) -> None:
        """factors.safetensors (block-diagonal factors as their blocks) + manifest.json, atomically.

        Sharded factors (every process calls save): one factors.<r>-of-<W>.safetensors per process
        with the layers it holds, and one manifest listing each layer's shard (docs/design.md §4).
        """
        tensors = {f"{layer.name}/{key}": value for layer in self.layers for key, value in layer.tensors().items()}
        tensors = flatten_blocks(tensors)
        if self.ggn_PP is not None:
            tensors["ggn_PP"] = self.ggn_PP
        manifest = {
            "kind": "ekfac_influence.factors",
            "version": __version__,
            "torch": torch.__version__,
            "strategy": self.strategy,
            "fingerprint": self.fingerprint,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "lissa_scale": self.lissa_scale,
            "config": to_dict(self.config),
            "layers": [{"name": l.name, "out_dim": l.out_dim, "in_dim": l.in_dim, "damping": l.damping} for l in self.layers],
            "meta": self.meta,
        }
        if self.owners is None:
            write_stage(path, tensors, manifest, overwrite=overwrite)
            return
        for entry in manifest["layers"]:
            entry["shard"] = self.owners[entry["name"]]  # the process whose file holds it
        write_sharded_stage(path, tensors, manifest, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, model: nn.Module | None = None, shard: tuple[int, int] | None = None) -> "Factors":
        """Load factors; with `model`, refuse factors fitted for another model or other layers.

        shard: (rank, world) to read only the layers `assign_owners` gives process `rank` of `world`
        (sharded factors: their shard files only), whatever the world size that fitted them; None or
        world 1 reads every layer.
        """
        manifest = read_manifest(path)
        if manifest.get("kind") != "ekfac_influence.factors":
            raise StorageError(f"{path} does not hold ekfac_influence factors")
        config = from_dict(FactorConfig, manifest["config"])
        owners = None
        if shard is not None and shard[1] > 1 and manifest["strategy"] in ("kfac", "ekfac"):
            owners = assign_owners({e["name"]: layer_factor_bytes(e["out_dim"], e["in_dim"], config)
                                    for e in manifest["layers"]}, shard[1])
        wanted = {e["name"] for e in manifest["layers"] if owners is None or owners[e["name"]] == shard[0]}
        files = [FACTORS_FILE] if "shards" not in manifest else \
            list(dict.fromkeys(shard_file(e["shard"], manifest["shards"]) for e in manifest["layers"] if e["name"] in wanted))
        tensors = read_shard_files(path, manifest, files, keep=None if owners is None else
                                   lambda key: key == "ggn_PP" or key.rsplit("/", 1)[0] in wanted)
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise StorageError(f"{path}: tensor {key} holds NaN or inf values; fit the factors again "
                                   f"(ekfac-influence fit --overwrite)")
        tensors = unflatten_blocks(tensors)
        layers = []
        for entry in manifest["layers"]:
            fields = {key: tensors[f"{entry['name']}/{key}"] for key in LayerFactors.TENSORS
                      if f"{entry['name']}/{key}" in tensors}
            layers.append(LayerFactors(entry["name"], entry["out_dim"], entry["in_dim"], entry["damping"], **fields))
        factors = cls(
            strategy=manifest["strategy"],
            layers=layers,
            fingerprint=manifest["fingerprint"],
            config=config,
            num_sequences=manifest["num_sequences"],
            num_tokens=manifest["num_tokens"],
            ggn_PP=tensors.get("ggn_PP"),
            lissa_scale=manifest.get("lissa_scale"),
            meta=manifest.get("meta", {}),
            owners=owners,
        )
        if model is not None:
            check_factors_match(factors, model)
        return factors


class FactorMismatchError(ValueError):
    """Factors were fitted for another model or another set of layers."""


def check_factors_match(factors: Factors, model: nn.Module) -> list[TrackedLayer]:
    """The model's tracked layers for these factors; refuses factors of another model or layers."""
    by_name = {layer.name: layer for layer in candidate_layers(model)}
    missing = [name for name in factors.layer_names if name not in by_name]
    if missing:
        raise FactorMismatchError(f"factors were fitted for layers this model does not have: {', '.join(missing)}")
    layers = [by_name[name] for name in factors.layer_names]
    for layer, fitted in zip(layers, factors.layers):
        if (layer.out_features, layer.in_dim) != (fitted.out_dim, fitted.in_dim):
            raise FactorMismatchError(f"layer {layer.name} is {layer.out_features} × {layer.in_dim} here but "
                                      f"{fitted.out_dim} × {fitted.in_dim} in the factors")
    found = fingerprint(model, layers)
    if found != factors.fingerprint:
        raise FactorMismatchError(f"factors were fitted for another model (fingerprint {factors.fingerprint}, this "
                                  f"model's is {found}); fit factors for this model")
    return layers


def flatten_blocks(tensors: dict) -> dict[str, Tensor]:
    """Plain tensors for safetensors: a BlockDiagonal `key` becomes `key#0`, `key#1`, ..."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, BlockDiagonal):
            out.update({f"{key}#{i}": block for i, block in enumerate(value.blocks)})
        else:
            out[key] = value
    return out


def unflatten_blocks(tensors: dict[str, Tensor]) -> dict:
    """The inverse of `flatten_blocks`."""
    out, blocks = {}, {}
    for key, value in tensors.items():
        name, sep, index = key.rpartition("#")
        if sep and index.isdigit():
            blocks.setdefault(name, {})[int(index)] = value
        else:
            out[key] = value
    for name, found in blocks.items():
        out[name] = BlockDiagonal([found[i] for i in range(len(found))])
    return out
