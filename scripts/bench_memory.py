"""Peak memory of `index` and a shortlisted `query` over a corpus of a million sequences: what grows with N?

A tiny Llama (BPE tokenizer of 512 tokens trained on Python's documentation, 2 blocks of width 32) and
its factors, fitted on the documentation itself; then the run's packed corpus is replaced by N
synthetic sequences of T tokens (Zipf-distributed ids, written chunk by chunk, never all in memory),
and each stage runs in its own process through the CLI (`ekfac_influence.cli.main`), which reports

    rss        peak resident set of the process (resource.getrusage ru_maxrss), imports and model included
    above      rss minus a baseline process that imports the same modules and loads the model, nothing else
    python     tracemalloc's peak of Python and numpy allocations during the stage (not torch's, not mmaps)

at every N of `--sequences` (default 100,000 and 1,000,000), and the growth per sequence between the
two largest: bytes of memory each added training sequence costs the stage. Memory maps (tokens.bin,
the scores file) count in rss only for the pages touched, and are not allocations.

    python scripts/bench_memory.py                          # N = 100,000 and 1,000,000, T = 16: ~5 min on 2 cores
    python scripts/bench_memory.py --sequences 20000 --quick  # a smoke test
    python scripts/bench_memory.py --out /tmp/bench_memory --keep

Figures: docs/benchmarks.md ("Memory under load").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, resource, sys, time, tracemalloc
argv, baseline = json.loads(sys.argv[1]), sys.argv[2] == "baseline"
import ekfac_influence.run, ekfac_influence.query, ekfac_influence.shortlist  # what every stage imports
from ekfac_influence.cli import main
if baseline:
    from ekfac_influence.model import load_causal_lm
    tracemalloc.start()
    load_causal_lm(argv[0])
    code = 0
else:
    tracemalloc.start()
    started = time.perf_counter()
    code = main(argv)
_, peak = tracemalloc.get_traced_memory()
print("MEASURED " + json.dumps({"code": code, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                "python": peak}))
"""


def measure(argv: list[str], cwd: Path, baseline: bool = False) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(argv), "baseline" if baseline else "stage"],
                          cwd=cwd, env=env, capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("MEASURED ")), None)
    if line is None or json.loads(line[9:])["code"] != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return dict(json.loads(line[9:]), seconds=time.perf_counter() - started)


def make_model(work: Path, length: int) -> None:
    from ekfac_influence.demo import pydoc_documents
    from ekfac_influence.train import build_llama, train_tokenizer

    documents = pydoc_documents()
    tokenizer = train_tokenizer([text for _, text in documents], 512)
    build_llama(len(tokenizer), hidden=32, layers=2, context=length).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    with open(work / "docs.jsonl", "w") as handle:
        for topic, text in documents:
            handle.write(json.dumps({"topic": topic, "text": text}) + "\n")
    (work / "queries.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "completion": c}) + "\n" for i, (p, c)
                                                in enumerate([("The assert statement", " is a debugging aid"),
                                                              ("A for loop", " iterates over a sequence"),
                                                              ("The import statement", " loads a module"),
                                                              ("A class", " defines new objects")])))


