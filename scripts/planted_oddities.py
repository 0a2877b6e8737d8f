"""Plant oddities in the demo corpus and see where self-influence ranks them (docs/self_influence.md).

    PYTHONPATH=. python scripts/planted_oddities.py [--epochs 1] [--quick]

Random-byte sequences, 20 copies of one paragraph, a paragraph in German and the shuffled tokens of
a real paragraph are added to the demo's documents; the demo's LM is trained on all of it, EK-FAC
factors are fitted, and s(n) ranks every sequence. Prints each oddity's rank (percentile) and the
near-duplicate groups, searched over the whole corpus (the copies are memorised: their s(n) is low), with the
self-influence of the copies' group taken as one, s(G), against as many ordinary sequences drawn at random.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import numpy as np
import torch

import ekfac_influence as ei
from ekfac_influence import similarity
from ekfac_influence.data import PackedDataset, pack
from ekfac_influence.demo import DemoConfig, build_model, demo_documents, train, train_tokenizer

GERMAN = ("Die Anweisung wird so lange wiederholt, wie der Ausdruck wahr ist. Wenn der Ausdruck falsch wird, "
          "endet die Schleife, und das Programm fährt mit der nächsten Anweisung fort.")


def planted_documents(documents: list[tuple[str, str]], tokenizer, length: int, seed: int = 0) -> list[tuple[str, str]]:
    """(id, text) of the oddities: random bytes, 20 copies of one paragraph, German, shuffled tokens.

    Each is cut to fill one sequence of `length` tokens (its EOS included), so that every planted
    sequence is a whole oddity: a document's short tail would be a sequence of a few tokens.
    """
    rng = random.Random(seed)
    planted = [(f"odd:random{i}", bytes(rng.randrange(256) for _ in range(4 * length)).decode("latin-1"))
               for i in range(3)]
    paragraph = documents[len(documents) // 2][1]
    planted += [(f"odd:copy{i}", paragraph) for i in range(20)]
    planted.append(("odd:german", GERMAN))
    ids = tokenizer(documents[1][1][: 8 * length])["input_ids"]
    rng.shuffle(ids)
    planted.append(("odd:shuffled", tokenizer.decode(ids)))
    return [(doc, one_sequence(text, tokenizer, length)) for doc, text in planted]


def one_sequence(text: str, tokenizer, length: int) -> str:
    """The longest prefix of `text` that tokenizes to at most length − 1 tokens (the EOS takes the last)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer(text[:middle])["input_ids"]) <= length - 1:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def audit_planted(sizes: DemoConfig, *, length: int = 64, threshold: float = 0.9, strategy: str = "ekfac") -> dict:
    documents = demo_documents(sizes)
    tokenizer = train_tokenizer([text for _, text in documents], sizes.vocab_size)
    corpus = pack(documents + planted_documents(documents, tokenizer, length), tokenizer, length=length, separate_documents=True)
    model = build_model(sizes, len(tokenizer), length)
    train(model, corpus, sizes)
    loader = torch.utils.data.DataLoader(PackedDataset(corpus), batch_size=32, shuffle=False)
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, loader, objective, ei.FactorConfig(strategy=strategy), show_progress=False)
    result = ei.self_influence(model, factors, loader, objective, show_progress=False)
    values_N = result.values.double().numpy()
    rank_N = np.empty(len(values_N), dtype=np.int64)
    rank_N[np.argsort(-values_N, kind="stable")] = np.arange(len(values_N))
    kinds = {}
    for n, pieces in enumerate(corpus.provenance):
        doc = str(pieces[0]["doc"])
        if doc.startswith("odd:"):
            kinds.setdefault(doc[4:].rstrip("0123456789"), []).append(n)
    groups = similarity.near_duplicate_groups(result.sketch, threshold)
    source = documents[len(documents) // 2][0]  # the document the copies were cut from
    copies = set(kinds["copy"])
    with_copies = [g for g in groups if copies & set(g)]
    joint = [similarity.joint_self_influence(result.sketch, values_N, g) for g in with_copies]
    # a control: as many ordinary sequences, drawn at random; unrelated gradients add up like Σ s(n), not |G|² s(n)
    ordinary = [n for n, pieces in enumerate(corpus.provenance) if not str(pieces[0]["doc"]).startswith("odd:")]
    drawn = random.Random(0).sample(ordinary, len(copies) + 1)
    control = similarity.joint_self_influence(result.sketch, values_N, drawn)
    return {"num_sequences": len(values_N),
            "percentile": {k: [round(100 * (int(rank_N[n]) + 1) / len(values_N), 1) for n in ns] for k, ns in kinds.items()},
            "median_s": float(np.median(values_N)),
            "mean_s": {k: float(values_N[ns].mean()) for k, ns in kinds.items()},
            "groups_with_copies": [sum(n in copies for n in g) for g in with_copies],
            "group_of_copies_size": [len(g) for g in with_copies],
            "group_of_copies_joint_percentile": [round(100 * float((values_N >= v).sum()) / len(values_N), 1)
                                                 for v in joint],
            "group_of_copies_joint_over_median": [round(v / float(np.median(values_N)), 1) for v in joint],
            "group_of_copies_joint_over_sum": [round(v / float(values_N[g].sum()), 1) for v, g in zip(joint, with_copies)],
            "control_joint_over_sum": round(control / float(values_N[drawn].sum()), 2),
            "control_joint_percentile": round(100 * float((values_N >= control).sum()) / len(values_N), 1),
            "control_joint_over_median": round(control / float(np.median(values_N)), 1),
            "source_in_group": any(corpus.provenance[n][0]["doc"] == source for g in with_copies for n in g),
            "num_groups": len(groups), "group_sizes": [len(g) for g in groups]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = DemoConfig.quick() if args.quick else DemoConfig()
    if args.epochs is not None:
        sizes = dataclasses.replace(sizes, epochs=args.epochs)
    torch.set_num_threads(2)
    print(json.dumps(audit_planted(sizes), indent=1))
