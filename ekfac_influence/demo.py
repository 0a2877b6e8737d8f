"""The built-in demo: which documentation topics taught a small LM about Python?

Trains a small Llama-style LM on Python's own documentation (`pydoc_data.topics`, 79 topics, shipped
with every Python), then runs the same stages a user runs on their own model and corpus: fit EK-FAC
factors, build the BM25 shortlist index, answer prompt/completion queries about Python, export the
review report. It prints the most influential training sequences with the topic each comes from,
and the fraction that come from the topic the query is about.

    ekfac-influence demo                      # about 3 minutes on 2 CPU cores
    ekfac-influence demo --quick              # a tiny variant for tests
    ekfac-influence demo --config configs/demo.yaml --query.rank 8
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from . import run as stages
from .run_config import RunConfig, load_run_config
from .storage import StorageError, atomic_write_text
from .train import LMTraining, build_llama, train_lm, train_tokenizer

QUERIES = [
    # (id, prompt, completion, the topics that teach the answer: "compound" repeats the text of every
    # compound statement, "while" and "try" included)
    ("assert", "Assert statements are a convenient way to", " insert debugging assertions into a program", ("assert",)),
    ("while", "The while statement is used for", " repeated execution as long as an expression is true", ("while", "compound")),
    ("import", "The import statement", " finds a module, loading and initializing it if necessary", ("import",)),
    ("try", "The try statement specifies", " exception handlers and/or cleanup code for a group of statements", ("try", "compound")),
]
DEFAULTS = {  # the stages' settings; configs/demo.yaml spells out the same
    "run": "runs/demo",
    "corpus": {"text_column": "text", "id_column": "topic", "length": 64, "separate_documents": True},
    "fit": {"batch_size": 32},
    "factors": {"strategy": "ekfac"},
    "queries": {"name": "demo"},
    "query": {"rank": 32, "rerank": 50, "top_k": 5, "candidates": "shortlist", "shortlist_k": 500, "batch_size": 32},
}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo's own model and its training; `quick` shrinks everything for tests."""

    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 4
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    topics: int | None = None  # None = all 79; else the queries' topics and the first others

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(vocab_size=512, hidden=32, layers=2, epochs=1, topics=12)


def demo_run_config(overrides: list[tuple[str, str]] = (), *, quick: bool = False) -> RunConfig:
    """The demo's RunConfig: DEFAULTS (as in configs/demo.yaml), then the command line's overrides."""
    import copy

    values = copy.deepcopy(DEFAULTS)
    if quick:
        values["query"].update(shortlist_k=100, rerank=10)
    for key, value in overrides:
        if key == "run":
            values["run"] = value
        else:
            section, name = key.split(".", 1)
            values.setdefault(section, {})[name] = value
    config = load_run_config(None, [(k, v) for k, v in _flatten(values)])
    return _with_demo_paths(config)


def _flatten(values: dict):
    for key, value in values.items():
        if isinstance(value, dict):
            for name, inner in value.items():
                yield f"{key}.{name}", inner
        else:
            yield key, value


def _with_demo_paths(config: RunConfig) -> RunConfig:
    """The demo writes its own model, corpus and queries inside the run directory."""
    import dataclasses

    run = Path(config.run)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, path=config.model.path or str(run / "model")),
        corpus=dataclasses.replace(config.corpus, path=config.corpus.path or str(run / "data" / "pydoc_topics.jsonl")),
        queries=dataclasses.replace(config.queries, file=config.queries.file or str(run / "data" / "queries.jsonl")),
    )


def pydoc_documents() -> list[tuple[str, str]]:
    """(topic, text) for the 79 topics of Python's documentation, in sorted order."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def build_model(config: DemoConfig, vocab_size: int, context: int):
    return build_llama(vocab_size, hidden=config.hidden, layers=config.layers, context=context, seed=config.seed)


def training(config: DemoConfig) -> LMTraining:
    """The demo model's training: its epochs, batch size, learning rate and seed (also the evaluation's defaults)."""
    return LMTraining(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                      seed=config.seed)


def train(model, corpus, config: DemoConfig) -> float:
    """Plain AdamW epochs over the packed sequences; returns the final epoch's mean loss per token."""
    return train_lm(model, corpus.tokens_NT, corpus.lengths_N, training(config), log=distributed.print0)


