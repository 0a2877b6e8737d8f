"""Query throughput: training tokens scored per second when 1, 16 or 128 queries share one pass.

A Llama-style LM built in code (float32; the demo's size by default) and Python's own documentation
(`pydoc_data.topics`) packed with a BPE tokenizer trained in memory into N sequences of T tokens.
For each Q it times `query_influence` (rank-32 scan of every sequence, no rescoring, so that the
figure is the shared pass itself) and, beside it, training steps (forward + backward + AdamW) over
the same N sequences in the same batches. It prints tokens/s of each and their ratio
(query time / training time), the unit the paper uses: a query pass costs about as much as an epoch.
The shared pass (the scan) is timed apart from the per-query work before it (query gradients,
preconditioning, rank-k compression), which does not grow with N. A last row adds the full-rank
rescoring of each query's 50 best and worst candidates (the default).

    python scripts/bench_query.py                   # N=128, T=128, about 3 minutes on 2 CPU cores
    python scripts/bench_query.py --quick           # smoke run
    python scripts/bench_query.py --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import numpy as np
import torch

import ekfac_influence as ei
from ekfac_influence.config import QueryConfig
from ekfac_influence.data import pack
from ekfac_influence.demo import pydoc_documents, train_tokenizer
from ekfac_influence.query import query_influence
from ekfac_influence.query_inputs import Query


def build(args):
    documents = pydoc_documents()
    tokenizer = train_tokenizer([text for _, text in documents], args.vocab)
    corpus = pack(documents, tokenizer, length=args.length)
    corpus = type(corpus)(corpus.tokens_NT[: args.sequences], corpus.lengths_N[: args.sequences],
                          corpus.provenance[: args.sequences], corpus.pad_token_id, corpus.tokenizer_id, corpus.corpus_id)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=args.length, tie_word_embeddings=True)).to(args.device).eval()
    return tokenizer, corpus, model


def batches(corpus, size: int, device: str) -> list[dict]:
    ids = torch.from_numpy(corpus.tokens_NT.astype("int64"))
    mask = (torch.arange(ids.shape[1])[None] < torch.from_numpy(np.asarray(corpus.lengths_N, dtype=np.int64))[:, None]).long()
    return [{"input_ids": ids[i : i + size].to(device), "attention_mask": mask[i : i + size].to(device)}
            for i in range(0, len(ids), size)]


def training_epoch(model, train: list[dict]) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    started = time.perf_counter()
    model.train()
    for batch in train:
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    _sync()
    return time.perf_counter() - started


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_queries(corpus, tokenizer, count: int) -> list[Query]:
    """Held-out-style queries: pieces of the corpus's own text split into prompt and completion."""
    queries = []
    for q in range(count):
        ids = corpus.tokens_NT[(q * 7919) % len(corpus)]
        text = tokenizer.decode(ids[:24].tolist())
        cut = len(text) // 2
        queries.append(Query(text[:cut] or "x", text[cut:] or " y", id=f"q{q}"))
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="N=32, T=64, Q = 1 and 16, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.length, args.queries, args.repeats = 32, 64, [1, 16], 1

    tokenizer, corpus, model = build(args)
    train = batches(corpus, args.batch_size, args.device)
    tokens = int(corpus.lengths_N.sum())
    factors = ei.fit_factors(model, train, ei.CausalLMObjective(), ei.FactorConfig(), show_progress=False)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"device {args.device}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama, "
          f"{len(factors.layers)} tracked MLP layers; N={len(corpus)} sequences of T={args.length} "
          f"({tokens} tokens), batch {args.batch_size}")
    trainee = copy.deepcopy(model)  # trained for the timing; the scored model stays as fitted
    training_epoch(trainee, train)  # warm-up
    rows = []
    settings = [(q, QueryConfig(rank=args.rank, rerank=0, top_k=5, batch_size=args.batch_size)) for q in args.queries]
    settings.append((max(args.queries), QueryConfig(rank=args.rank, rerank=50, top_k=5, batch_size=args.batch_size)))
    for count, config in settings:
        queries = make_queries(corpus, tokenizer, count)
        ratios, scan_ratios, epochs, scans, setups, rescores = [], [], [], [], [], []
        for _ in range(args.repeats):
            before = training_epoch(trainee, train)
            started = time.perf_counter()
            results = query_influence(model, tokenizer, factors, corpus, queries, config, show_progress=False)
            _sync()
            seconds = time.perf_counter() - started
            after = training_epoch(trainee, train)
            epoch = (before + after) / 2
            epochs.append(epoch)
            ratios.append(seconds / epoch)
            scan_ratios.append(results.seconds["scan"] / epoch)
            scans.append(results.seconds["scan"])
            setups.append(results.seconds["complete"] + results.seconds["precondition"])
            rescores.append(results.seconds["rescore"])
        label = f"Q={count}, rank {config.rank}" + (f", rescoring {config.rerank}+{config.rerank}" if config.rerank else "")
        rows.append((label, tokens / statistics.median(scans), tokens / statistics.median(epochs),
                     statistics.median(scan_ratios), min(scan_ratios), max(scan_ratios), statistics.median(setups) / count,
                     statistics.median(rescores), statistics.median(ratios)))
    print("\n| queries | scan: scored tokens/s | training tokens/s | scan time / training time (range) "
          "| per-query set-up, s | rescoring, s | whole query / training |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, scored, trained, ratio, low, high, setup, rescoring, whole in rows:
        print(f"| {label} | {scored:,.0f} | {trained:,.0f} | {ratio:.2f} ({low:.2f}–{high:.2f}) | {setup:.3f} | "
              f"{rescoring:.2f} | {whole:.2f} |")


if __name__ == "__main__":
    main()
