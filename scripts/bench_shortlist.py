"""Shortlist benchmark: build, store and query a BM25 index over a million synthetic sequences.

A synthetic corpus: `--sequences` sequences of `--length` tokens drawn i.i.d. from a Zipf law
(p(rank r) ∝ r^−s, s = `--zipf`) over a `--vocab`-token vocabulary, ranks shuffled onto token ids,
seeded. It is generated chunk by chunk while the index reads it (never all in memory) and streamed
into `ShortlistIndex.build`. The script prints

    build        sequences/s (corpus generation time excluded and shown apart), distinct pairs (nnz)
    memory       peak resident set (ru_maxrss) against the build's bound: 8 bytes per distinct (sequence,
                 token) pair (nnz) for bm25, 16 for tfidf, + one segment (~200 MB) + one chunk (~40 MB)
    disk         index size, save and load (checksums verified) times
    query        latency of search_batch for 1 and for 100 queries of 50-100 tokens drawn from the same
                 law, top-k = `--k`, median (and range) over `--repeats` runs on fresh queries

Run from the repository root (the full run: about a minute and 3.3 GB of memory on 2 CPU cores;
figures in docs/benchmarks_shortlist.md):

    python scripts/bench_shortlist.py                          # 1,000,000 × 512 tokens, vocabulary 49,152
    python scripts/bench_shortlist.py --quick                  # 20,000 sequences: a smoke test, seconds
    python scripts/bench_shortlist.py --weighting tfidf --quick
    python scripts/bench_shortlist.py --out /data/bench --keep # keep the index in /data/bench/shortlist_index

The module is loaded from its file, not through the package, so that the package's torch import
does not count in the memory figures (shortlist.py itself needs only numpy, scipy and tqdm).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy

SHORTLIST_FILE = Path(__file__).resolve().parents[1] / "ekfac_influence" / "shortlist.py"
TABLE_BITS = 24  # the Zipf sampler's lookup table: 2^24 slots, the rarest token still gets ~30


def load_shortlist_module():
    spec = importlib.util.spec_from_file_location("ekfac_influence_shortlist", SHORTLIST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_mib() -> float:
    """Current resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: /proc/self/clear_refs), so ru_maxrss covers what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class ZipfTokens:
    """i.i.d. tokens with p(rank r) ∝ r^−s, sampled through an inverse-CDF lookup table."""

    def __init__(self, vocab: int, exponent: float, seed: int):
        rng = np.random.default_rng(seed)
        p_V = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
        cdf_V = np.cumsum(p_V / p_V.sum())
        token_of_rank = rng.permutation(vocab).astype(np.int32)  # ranks shuffled onto token ids
        self.table = np.empty(2**TABLE_BITS, dtype=np.int32)
        for start in range(0, 2**TABLE_BITS, 2**20):  # in blocks: no large temporaries
            slots = (np.arange(start, start + 2**20) + 0.5) / 2**TABLE_BITS
            self.table[start:start + 2**20] = token_of_rank[np.minimum(np.searchsorted(cdf_V, slots), vocab - 1)]

    def sample(self, rng: np.random.Generator, shape) -> np.ndarray:
        return self.table[rng.integers(0, 2**TABLE_BITS, size=shape)]


def corpus(tokens: ZipfTokens, sequences: int, length: int, chunk: int, seed: int, clock: list[float]):
    """Yield `sequences` rows of `length` tokens, generated `chunk` at a time; time spent adds to clock[0]."""
    rng = np.random.default_rng(seed)
    for start in range(0, sequences, chunk):
        began = time.perf_counter()
        block_nT = tokens.sample(rng, (min(chunk, sequences - start), length))
        clock[0] += time.perf_counter() - began
        yield from block_nT


