"""The built-in demo: which documentation topics taught a small LM about Python?

Trains a small Llama-style LM on Python's own documentation (`pydoc_data.topics`, 79 topics, shipped
with every Python), fits EK-FAC factors on it, asks prompt/completion queries about Python, and
prints the most influential training sequences with the topic each comes from.

    ekfac-influence demo                 # about 3 minutes on 2 CPU cores
    python -m ekfac_influence demo --quick
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import distributed
from .config import FactorConfig, ScoreConfig, to_dict
from .factors import Factors
from .objectives import CausalLMObjective
from .pipeline import compute_scores, fit_factors
from .scores import top_k
from .storage import StorageError, atomic_write_text

QUERIES = [
    # (prompt, completion, the topics that teach the answer: "compound" repeats the text of every
    # compound statement, "while" and "try" included)
    ("Assert statements are a convenient way to", " insert debugging assertions into a program", ("assert",)),
    ("The while statement is used for", " repeated execution as long as an expression is true", ("while", "compound")),
    ("The import statement", " finds a module, loading and initializing it if necessary", ("import",)),
    ("The try statement specifies", " exception handlers and/or cleanup code for a group of statements", ("try", "compound")),
]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; `quick` shrinks everything for tests."""

    sequence_length: int = 64
    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 4
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    max_sequences: int | None = None

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(sequence_length=48, vocab_size=512, hidden=32, layers=2, epochs=1, max_sequences=200)


