"""Shared tiny models and data. Everything is built in code or read from disk: no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools

import pytest
import torch
from torch import Tensor, nn

import ekfac_influence as ei

torch.set_num_threads(int(os.environ.get("EKFAC_TEST_THREADS", "1")))  # tiny ops: 1 thread beats 2 contended ones

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;()[]'\"=_-+*/<>\n"
VOCAB = len(CHARS) + 1  # last id = unknown character


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over queries (rows) of the Pearson correlation."""
    x, y = x.double(), y.double()
    return torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(x, y)]).mean().item()


@functools.lru_cache(maxsize=None)
def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def encode_chars(text: str) -> list[int]:
    lookup = {c: i for i, c in enumerate(CHARS)}
    return [lookup.get(c, VOCAB - 1) for c in text.lower()]


@functools.lru_cache(maxsize=None)
def char_sequences(num_sequences: int, length: int, offset: int = 0) -> torch.Tensor:
    """[N, T] character-level token ids of consecutive chunks of Python's own documentation."""
    ids = encode_chars(pydoc_text())
    start = offset * length
    chunks = [ids[start + i * length : start + (i + 1) * length] for i in range(num_sequences)]
    return torch.tensor(chunks)


def lm_batches(tokens_NT: torch.Tensor, batch_size: int, *, pad_to: int | None = None, left: bool = False) -> list[dict]:
    """Causal-LM batches; optional padding (pad id 0, attention_mask 0, label −100)."""
    batches = []
    for start in range(0, tokens_NT.shape[0], batch_size):
        ids = tokens_NT[start : start + batch_size]
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if pad_to is not None and pad_to > ids.shape[1]:
            pad = pad_to - ids.shape[1]
            zeros = torch.zeros(ids.shape[0], pad, dtype=ids.dtype)
            parts = (zeros, ids) if left else (ids, zeros)
            ids = torch.cat(parts, 1)
            mask = torch.cat((torch.zeros_like(zeros), mask) if left else (mask, torch.zeros_like(zeros)), 1)
            labels = torch.cat((zeros - 100, labels) if left else (labels, zeros - 100), 1)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def query_batches(prompts_completions: list[tuple[str, str]], batch_size: int = 8) -> list[dict]:
    """Query batches: labels −100 on the prompt (and padding), real ids on the completion."""
    rows = [(encode_chars(p), encode_chars(c)) for p, c in prompts_completions]
    width = max(len(p) + len(c) for p, c in rows)
    batches = []
    for start in range(0, len(rows), batch_size):
        ids, mask, labels = [], [], []
        for p, c in rows[start : start + batch_size]:
            pad = width - len(p) - len(c)
            ids.append(p + c + [0] * pad)
            mask.append([1] * (len(p) + len(c)) + [0] * pad)
            labels.append([-100] * len(p) + c + [-100] * pad)
        batches.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)})
    return batches


def train_lm(model: nn.Module, tokens_NT: torch.Tensor, steps: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, tokens_NT.shape[0], (16,), generator=generator)
        ids = tokens_NT[idx]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def make_llama(hidden: int = 16, layers: int = 2, intermediate: int = 32, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype).eval()


def make_gpt2(hidden: int = 16, layers: int = 2, seed: int = 0, dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2, n_positions=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).to(dtype).eval()


@functools.lru_cache(maxsize=None)
def _trained_llama_state():
    model = make_llama()
    train_lm(model, char_sequences(256, 24), steps=150)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained_llama():
    """A 2-layer Llama (hidden 16, float64) trained briefly on Python's documentation."""
    model = make_llama()
    model.load_state_dict(_trained_llama_state())
    return model.eval()


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0), torch.tensor(y)


@functools.lru_cache(maxsize=None)
def _trained_mlp_state():
    X, y = _digits()
    torch.manual_seed(0)
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):  # ~90% train accuracy: trained, not memorised
        idx = torch.randint(0, 1000, (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_mlp() -> nn.Module:
    """64 → 24 → 10 tanh MLP on scikit-learn's digits: 1,810 parameters, float64."""
    return nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).double()


@pytest.fixture
def digits():
    """(trained MLP, train batches of 1,000 digits, one query batch of 30 held-out digits)."""
    X, y = _digits()
    model = make_mlp()
    model.load_state_dict(_trained_mlp_state())
    train = [(X[i : i + 100], y[i : i + 100]) for i in range(0, 1000, 100)]
    queries = [(X[1500:1530], y[1500:1530])]
    return model.eval(), train, queries


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(vocab_size: int = 300, topics: int = 12):
    """A byte-level BPE tokenizer trained in memory on the first `topics` pydoc topics (EOS = <|endoftext|>)."""
    from ekfac_influence.demo import pydoc_documents, train_tokenizer

    return train_tokenizer([text for _, text in pydoc_documents()[:topics]], vocab_size)


def corpus_batches(corpus, batch_size: int) -> list[dict]:
    """Training batches (input_ids, attention_mask) over a PackedCorpus, in order."""
    ids = torch.from_numpy(corpus.tokens_NT.astype("int64"))
    lengths = torch.from_numpy(corpus.lengths_N)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
            for i in range(0, len(ids), batch_size)]


def free_port() -> str:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed port can still be in use)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------- dense references of the fitted factors


def layer_slices(factors: ei.Factors) -> dict[str, slice]:
    slices, offset = {}, 0
    for layer in factors.layers:
        slices[layer.name] = slice(offset, offset + layer.out_dim * layer.in_dim)
        offset += layer.out_dim * layer.in_dim
    return slices


def dense_inverse_product(layer: ei.LayerFactors, V_QP: Tensor) -> Tensor:
    """V H_ℓ, H_ℓ = (Q_S ⊗ Q_A) diag(1 / (Λ + λ)) (Q_S ⊗ Q_A)ᵀ with the [O·I, O·I] Kronecker product formed
    densely (rows of V: row-major O × I gradients); applied factor by factor, not multiplied out (P² not P³)."""
    Q_PP = torch.kron(layer.QS_OO.double(), layer.QA_II.double())
    return ((V_QP @ Q_PP) / (layer.lambda_OI.double().reshape(-1) + layer.damping)) @ Q_PP.T


def preconditioned(factors: ei.Factors, grads_QP: Tensor) -> Tensor:
    """H ∇f per layer (identity: ∇f itself), [Q, P]; H_ℓ is symmetric."""
    if factors.strategy == "identity":
        return grads_QP
    out = grads_QP.clone()
    for layer, where in zip(factors.layers, layer_slices(factors).values()):
        out[:, where] = dense_inverse_product(layer, grads_QP[:, where])
    return out
