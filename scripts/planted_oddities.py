"""Plant oddities in the demo corpus and see where self-influence ranks them (docs/self_influence.md).

    PYTHONPATH=. python scripts/planted_oddities.py [--epochs 1] [--quick]

Random-byte sequences, 20 copies of one paragraph, a paragraph in German and the shuffled tokens of
a real paragraph are added to the demo's documents; the demo's LM is trained on all of it, EK-FAC
factors are fitted, and s(n) ranks every sequence. Prints each oddity's rank (percentile) and the
near-duplicate groups among the top sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import numpy as np
import torch

import ekfac_influence as ei
from ekfac_influence import audit
from ekfac_influence.data import PackedDataset, pack
from ekfac_influence.demo import DemoConfig, build_model, demo_documents, train, train_tokenizer

GERMAN = ("Die Anweisung wird so lange wiederholt, wie der Ausdruck wahr ist. Wenn der Ausdruck falsch wird, "
          "endet die Schleife, und das Programm fährt mit der nächsten Anweisung fort.")


def planted_documents(documents: list[tuple[str, str]], tokenizer, seed: int = 0) -> list[tuple[str, str]]:
    """(id, text) of the oddities: random bytes, 20 copies of one paragraph, German, shuffled tokens."""
    rng = random.Random(seed)
    planted = [(f"odd:random{i}", bytes(rng.randrange(256) for _ in range(60)).decode("latin-1")) for i in range(3)]
    paragraph = documents[len(documents) // 2][1][:120]  # one sequence of 64 tokens
    planted += [(f"odd:copy{i}", paragraph) for i in range(20)]
    planted.append(("odd:german", GERMAN))
    ids = tokenizer(documents[1][1][:300])["input_ids"]
    rng.shuffle(ids)
    planted.append(("odd:shuffled", tokenizer.decode(ids)))
    return planted


def audit_planted(sizes: DemoConfig, *, length: int = 64, candidates: int = 200, threshold: float = 0.9,
                  strategy: str = "ekfac") -> dict:
    documents = demo_documents(sizes)
    tokenizer = train_tokenizer([text for _, text in documents], sizes.vocab_size)
    corpus = pack(documents + planted_documents(documents, tokenizer), tokenizer, length=length, separate_documents=True)
    model = build_model(sizes, len(tokenizer), length)
    train(model, corpus, sizes)
    loader = torch.utils.data.DataLoader(PackedDataset(corpus), batch_size=32, shuffle=False)
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, loader, objective, ei.FactorConfig(strategy=strategy), show_progress=False)
    values_N = ei.self_influence(model, factors, loader, objective, show_progress=False).values.double().numpy()
    rank_N = np.empty(len(values_N), dtype=np.int64)
    rank_N[np.argsort(-values_N, kind="stable")] = np.arange(len(values_N))
    kinds = {}
    for n, pieces in enumerate(corpus.provenance):
        doc = str(pieces[0]["doc"])
        if doc.startswith("odd:"):
            kinds.setdefault(doc[4:].rstrip("0123456789"), []).append(n)
    top = np.argsort(-values_N, kind="stable")[:candidates]
    W_CD = audit.whitened_gradients(model, factors, torch.utils.data.DataLoader(PackedDataset(corpus, top), batch_size=32),
                                    objective)
    groups = [[int(top[i]) for i in g] for g in audit.duplicate_groups(audit.cosine_matrix(W_CD), threshold)]
    copies = set(kinds["copy"])
    return {"num_sequences": len(values_N),
            "percentile": {k: [round(100 * (int(rank_N[n]) + 1) / len(values_N), 1) for n in ns] for k, ns in kinds.items()},
            "median_s": float(np.median(values_N)),
            "mean_s": {k: float(values_N[ns].mean()) for k, ns in kinds.items()},
            "copies_in_top": len(copies & set(top.tolist())),
            "groups_with_copies": [sum(n in copies for n in g) for g in groups if copies & set(g)],
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
