"""Every supported architecture, saved with save_pretrained and loaded back from disk, through fit and query."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import bpe_tokenizer, corpus_batches
from ekfac_influence import CausalLMObjective, FactorConfig, fit_factors, select_layers
from ekfac_influence.config import QueryConfig
from ekfac_influence.data import Query, collate_query_rows, encode_query, pack
from ekfac_influence.demo import pydoc_documents
from ekfac_influence.model import ModelLoadError, load_causal_lm
from ekfac_influence.query import query_influence

ARCHITECTURES = {
    # name: (config class, keyword arguments, the MLP module names of one block)
    "gpt2": ("GPT2Config", dict(n_embd=16, n_layer=2, n_head=2, n_positions=64), {"mlp.c_fc", "mlp.c_proj"}),
    "llama": ("LlamaConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=64), {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "qwen2": ("Qwen2Config", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=64), {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=64), {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
    "mistral": ("MistralConfig", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64, sliding_window=None),
                {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
}


def small_corpus(tokenizer):
    packed = pack(pydoc_documents()[:2], tokenizer, length=16)
    return type(packed)(packed.tokens_NT[:12], packed.lengths_N[:12], packed.provenance[:12], packed.pad_token_id,
                        packed.tokenizer_id, packed.corpus_id)


def saved_model(name: str, directory) -> None:
    import transformers

    config_class, kwargs, _ = ARCHITECTURES[name]
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    # a few spare embedding rows, as real checkpoints have (and Qwen2's tokenizer class adds <|endoftext|>)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer) + 4, attn_implementation="sdpa", **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def gradient_of(model, layers, loss) -> torch.Tensor:
    params = [p for layer in layers for p in ((layer.module.weight,) + ((layer.module.bias,) if layer.has_bias else ()))]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_architecture_loads_from_disk_and_its_gradient_dot_products_match_autograd(name, tmp_path):
    torch.set_num_threads(1)
    saved_model(name, tmp_path / name)
    model, tokenizer = load_causal_lm(tmp_path / name, dtype="float64")
    corpus = small_corpus(tokenizer)
    layers = select_layers(model)
    suffixes = {".".join(layer.name.split(".")[-2:]) for layer in layers}
    assert suffixes == ARCHITECTURES[name][2] and len(layers) == 2 * len(suffixes)

    factors = fit_factors(model, corpus_batches(corpus, 4), CausalLMObjective(), FactorConfig(strategy="identity"),
                          show_progress=False)
    query = Query("The assert statement", " is a debugging aid", id="q")
    results = query_influence(model, tokenizer, factors, corpus, [query],
                              QueryConfig(rank=None, rerank=0, top_k=3, compute_dtype="float64"), show_progress=False)

    # reference: ∇f · ∇log p(z_n) with one autograd backward per sequence
    objective = CausalLMObjective()
    batch = collate_query_rows(encode_query(tokenizer, query, max_length=64).rows(), tokenizer.pad_token_id)
    query_grad = gradient_of(model, layers, objective.measurement(model, batch))
    for n, single in enumerate(corpus_batches(corpus, 1)):
        train_grad = -gradient_of(model, layers, objective.train_loss(model, single, sample_labels=False))
        assert results.scores_QN[0, n] == pytest.approx((query_grad @ train_grad).item(), rel=1e-6, abs=1e-9)
    hit = results.records[0]["top_positive"][0]
    assert sum(hit["per_token"]) == pytest.approx(hit["score"], rel=1e-6)
    assert hit["score"] == pytest.approx(float(np.nanmax(results.scores_QN[0])), rel=1e-6)


def test_loading_refuses_a_missing_path_a_non_model_file_and_a_mismatched_tokenizer(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "nothing")
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="not .gguf"):
        load_causal_lm(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    saved_model("llama", tmp_path / "llama")
    from ekfac_influence.demo import train_tokenizer

    train_tokenizer(["a much larger vocabulary " * 50 + "".join(chr(0x4E00 + i) for i in range(600))], 900)\
        .save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_causal_lm(tmp_path / "llama")