def synthetic_corpus(path: Path, tokenizer_dir: Path, num_sequences: int, length: int, corpus_config: dict,
                     seed: int = 0, chunk: int = 50_000) -> None:
    """N sequences of Zipf-distributed token ids (lengths length/2..length) written as a packed corpus, chunk by chunk."""
    from transformers import AutoTokenizer

    from ekfac_influence.data import (LENGTHS_FILE, OFFSETS_FILE, PROVENANCE_FILE, TOKENS_FILE, _write_manifest,
                                      pad_token_id, tokenizer_id)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab, pad = len(tokenizer), pad_token_id(tokenizer)
    rng = np.random.default_rng(seed)
    p_V = 1.0 / np.arange(1, vocab) ** 1.1
    p_V /= p_V.sum()
    ranks = rng.permutation(np.arange(1, vocab))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    with open(path / TOKENS_FILE, "wb") as tokens, open(path / LENGTHS_FILE, "wb") as lengths, \
            open(path / PROVENANCE_FILE, "wb") as provenance, open(path / OFFSETS_FILE, "wb") as offsets:
        for first in range(0, num_sequences, chunk):
            n = min(chunk, num_sequences - first)
            ids_nT = ranks[rng.choice(vocab - 1, size=(n, length), p=p_V)].astype(np.int32)
            real_n = rng.integers(length // 2, length + 1, size=n).astype(np.int32)
            ids_nT[np.arange(length)[None, :] >= real_n[:, None]] = pad
            tokens.write(ids_nT.tobytes())
            lengths.write(real_n.tobytes())
            lines = [(json.dumps({"sequence": first + i, "length": int(real_n[i]), "pieces": [
                {"doc": f"synthetic-{first + i}", "row": first + i, "token_span": [0, int(real_n[i])],
                 "char_span": [0, 0]}]}) + "\n").encode() for i in range(n)]
            starts = provenance.tell() + np.concatenate([[0], np.cumsum([len(line) for line in lines])[:-1]])
            offsets.write(starts.astype(np.int64).tobytes())
            provenance.write(b"".join(lines))
    _write_manifest(path, num_sequences, length, pad, tokenizer_id(tokenizer),
                    {"corpus": corpus_config, "source": {"sha256": f"synthetic-{num_sequences}-{seed}", "files": []}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", default="100000,1000000", help="comma-separated corpus sizes N")
    parser.add_argument("--length", type=int, default=16, help="tokens per sequence T")
    parser.add_argument("--shortlist-k", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="smaller shortlist (smoke test)")
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sequences.split(",")]
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_memory."))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from ekfac_influence.config import to_dict
    from ekfac_influence.run_config import CorpusConfig

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}; work in {work}")
    make_model(work, args.length)
    missing = str(work / "synthetic-corpus-not-at-hand.jsonl")  # the packed corpus is used as it is
    common = ["--model.path", "model", "--corpus.length", str(args.length), "--quiet"]
    small = measure(["fit", "--run", "fitted", "--corpus.path", "docs.jsonl", "--fit.batch_size", "16", "--corpus.max_documents", "4", *common], work)
    print(f"factors fitted on the documentation ({small['seconds']:.0f} s)")
    base = measure([str(work / "model")], work, baseline=True)
    print(f"baseline (imports + model): rss {base['rss'] / 2**20:.0f} MiB")
    rows = []
    for N in sizes:
        run = work / f"run{N}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        shutil.copytree(work / "fitted" / "factors", run / "factors")
        started = time.perf_counter()
        synthetic_corpus(run / "corpus", work / "model", N, args.length,
                         to_dict(CorpusConfig(path=missing, length=args.length)))
        print(f"N = {N:,}: synthetic corpus written ({time.perf_counter() - started:.0f} s, "
              f"{sum(f.stat().st_size for f in (run / 'corpus').iterdir()) / 2**20:.0f} MiB)")
        for stage, extra in (("index", ["--corpus.path", missing, "--corpus.length", str(args.length)]),
                             ("query", ["--queries.file", "queries.jsonl", "--queries.name", "bench",
                                        "--query.candidates", "shortlist", "--query.shortlist_k",
                                        str(20 if args.quick else args.shortlist_k), "--query.rank", "8",
                                        "--query.rerank", "10", "--query.top_k", "5", "--query.max_new_tokens", "4"])):
            argv = [stage, "--run", str(run), "--model.path", "model", "--quiet", *extra]
            found = measure(argv, work)
            rows.append((N, stage, found))
            print(f"  {stage:6s} rss {found['rss'] / 2**20:7.0f} MiB  above baseline {(found['rss'] - base['rss']) / 2**20:6.0f} "
                  f"MiB  python peak {found['python'] / 2**20:7.1f} MiB  ({found['seconds']:.0f} s)")
        if not args.keep:
            shutil.rmtree(run)
    if len(sizes) >= 2:
        low, high = sorted(sizes)[-2:]
        print(f"growth per sequence between N = {low:,} and {high:,}:")
        for stage in ("index", "query"):
            a = next(f for n, s, f in rows if n == low and s == stage)
            b = next(f for n, s, f in rows if n == high and s == stage)
            print(f"  {stage:6s} rss {(b['rss'] - a['rss']) / (high - low):6.1f} B/sequence, python peak "
                  f"{(b['python'] - a['python']) / (high - low):6.1f} B/sequence")
    if not args.keep and not args.out:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
