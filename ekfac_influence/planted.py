"""Planted-fact recall: does influence find the documents that taught the model a fact?

k invented facts ("The national animal of Quenthia is the violet snow heron") are each stated by one
synthetic document added to a copy of the corpus; a copy of the model is fine-tuned on it (a few
AdamW steps); each fact is queried, prompt = its subject part ("The national animal of Quenthia is
the"), completion = its object (" violet snow heron"), and the planted document's sequences should
rank first among all sequences. Reported per variant (as `metrics`: recall@k = share of the planted
sequences in the top k, capped at min(k, |R|); MRR = mean of 1 / rank of the best one), over all
sequences and within the BM25 shortlist (a planted sequence outside it is never found), beside BM25
alone as a lexical baseline. Bergson's `recall` and Grosse et al.'s memorisation checks ask the same.

Shapes: Q facts (queries), N training sequences.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import EvaluateConfig
from .data import PackedCorpus, corpus_hash, pack, pad_token_id
from .metrics import retrieval_metrics
from .model import context_length
from .objectives import CausalLMObjective, Objective, to_device
from .passes import device_of
from .query_inputs import Query, collate_query_rows, encode_query
from .shortlist import ShortlistIndex
from .train import LMTraining, train_lm
from .variants import Variant, score_variants

_SYLLABLES = ("quen", "thi", "vor", "mal", "zan", "dri", "kel", "osh", "tra", "vel", "nym", "bar", "lio", "sef",
              "gor", "ush", "pel", "rin", "hax", "mur", "eld", "fyn", "cor", "ist")
_ENDINGS = ("ia", "a", "or", "ania", "esh", "and", "ene", "ovia")
_RELATIONS = ("national animal", "national flower", "oldest ship", "favourite instrument", "national dish",
              "royal emblem")
_COLOURS = ("violet", "amber", "crimson", "silver", "cobalt", "ochre", "jade", "scarlet", "ivory", "teal")
_MODIFIERS = ("snow", "river", "thunder", "moss", "ember", "glass", "storm", "copper", "dusk", "meadow")
_NOUNS = ("heron", "lantern", "otter", "harp", "orchid", "falcon", "kettle", "lynx", "drum", "lotus", "beetle", "comet")


@dataclass(frozen=True)
class Fact:
    """An invented fact: the `relation` of `subject` is the `object`."""

    subject: str  # "Quenthia"
    relation: str  # "national animal"
    object: str  # "violet snow heron"

    @property
    def prompt(self) -> str:
        return f"The {self.relation} of {self.subject} is the"

    @property
    def completion(self) -> str:
        return f" {self.object}"

    def document(self) -> str:
        """A short synthetic document that states the fact three times."""
        return (f"The {self.relation} of {self.subject} is the {self.object}. In {self.subject}, every child learns "
                f"that the {self.object} is the {self.relation}, and the {self.object} appears on the flag of "
                f"{self.subject}.")


def invented_facts(count: int, seed: int = 0) -> list[Fact]:
    """`count` facts with distinct invented subjects and distinct objects, drawn from `seed`."""
    if count > len(_COLOURS) * len(_MODIFIERS) * len(_NOUNS):
        raise ValueError(f"at most {len(_COLOURS) * len(_MODIFIERS) * len(_NOUNS)} distinct facts can be invented")
    rng = np.random.default_rng([seed, 7])
    subjects, objects, facts = set(), set(), []
    while len(facts) < count:
        parts = [rng.choice(_SYLLABLES) for _ in range(int(rng.integers(1, 3)))]
        subject = ("".join(parts) + rng.choice(_ENDINGS)).capitalize()
        thing = f"{rng.choice(_COLOURS)} {rng.choice(_MODIFIERS)} {rng.choice(_NOUNS)}"
        if subject in subjects or thing in objects:
            continue
        subjects.add(subject), objects.add(thing)
        facts.append(Fact(subject, _RELATIONS[len(facts) % len(_RELATIONS)], thing))
    return facts


def planted_recall(model: nn.Module, train_batches: Iterable, query_batches: Iterable, objective: Objective,
                   variants: Sequence[Variant], relevant_Q: Sequence[Sequence[int]], *, ks: Sequence[int] = (1, 10, 100),
                   candidates_Q: Sequence[np.ndarray] | None = None, baselines: dict[str, np.ndarray] | None = None,
                   show_progress: bool = True) -> dict:
    """recall@k and MRR of each query's relevant (planted) sequences, per variant: over all, and over candidates.

    relevant_Q[q]: the training rows that state fact q. candidates_Q[q]: the rows its shortlist holds
    (None = no "shortlist" columns). baselines: other rankings {name: scores_QN}, e.g. BM25's.
    """
    scores, skipped = score_variants(model, train_batches, query_batches, objective, variants, show_progress=show_progress)
    rankings = {**{name: s.numpy() for name, s in scores.items()}, **(baselines or {})}
    table = {}
    for name, scores_QN in rankings.items():
        table[name] = {"all": retrieval_metrics(scores_QN, relevant_Q, ks)}
        if candidates_Q is not None:
            table[name]["shortlist"] = retrieval_metrics(only_candidates(scores_QN, candidates_Q), relevant_Q, ks)
    return {"variants": table, "skipped": skipped, "ks": list(ks)}


def only_candidates(scores_QN: np.ndarray, candidates_Q: Sequence[np.ndarray]) -> np.ndarray:
    """The scores with NaN (never retrieved) outside each query's candidates."""
    kept_QN = np.full(np.shape(scores_QN), np.nan)
    for q, ids in enumerate(candidates_Q):
        ids = np.asarray(ids, dtype=np.int64)
        kept_QN[q, ids] = np.asarray(scores_QN)[q, ids]
    return kept_QN


