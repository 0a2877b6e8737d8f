"""ekfac_influence: which training sequences made this language model produce this completion?

Influence functions with EK-FAC curvature (Grosse et al., 2023). docs/design.md §3 describes the API:

    factors = fit_factors(model, train_batches, objective, FactorConfig(strategy="ekfac"))
    result = compute_scores(model, factors, query_batches, train_batches, objective, ScoreConfig())
    top_k(result, 10)
    self_influence(model, factors, train_batches, objective).values   # s(n) per training sequence: a corpus audit

and for Hugging Face causal LMs over a packed corpus:

    model, tokenizer = load_causal_lm("path/to/model")           # a save_pretrained directory or a .gguf file
    corpus = pack(documents, tokenizer, length=512)             # (document id, text) pairs
    factors = fit_factors(model, training_batches(corpus, 8), CausalLMObjective(), FactorConfig())
    results = query_influence(model, tokenizer, factors, corpus, [("prompt", " completion")], QueryConfig())
    load_results("runs/mine", "first").hits                     # a finished query set as a DataFrame

The names are imported when first used, so that `import ekfac_influence` (and the CLI's --help)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

_EXPORTS = {  # public name -> the module that defines it
    "audit": ["SelfInfluenceResult", "self_influence"],
    "config": ["ConfigError", "EvaluateConfig", "FactorConfig", "QueryConfig", "ScoreConfig", "SelfInfluenceConfig"],
    "data": ["DataError", "PackedCorpus", "load_corpus", "pack", "pack_to_disk", "training_batches"],
    "evaluate": ["RecallAtK", "evaluate_lm", "recall_at_k", "shortlist_recall"],
    "factors": ["FactorMismatchError", "Factors", "LayerFactors"],
    "fit": ["fit_factors"],
    "influence": ["compute_scores"],
    "lds": ["LDSResult", "linear_datamodeling_score"],
    "model": ["LayerSelectionError", "ModelLoadError", "TrackedLayer", "fingerprint", "load_causal_lm", "select_layers"],
    "objectives": ["CausalLMObjective", "ClassificationObjective", "LabelSampler", "Objective"],
    "passes": ["NonFiniteError"],
    "planted": ["Fact", "invented_facts", "planted_fact_recall", "planted_recall"],
    "query": ["QueryResults", "query_influence"],
    "query_inputs": ["Query", "query_batches", "read_queries"],
    "results": ["Results", "load_results"],
    "run_config": ["RunConfig", "load_run_config"],
    "scores": ["ScoreResult", "TopK", "top_k"],
    "shortlist": ["ShortlistError", "ShortlistIndex"],
    "storage": ["StorageError"],
    "variants": ["Variant", "variant", "variants_from_config"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF) + ["__version__"]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ekfac_influence' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .audit import SelfInfluenceResult, self_influence
    from .config import ConfigError, EvaluateConfig, FactorConfig, QueryConfig, ScoreConfig, SelfInfluenceConfig
    from .data import DataError, PackedCorpus, load_corpus, pack, pack_to_disk, training_batches
    from .evaluate import RecallAtK, evaluate_lm, recall_at_k, shortlist_recall
    from .factors import FactorMismatchError, Factors, LayerFactors
    from .fit import fit_factors
    from .influence import compute_scores
    from .lds import LDSResult, linear_datamodeling_score
    from .model import LayerSelectionError, ModelLoadError, TrackedLayer, fingerprint, load_causal_lm, select_layers
    from .objectives import CausalLMObjective, ClassificationObjective, LabelSampler, Objective
    from .passes import NonFiniteError
    from .planted import Fact, invented_facts, planted_fact_recall, planted_recall
    from .query import QueryResults, query_influence
    from .query_inputs import Query, query_batches, read_queries
    from .results import Results, load_results
    from .run_config import RunConfig, load_run_config
    from .scores import ScoreResult, TopK, top_k
    from .shortlist import ShortlistError, ShortlistIndex
    from .storage import StorageError
    from .variants import Variant, variant, variants_from_config