def pydoc_documents() -> list[tuple[str, str]]:
    """(topic, text) for the 79 topics of Python's documentation, in sorted order."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>")


def pack(documents: list[tuple[str, str]], tokenizer, length: int) -> tuple[torch.Tensor, list[dict]]:
    """Each document cut into sequences of `length` tokens (a short tail is dropped); provenance per sequence."""
    rows, provenance = [], []
    for topic, text in documents:
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        for start in range(0, len(ids) - length + 1, length):
            rows.append(ids[start : start + length])
            provenance.append({"topic": topic, "token_start": start,
                               "char_span": [offsets[start][0], offsets[start + length - 1][1]]})
    return torch.tensor(rows), provenance


def build_model(config: DemoConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=3 * config.hidden,
                        num_hidden_layers=config.layers, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=config.sequence_length, tie_word_embeddings=True)
    return LlamaForCausalLM(llama)


def train(model, tokens_NT: torch.Tensor, config: DemoConfig) -> float:
    """Plain AdamW epochs; returns the final epoch's mean loss per token."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    steps = config.epochs * ((len(tokens_NT) + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    mean = float("nan")
    for epoch in range(config.epochs):
        order = torch.randperm(len(tokens_NT), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            ids = tokens_NT[order[start : start + config.batch_size]]
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(ids)
        mean = total / len(tokens_NT)
        distributed.print0(f"  epoch {epoch + 1}/{config.epochs}: loss {mean:.3f}")
    model.eval()
    return mean


def query_batch(tokenizer, queries) -> dict:
    """Prompt and completion tokenized apart, so no token straddles the boundary; labels −100 on the prompt."""
    rows = [(tokenizer(p)["input_ids"], tokenizer(c)["input_ids"]) for p, c, _ in queries]
    width = max(len(p) + len(c) for p, c in rows)
    ids, mask, labels = [], [], []
    for p, c in rows:
        pad = width - len(p) - len(c)
        ids.append(p + c + [tokenizer.pad_token_id] * pad)
        mask.append([1] * (len(p) + len(c)) + [0] * pad)
        labels.append([-100] * len(p) + c + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def run_demo(out: str | Path = "runs/demo", *, config: DemoConfig = DemoConfig(), overwrite: bool = False, top: int = 5) -> dict:
    """Train, fit, query; write the run directory; print the top sequences. Returns the summary."""
    out = Path(out)
    if (out / "summary.json").exists() and not overwrite:
        raise StorageError(f"{out} already holds a finished demo; pass --overwrite or choose another --out")
    started = time.time()
    torch.manual_seed(config.seed)
    documents = pydoc_documents()
    tokenizer = train_tokenizer([text for _, text in documents], config.vocab_size)
    tokens_NT, provenance = pack(documents, tokenizer, config.sequence_length)
    if config.max_sequences is not None:
        keep = torch.randperm(len(tokens_NT), generator=torch.Generator().manual_seed(0))[: config.max_sequences].sort().values
        tokens_NT, provenance = tokens_NT[keep], [provenance[i] for i in keep.tolist()]
    distributed.print0(f"corpus: {len(documents)} topics of pydoc_data.topics -> {len(tokens_NT)} sequences of "
                       f"{config.sequence_length} tokens (BPE vocabulary {len(tokenizer)})")
    timings = {"data": time.time() - started}
    model = build_model(config, len(tokenizer))
    distributed.print0(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama-style LM")
    train(model, tokens_NT, config)
    timings["train"] = time.time() - started - sum(timings.values())

    batches = [{"input_ids": tokens_NT[i : i + config.batch_size]} for i in range(0, len(tokens_NT), config.batch_size)]
    objective = CausalLMObjective()
    factor_config = FactorConfig(strategy="ekfac", seed=config.seed)
    distributed.print0("fitting EK-FAC factors (covariances, eigendecomposition, eigenvalue correction)")
    factors = fit_factors(model, batches, objective, factor_config)
    timings["fit"] = time.time() - started - sum(timings.values())
    distributed.print0(f"scoring {len(tokens_NT)} training sequences for {len(QUERIES)} queries")
    score_config = ScoreConfig(per_layer=True)
    result = compute_scores(model, factors, [query_batch(tokenizer, QUERIES)], batches, objective, score_config)
    best = top_k(result, top)
    timings["score"] = time.time() - started - sum(timings.values())

    records, fractions = [], []
    for q, (prompt, completion, topics) in enumerate(QUERIES):
        hits = []
        for rank, (index, score) in enumerate(zip(best.positive_indices[q].tolist(), best.positive_scores[q].tolist())):
            hits.append({"rank": rank + 1, "sequence": index, "score": score, "delta_logp": score / result.num_train_sequences,
                         **provenance[index], "text": tokenizer.decode(tokens_NT[index])})
        fraction = sum(hit["topic"] in topics for hit in hits) / len(hits)
        fractions.append(fraction)
        records.append({"query": q, "prompt": prompt, "completion": completion, "expected_topics": list(topics),
                        "fraction_from_topic": fraction, "top": hits})
    summary = {"seconds": round(time.time() - started, 1), "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
               "num_sequences": len(tokens_NT),
               "mean_fraction_from_topic": sum(fractions) / len(fractions), "config": to_dict(config)}
    if distributed.is_main():
        _write_run(out, factors, result, records, summary, factor_config, score_config, overwrite)
        _print_results(records, summary, out)
    return summary


def _write_run(out: Path, factors: Factors, result, records, summary, factor_config, score_config, overwrite: bool) -> None:
    # run_demo refused a finished run without --overwrite; leftovers of an interrupted one are replaced
    factors.save(out / "factors", overwrite=True)
    queries = out / "queries" / "demo"
    queries.mkdir(parents=True, exist_ok=True)
    tensors = {"scores": result.scores.contiguous()}
    tensors.update({f"per_layer/{name}": value.contiguous() for name, value in (result.per_layer or {}).items()})
    tmp = queries / ".scores.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(queries / "scores.safetensors")
    atomic_write_text(queries / "topk.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / "manifest.json", json.dumps({"fingerprint": factors.fingerprint, "factors": to_dict(factor_config),
                                                         "scores": to_dict(score_config)}, indent=2))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


def _print_results(records, summary, out: Path) -> None:
    for record in records:
        print(f"\nquery {record['query']}: {record['prompt']!r} -> {record['completion']!r}")
        print(f"  top sequences from {' or '.join(record['expected_topics'])}: {record['fraction_from_topic']:.0%}")
        for hit in record["top"]:
            snippet = " ".join(hit["text"].split())[:70]
            print(f"  {hit['rank']}. score {hit['score']:+.3e}  [{hit['topic']}]  {snippet}")
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["stage_seconds"].items())
    print(f"\nmean fraction of top sequences from the query's topic: {summary['mean_fraction_from_topic']:.0%}")
    print(f"finished in {summary['seconds']:.0f} s ({stages}); results in {out}/ (queries/demo/topk.jsonl)")