def run_demo(config: RunConfig | None = None, *, quick: bool = False, overwrite: bool = False,
             show_progress: bool = True) -> dict:
    """Train the demo LM, then fit, index, query and export like any run. Returns the summary."""
    config = _with_demo_paths(config or demo_run_config(quick=quick))
    sizes = DemoConfig.quick() if quick else DemoConfig()
    out = Path(config.run)
    _claim(out, overwrite)
    started, timings = time.time(), {}

    documents = demo_documents(sizes)
    if distributed.is_main():
        write_lines(Path(config.corpus.path), [{"topic": topic, "text": text} for topic, text in documents])
        write_lines(Path(config.queries.file), [{"id": q, "prompt": p, "completion": c} for q, p, c, _ in QUERIES])
        tokenizer = train_tokenizer([text for _, text in documents], sizes.vocab_size)
        tokenizer.save_pretrained(config.model.path)
    distributed.barrier()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.path, local_files_only=True)  # the same on every process
    corpus = stages.prepare_corpus(config, tokenizer, show_progress=show_progress)
    distributed.print0(f"corpus: {len(documents)} topics of pydoc_data.topics -> {len(corpus)} sequences of "
                       f"{config.corpus.length} tokens (BPE vocabulary {len(tokenizer)})")
    model = build_model(sizes, len(tokenizer), config.corpus.length)
    distributed.print0(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama-style LM")
    if distributed.is_main():
        train(model, corpus, sizes)
        model.save_pretrained(config.model.path)
    distributed.barrier()
    timings["train"] = time.time() - started

    for name, stage in (("fit", stages.fit), ("index", stages.index), ("query", stages.query)):
        distributed.print0(f"\n== {name}")
        mark = time.time()
        result = stage(config, show_progress=show_progress)
        timings[name] = time.time() - mark
    written = stages.export(config)
    summary = _summarize(result, config, corpus, started, timings)
    if distributed.is_main():
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        _print_outcome(summary, written)
    return summary


def _claim(out: Path, overwrite: bool) -> None:
    """Refuse a finished demo without --overwrite; never delete a directory that is not a demo run.

    The main process decides for all: it deletes while the others might still be looking.
    """
    refusal, restart = distributed.broadcast_object(_claim_verdict(out, overwrite) if distributed.is_main() else None)
    if refusal:
        raise StorageError(refusal)
    if restart:
        if distributed.is_main():
            shutil.rmtree(out)  # a demo run, finished (with --overwrite) or interrupted: start afresh
        distributed.barrier()


def _claim_verdict(out: Path, overwrite: bool) -> tuple[str | None, bool]:
    """(why `out` is refused, or None; whether to delete it first)."""
    if not out.exists() or not any(out.iterdir()):
        return None, False
    if (out / "summary.json").exists() and not overwrite:
        return f"{out} already holds a finished demo; pass --overwrite or choose another --out", False
    if not (out / "data" / "pydoc_topics.jsonl").exists():
        return f"{out} exists and is not a demo run; choose another --out", False
    return None, True


def demo_documents(sizes: DemoConfig) -> list[tuple[str, str]]:
    """The demo's (topic, text) documents: all 79, or the queries' topics and the first others up to `sizes.topics`."""
    documents = pydoc_documents()
    if sizes.topics is None:
        return documents
    needed = {topic for *_, topics in QUERIES for topic in topics}
    kept = [d for d in documents if d[0] in needed]
    kept += [d for d in documents if d[0] not in needed][: max(0, sizes.topics - len(kept))]
    return sorted(kept)


def write_lines(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def main_topic(hit: dict) -> str:
    """The document that holds most of a sequence's tokens."""
    return max(hit["provenance"], key=lambda p: p["token_span"][1] - p["token_span"][0])["doc"]


def _summarize(results, config: RunConfig, corpus, started: float, timings: dict) -> dict:
    expected = {q: topics for q, _, _, topics in QUERIES}
    per_query = {}
    for record in results.records:
        topics = [main_topic(hit) for hit in record["top_positive"]]
        fraction = sum(t in expected[record["id"]] for t in topics) / max(1, len(topics))
        per_query[record["id"]] = {"expected_topics": list(expected[record["id"]]), "top_topics": topics,
                                   "fraction_from_topic": fraction}
    mean = sum(q["fraction_from_topic"] for q in per_query.values()) / len(per_query)
    return {"seconds": round(time.time() - started, 1), "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "num_sequences": len(corpus), "mean_fraction_from_topic": mean, "queries": per_query,
            "run": config.run}


def _print_outcome(summary: dict, written: dict) -> None:
    print("\n== outcome")
    for query_id, outcome in summary["queries"].items():
        print(f"  {query_id}: {outcome['fraction_from_topic']:.0%} of the top sequences come from "
              f"{' or '.join(outcome['expected_topics'])}  (top topics: {', '.join(outcome['top_topics'])})")
    print(f"mean fraction of top sequences from the query's topic: {summary['mean_fraction_from_topic']:.0%}")
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["stage_seconds"].items())
    report = written.get("html", Path(summary["run"]) / "queries" / "demo")
    print(f"finished in {summary['seconds']:.0f} s ({stages}); open the report: {report}")
