"""The demo's fraction of top sequences from each query's topic, by ranking (docs/accuracy.md).

    PYTHONPATH=. python scripts/normalize_topics.py [--run runs/demo] [--quick]

Runs the demo first when `--run` holds no finished demo, then answers the demo's queries again
with `query.normalize` = none, relatif and cosine (each under its own query-set name, so the
demo's own results stay as they are); then audits the corpus (`self-influence`) and answers with
relatif and cosine again, their pool now the best normalised candidates. Prints the mean fraction of
the top positive sequences that come from the query's expected topic, per ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ekfac_influence import run as stages
from ekfac_influence.demo import QUERIES, demo_run_config, main_topic, run_demo

RANKINGS = ("none", "relatif", "cosine")


def topic_fractions(run: Path, quick: bool) -> dict:
    """Per ranking: the mean fraction, and each query's. relatif and cosine twice: the rescored pool of the best
    raw candidates (no audit in the run), then of the best normalised ones (the run's self-influence audit)."""
    config = demo_run_config([("run", str(run))], quick=quick)
    if not (run / "summary.json").exists():
        run_demo(config, quick=quick, show_progress=False)
    expected = {q: topics for q, _, _, topics in QUERIES}

    def answer(kind: str, name: str) -> dict:
        variant = dataclasses.replace(config, query=dataclasses.replace(config.query, normalize=kind),
                                      queries=dataclasses.replace(config.queries, name=name))
        results = stages.query(variant, overwrite=True, show_progress=False)
        per_query = {}
        for record in results.records:
            topics = [main_topic(hit) for hit in record["top_positive"]]
            per_query[record["id"]] = sum(t in expected[record["id"]] for t in topics) / max(1, len(topics))
        return {"mean_fraction_from_topic": sum(per_query.values()) / len(per_query), "per_query": per_query}

    audit, aside = run / "self_influence", run / "self_influence.aside"
    if audit.exists():  # the raw pool first: the query stage uses an audit it finds
        audit.rename(aside)
    try:
        out = {kind: answer(kind, f"normalize-{kind}") for kind in RANKINGS}
    finally:
        if aside.exists():
            aside.rename(audit)
    if not audit.exists():
        stages.self_influence(config, show_progress=False)
    out.update({f"{kind}, pool by the audit": answer(kind, f"normalize-{kind}-audited") for kind in RANKINGS[1:]})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="the quick demo (a smaller model, 12 topics)")
    args = parser.parse_args()
    found = topic_fractions(Path(args.run), args.quick)
    print(json.dumps(found, indent=1))
    for kind, result in found.items():
        print(f"{kind:28s} mean fraction of top sequences from the query's topic: {result['mean_fraction_from_topic']:.1%}")