def time_queries(index, tokens: ZipfTokens, rng, num_queries: int, k: int, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        queries = [tokens.sample(rng, int(rng.integers(50, 101))) for _ in range(num_queries)]
        began = time.perf_counter()
        ids_QK, _ = index.search_batch(queries, k)
        seconds.append(time.perf_counter() - began)
        assert ids_QK.shape == (num_queries, min(k, len(index)))
    return seconds


def directory_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1_000_000)
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s")
    parser.add_argument("--chunk-size", type=int, default=None, help="sequences per build chunk (default: the library's)")
    parser.add_argument("--weighting", choices=["bm25", "tfidf"], default="bm25")
    parser.add_argument("--k", type=int, default=10_000, help="top-k per query (docs/design.md: 10,000 candidates)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per query measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory for the index (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the saved index")
    parser.add_argument("--quick", action="store_true", help="20,000 sequences: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sequences = 20_000

    shortlist = load_shortlist_module()
    chunk_size = args.chunk_size or shortlist.DEFAULT_CHUNK_SIZE
    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    print(f"corpus: {args.sequences:,} sequences × {args.length} tokens, vocabulary {args.vocab:,}, Zipf s={args.zipf}, "
          f"seed {args.seed}; weighting {args.weighting}, chunk {chunk_size}")

    tokens = ZipfTokens(args.vocab, args.zipf, args.seed)
    baseline_mib = rss_mib()
    reset = reset_peak_rss()
    clock = [0.0]
    began = time.perf_counter()
    index = shortlist.ShortlistIndex.build(
        corpus(tokens, args.sequences, args.length, chunk_size, args.seed + 1, clock), weighting=args.weighting,
        chunk_size=chunk_size, vocab_size=args.vocab, tokenizer_id="synthetic-zipf", corpus_id=f"seed-{args.seed}")
    build_s = time.perf_counter() - began
    index_s = build_s - clock[0]
    peak_build_mib = peak_rss_mib()
    nnz = index.nnz
    # The build's bound: the pairs sequence-major (as read) and term-major (as stored), 4 B each per
    # pair for bm25 (+ 4 B counts and 4 B weights for tfidf); per-sequence and per-term arrays; one
    # segment being merged or transposed (~24 B per pair of SEGMENT_PAIRS); one chunk being read
    # (~40 B per token: int64 tokens, their sequence ids, the sorted block and masks).
    bytes_per_nnz = 8 if args.weighting == "bm25" else 16
    segment_mib = (24 if args.weighting == "bm25" else 48) * shortlist.SEGMENT_PAIRS / 2**20  # tfidf: float64 weights too
    chunk_mib = 40 * chunk_size * args.length / 2**20
    bound_mib = baseline_mib + (bytes_per_nnz * nnz + 16 * (args.sequences + args.vocab)) / 2**20 + segment_mib + chunk_mib
    weights = index.term_weights if index.weighting == "bm25" else index.data  # bm25: one weight per term
    resident_mib = (index.indices.nbytes + weights.nbytes + index.indptr.nbytes + index.idf.nbytes) / 2**20
    print(f"\nbuild: {build_s:.1f} s in all, {clock[0]:.1f} s of it generating the corpus; index {index_s:.1f} s = "
          f"{args.sequences / index_s:,.0f} sequences/s ({args.sequences * args.length / index_s / 1e6:.1f} M tokens/s)")
    print(f"index: nnz {nnz:,} ({nnz / args.sequences:.1f} distinct tokens per sequence), in memory {resident_mib:,.0f} MiB")
    caveat = "" if reset else " (could not reset the mark: includes the set-up)"
    print(f"memory: peak RSS during the build {peak_build_mib:,.0f} MiB{caveat}; before the build {baseline_mib:,.0f} MiB; bound "
          f"{bound_mib:,.0f} MiB = before + {bytes_per_nnz} B × nnz + 16 B × (N + V) + one segment ({segment_mib:.0f} MiB) "
          f"+ one chunk ({chunk_mib:.0f} MiB)")

    temporary = args.out is None
    root = Path(tempfile.mkdtemp(prefix="bench_shortlist_")) if temporary else args.out
    path = root / "shortlist_index"
    try:
        began = time.perf_counter()
        index.save(path, overwrite=True)
        save_s = time.perf_counter() - began
        del index
        began = time.perf_counter()
        index = shortlist.ShortlistIndex.load(path, tokenizer_id="synthetic-zipf")
        load_s = time.perf_counter() - began
        print(f"disk: {directory_mib(path):,.0f} MiB in {path}; save {save_s:.1f} s, load (sha256 verified) {load_s:.1f} s")

        rng = np.random.default_rng(args.seed + 2)
        time_queries(index, tokens, rng, 1, args.k, 1)  # warm up
        for num_queries, repeats in ((1, args.repeats), (100, max(1, min(args.repeats, 3)))):
            seconds = time_queries(index, tokens, rng, num_queries, args.k, repeats)
            print(f"query: {num_queries:>3} per batch, top-{args.k:,}: median {statistics.median(seconds) * 1000:,.0f} ms "
                  f"(range {min(seconds) * 1000:,.0f}-{max(seconds) * 1000:,.0f} ms, {repeats} runs), "
                  f"{statistics.median(seconds) / num_queries * 1000:,.0f} ms per query")
        print(f"memory: peak RSS over the whole run {peak_rss_mib():,.0f} MiB")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            if temporary:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
