"""Training a small causal LM on a packed corpus: the demo's model, and the retraining the evaluation needs.

    tokenizer = train_tokenizer(texts, vocab_size=2048)            # byte-level BPE, trained in memory
    model = build_llama(len(tokenizer), hidden=128, layers=4, context=64, seed=0)
    train_lm(model, corpus.tokens_NT, corpus.lengths_N, LMTraining(epochs=8), indices=subset)

Data order: epoch e visits a permutation π_e of ALL N sequences, drawn from `LMTraining.seed`, and
keeps only the sequences in `indices`. Training on a subset S is therefore training on the whole
corpus with the sequences outside S taken out of the same order, from the same initialisation: how
the linear datamodeling score retrains (Park et al., 2023), so that the only difference between two
retrained models is their data. The loss of a batch is the mean over its real tokens (Hugging
Face's), optimised by AdamW under a one-cycle learning rate.

Shapes: N sequences, T positions, B batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LMTraining:
    """How `train_lm` trains: AdamW, one-cycle schedule, data order drawn from `seed`."""

    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    steps: int | None = None  # stop after this many AdamW steps (a fine-tune); None = `epochs` full epochs
    warmup: float = 0.1  # share of the steps spent raising the learning rate

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps: must be > 0 or None, got {self.steps}")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained in memory (no download); <pad> and <|endoftext|> (EOS) special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|endoftext|>")


def build_llama(vocab_size: int, *, hidden: int, layers: int, context: int, seed: int = 0) -> nn.Module:
    """A Llama-style LM (4 heads, MLP width 3 × hidden, tied embeddings), its weights drawn from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=context, tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(llama)


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A fresh model of the same architecture (a Hugging Face model's config), its weights drawn from `seed`."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    return fresh.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)


def epoch_orders(num_sequences: int, indices: Sequence[int] | None, batch_size: int, seed: int, steps: int):
    """The rows of each of `steps` batches: π_e restricted to `indices`, epoch after epoch (π_e drawn from `seed`)."""
    keep_N = np.ones(num_sequences, dtype=bool) if indices is None else np.zeros(num_sequences, dtype=bool)
    if indices is not None:
        keep_N[np.asarray(indices, dtype=np.int64)] = True
    if not keep_N.any():
        raise ValueError("no training sequence to train on: the subset is empty")
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(num_sequences, generator=generator).numpy()
        order = order[keep_N[order]]
        for start in range(0, len(order), batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


def train_lm(model: nn.Module, tokens_NT: np.ndarray, lengths_N: np.ndarray, config: LMTraining = LMTraining(), *,
             indices: Sequence[int] | None = None, log: Callable[[str], None] | None = None) -> float:
    """Train on the packed sequences (only `indices`, in the order of the whole corpus); the last epoch's mean loss."""
    ids_NT = torch.from_numpy(np.asarray(tokens_NT).astype("int64"))
    mask_NT = (torch.arange(ids_NT.shape[1])[None] < torch.from_numpy(np.asarray(lengths_N, dtype=np.int64))[:, None]).long()
    count = len(ids_NT) if indices is None else len(np.unique(np.asarray(indices)))
    per_epoch = math.ceil(count / config.batch_size)
    steps = config.steps if config.steps is not None else config.epochs * per_epoch
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=steps,
                                                   pct_start=config.warmup)
    model.train()
    total, seen, mean = 0.0, 0, float("nan")
    for step, rows in enumerate(epoch_orders(len(ids_NT), indices, config.batch_size, config.seed, steps), start=1):
        ids, mask = ids_NT[rows].to(device), mask_NT[rows].to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        total, seen = total + loss.item() * len(rows), seen + len(rows)
        if step % per_epoch == 0 or step == steps:
            mean, total, seen = total / seen, 0.0, 0
            if log is not None:
                log(f"  epoch {math.ceil(step / per_epoch)}/{math.ceil(steps / per_epoch)}: loss {mean:.3f}")
    model.eval()
    return mean
