"""ekfac_influence: which training sequences made this language model produce this completion?

Influence functions with EK-FAC curvature (Grosse et al., 2023). docs/design.md §3 describes the API:

    factors = fit_factors(model, train_batches, objective, FactorConfig(strategy="ekfac"))
    result = compute_scores(model, factors, query_batches, train_batches, objective, ScoreConfig())
    top_k(result, 10)
    self_influence(model, factors, train_batches, objective).values   # s(n) per training sequence: a corpus audit

and for Hugging Face causal LMs over a packed corpus:

    model, tokenizer = load_causal_lm("path/to/model")           # a save_pretrained directory or a .gguf file
    corpus = pack(documents, tokenizer, length=512)             # (document id, text) pairs
    results = query_influence(model, tokenizer, factors, corpus, [("prompt", " completion")], QueryConfig())
"""

from .audit import SelfInfluenceResult, self_influence
from .config import ConfigError, EvaluateConfig, FactorConfig, QueryConfig, ScoreConfig, SelfInfluenceConfig
from .data import DataError, PackedCorpus, Query, load_corpus, pack, pack_to_disk, read_queries
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
from .run_config import RunConfig, load_run_config
from .scores import ScoreResult, TopK, top_k
from .shortlist import ShortlistError, ShortlistIndex
from .storage import StorageError
from .variants import Variant, variant, variants_from_config
from .version import __version__

__all__ = [
    "CausalLMObjective", "ClassificationObjective", "ConfigError", "DataError", "FactorConfig", "FactorMismatchError",
    "Factors", "LabelSampler", "LayerFactors", "LayerSelectionError", "ModelLoadError", "NonFiniteError", "Objective",
    "PackedCorpus", "Query", "QueryConfig", "QueryResults", "RecallAtK", "RunConfig", "ScoreConfig", "ScoreResult", "SelfInfluenceConfig",
    "SelfInfluenceResult", "ShortlistError",
    "ShortlistIndex", "StorageError", "TopK", "TrackedLayer", "compute_scores", "fingerprint", "fit_factors",
    "load_causal_lm", "load_corpus", "load_run_config", "pack", "pack_to_disk", "query_influence", "read_queries",
    "recall_at_k", "select_layers", "self_influence", "shortlist_recall", "top_k", "__version__",
    # evaluation (docs/accuracy.md)
    "EvaluateConfig", "Fact", "LDSResult", "Variant", "evaluate_lm", "invented_facts", "linear_datamodeling_score",
    "planted_fact_recall", "planted_recall", "variant", "variants_from_config",
]