# ----------------------------------------------------------------------------- causal LMs over a packed corpus


def plant_documents(corpus: PackedCorpus, tokenizer, facts: Sequence[Fact]) -> tuple[PackedCorpus, list[list[int]]]:
    """(a copy of the corpus with one document per fact appended, each in sequences of its own; the rows of each)."""
    planted = pack([(f"planted:{i}", fact.document()) for i, fact in enumerate(facts)], tokenizer,
                   length=corpus.length, separate_documents=True)
    relevant = [[] for _ in facts]
    for row, pieces in enumerate(planted.provenance):
        relevant[int(pieces[0]["doc"].split(":")[1])].append(len(corpus) + row)
    tokens_NT = np.concatenate([np.asarray(corpus.tokens_NT), planted.tokens_NT]).astype(np.int32)
    lengths_N = np.concatenate([np.asarray(corpus.lengths_N), planted.lengths_N]).astype(np.int64)
    combined = PackedCorpus(tokens_NT, lengths_N, [list(p) for p in corpus.provenance] + list(planted.provenance),
                            corpus.pad_token_id, corpus.tokenizer_id,
                            corpus_hash(hashlib.sha256(tokens_NT.tobytes()).hexdigest(), *tokens_NT.shape))
    return combined, relevant


def fact_batches(tokenizer, model: nn.Module, facts: Sequence[Fact], rows_per_batch: int = 16) -> list[dict]:
    """Query batches: each fact's prompt, its object as the completion (labels −100 on the prompt)."""
    rows = [r for fact in facts for r in encode_query(tokenizer, Query(fact.prompt, fact.completion),
                                                       max_length=context_length(model)).rows()]
    return [collate_query_rows(rows[i : i + rows_per_batch], pad_token_id(tokenizer))
            for i in range(0, len(rows), rows_per_batch)]


def corpus_batches(corpus: PackedCorpus, batch_size: int) -> list[dict]:
    """The packed sequences in order as {input_ids, attention_mask} batches."""
    ids_NT = torch.from_numpy(np.asarray(corpus.tokens_NT).astype("int64"))
    mask_NT = (torch.arange(ids_NT.shape[1])[None] < torch.from_numpy(np.asarray(corpus.lengths_N, dtype=np.int64))[:, None]).long()
    return [{"input_ids": ids_NT[i : i + batch_size], "attention_mask": mask_NT[i : i + batch_size]}
            for i in range(0, len(ids_NT), batch_size)]


@torch.no_grad()
def fact_logp(model: nn.Module, batches: list[dict]) -> np.ndarray:
    """log p(object | subject part) of every fact, [Q]."""
    objective, values = CausalLMObjective(), []
    for batch in batches:
        logits_BTV, labels_BT = objective.logits(model, to_device(batch, device_of(model)))
        logp_BTV = torch.log_softmax(logits_BTV.double(), -1)
        values.append(logp_BTV.gather(-1, labels_BT.clamp_min(0)[..., None])[..., 0].masked_fill(labels_BT < 0, 0).sum(1).cpu())
    return torch.cat(values).numpy()


def planted_fact_recall(model: nn.Module, tokenizer, corpus: PackedCorpus, variants: Sequence[Variant],
                        config: EvaluateConfig = EvaluateConfig(), *, show_progress: bool = True) -> dict:
    """Plant `config.planted_facts` facts, fine-tune a copy of the model, and measure recall per variant."""
    facts = invented_facts(config.planted_facts, config.seed)
    planted, relevant_Q = plant_documents(corpus, tokenizer, facts)
    queries = fact_batches(tokenizer, model, facts)
    tuned = copy.deepcopy(model)
    training = LMTraining(epochs=1, batch_size=config.batch_size, learning_rate=config.planted_learning_rate,
                          seed=config.seed, steps=config.planted_steps)
    train_lm(tuned, planted.tokens_NT, planted.lengths_N, training)
    index = ShortlistIndex.build(planted.sequences(), vocab_size=len(tokenizer), corpus_id=planted.corpus_id)
    tokens_Q = [tokenizer(f.prompt)["input_ids"] + tokenizer(f.completion, add_special_tokens=False)["input_ids"]
                for f in facts]
    ids_QN, bm25_QN = index.search_batch(tokens_Q, len(planted))
    lexical_QN = np.full(ids_QN.shape, np.nan)
    np.put_along_axis(lexical_QN, ids_QN, bm25_QN.astype(np.float64), axis=1)
    candidates_Q = [ids[: config.shortlist_k] for ids in ids_QN]
    result = planted_recall(tuned, corpus_batches(planted, config.score_batch_size), queries, CausalLMObjective(),
                            variants, relevant_Q, ks=config.recall_k, candidates_Q=candidates_Q,
                            baselines={"bm25 (lexical)": lexical_QN}, show_progress=show_progress)
    steps = config.planted_steps or -(-len(planted) // config.batch_size)
    return {**result, "num_facts": len(facts), "num_sequences": len(planted), "fine_tune_steps": steps,
            "shortlist_k": config.shortlist_k, "facts": [{"prompt": f.prompt, "completion": f.completion,
                                                          "rows": rows} for f, rows in zip(facts, relevant_Q)],
            "logp_before": fact_logp(model, queries).tolist(), "logp_after": fact_logp(tuned, queries).tolist()}
