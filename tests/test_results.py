"""Results as data: the bridge from a packed corpus to the engine (training_batches, query_batches) and
a finished query set read back as pandas DataFrames (load_results), compared with the engine's scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import ekfac_influence as ei
from conftest import bpe_tokenizer, corpus_batches
from ekfac_influence.demo import pydoc_documents

QUERIES = [("The assert statement", " is a debugging aid"), ("x = 1", " and y = 2")]


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(model, tokenizer, corpus, factors, run directory with the query set "first")."""
    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()
    packed = ei.pack(pydoc_documents()[:3], tokenizer, length=24)
    corpus = ei.PackedCorpus(packed.tokens_NT[:32], packed.lengths_N[:32], packed.provenance[:32],
                             packed.pad_token_id, packed.tokenizer_id, packed.corpus_id)
    model = tiny_llama(len(tokenizer))
    factors = ei.fit_factors(model, ei.training_batches(corpus, 8), ei.CausalLMObjective(),
                             ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    run = tmp_path_factory.mktemp("run")
    ei.query_influence(model, tokenizer, factors, corpus, QUERIES,
                       ei.QueryConfig(rank=None, rerank=6, top_k=3, compute_dtype="float64"),
                       out=run / "queries" / "first", show_progress=False)
    return model, tokenizer, corpus, factors, run


def test_training_batches_fit_the_same_factors_as_hand_made_batches(finished):
    model, _, corpus, factors, _ = finished
    reference = ei.fit_factors(model, corpus_batches(corpus, 8), ei.CausalLMObjective(),
                               ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    for ours, theirs in zip(factors.layers, reference.layers):
        torch.testing.assert_close(ours.lambda_OI, theirs.lambda_OI, rtol=1e-10, atol=1e-12)
    assert factors.num_sequences == len(corpus) == 32
    subset = next(iter(ei.training_batches(corpus, 4, indices=[5, 2])))
    assert subset["sequence"].tolist() == [5, 2]
    assert subset["input_ids"][0].tolist() == corpus.tokens_NT[5].tolist()
    with pytest.raises(ei.DataError, match="batch_size"):
        ei.training_batches(corpus, 0)


def test_load_results_gives_one_row_per_query_and_sequence_with_the_engines_scores(finished):
    model, tokenizer, corpus, factors, run = finished
    results = ei.load_results(run, "first", per_layer=True, per_token=True)
    hits, records = results.hits, [json.loads(l) for l in (run / "queries" / "first" / "topk.jsonl").read_text().splitlines()]
    assert len(hits) == sum(len(r["top_positive"]) + len(r["top_negative"]) for r in records) > 0
    assert list(results.queries["id"]) == ["q0", "q1"] and list(results.queries["completion"]) == [q[1] for q in QUERIES]
    assert {"query_id", "side", "rank", "sequence", "score", "delta_logp", "provenance", "text"} <= set(hits.columns)
    assert (hits.loc[hits.side == "positive", "score"] > 0).all() and (hits.loc[hits.side == "negative", "score"] < 0).all()
    # every score is the engine's own, computed here afresh from the bridge's batches
    reference_QN = ei.compute_scores(model, factors, ei.query_batches(tokenizer, QUERIES), ei.training_batches(corpus, 8),
                                     ei.CausalLMObjective(), ei.ScoreConfig(compute_dtype="float64", per_layer=True),
                                     show_progress=False)
    q = hits["query"].to_numpy()
    n = hits["sequence"].to_numpy()
    np.testing.assert_allclose(hits["score"], reference_QN.scores.numpy()[q, n], rtol=1e-6)
    np.testing.assert_allclose(hits["delta_logp"], reference_QN.scores.numpy()[q, n] / len(corpus), rtol=1e-6)
    assert list(results.per_layer.columns) == factors.layer_names and results.per_layer.index.equals(hits.index)
    for layer in factors.layer_names:
        np.testing.assert_allclose(results.per_layer[layer], reference_QN.per_layer[layer].numpy()[q, n], rtol=1e-6)
    first = hits.iloc[0]
    assert first["text"] == tokenizer.decode(corpus.tokens_NT[first["sequence"], : corpus.lengths_N[first["sequence"]]])
    assert first["provenance"] == corpus.provenance[first["sequence"]]
    tokens = results.per_token[(results.per_token.query_id == first["query_id"]) & (results.per_token.side == first["side"])
                               & (results.per_token["rank"] == first["rank"])]
    assert len(tokens) == corpus.lengths_N[first["sequence"]] and isinstance(results.per_token, pd.DataFrame)
    assert "Results(2 queries" in repr(results)


def test_load_results_without_the_splits_and_with_a_wrong_name(finished):
    *_, run = finished
    plain = ei.load_results(run, "first")
    assert plain.per_layer is None and plain.per_token is None and "per_layer" not in plain.hits.columns
    with pytest.raises(ValueError, match="query sets in .*: first"):
        ei.load_results(run, "frist")
    with pytest.raises(ValueError, match="does not exist"):
        ei.load_results(run / "nowhere", "first")


def test_query_batches_refuse_a_contrast_and_need_a_query(finished):
    _, tokenizer, *_ = finished
    with pytest.raises(ei.DataError, match="contrast"):
        ei.query_batches(tokenizer, [("a b", " c", " d")])
    with pytest.raises(ei.DataError, match="no query"):
        ei.query_batches(tokenizer, [])


def test_factors_print_as_one_short_line(finished):
    *_, factors, _ = finished
    text = repr(factors)
    size = sum(t.numel() * t.element_size() for layer in factors.layers for t in layer.tensors().values()) / 2**20
    assert text == (f"Factors(ekfac, 6 layers [model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj, ... "
                    f"model.layers.1.mlp.down_proj], 32 sequences, 768 tokens, fingerprint {factors.fingerprint}, "
                    f"{size:.1f} MiB)")
    assert repr(factors.layers[0]).startswith("LayerFactors(model.layers.0.mlp.gate_proj, O×I = 32×16")
