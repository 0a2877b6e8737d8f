"""ekfac_influence: which training sequences made this language model produce this completion?

Influence functions with EK-FAC curvature (Grosse et al., 2023). See DESIGN §3 for the API:

    factors = fit_factors(model, train_batches, objective, FactorConfig(strategy="ekfac"))
    result = compute_scores(model, factors, query_batches, train_batches, objective, ScoreConfig())
    top_k(result, 10)
"""

__version__ = "0.1.0"

from .config import ConfigError, FactorConfig, ScoreConfig
from .factors import Factors, LayerFactors
from .model import LayerSelectionError, TrackedLayer, fingerprint, select_layers
from .objectives import CausalLMObjective, ClassificationObjective, LabelSampler, Objective
from .pipeline import FactorMismatchError, compute_scores, fit_factors
from .scores import ScoreResult, TopK, top_k
from .storage import StorageError

__all__ = [
    "CausalLMObjective", "ClassificationObjective", "ConfigError", "FactorConfig", "FactorMismatchError", "Factors",
    "LabelSampler", "LayerFactors", "LayerSelectionError", "Objective", "ScoreConfig", "ScoreResult", "StorageError",
    "TopK", "TrackedLayer", "compute_scores", "fingerprint", "fit_factors", "select_layers", "top_k",
]
