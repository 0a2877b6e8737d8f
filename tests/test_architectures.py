"""Every supported architecture: saved with save_pretrained and loaded back from disk through fit and query, and every
family of the README's table built from its config, its default layers and its scores checked against references."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import VOCAB, bpe_tokenizer, char_sequences, corpus_batches, lm_batches, preconditioned, query_batches
from ekfac_influence import (CausalLMObjective, FactorConfig, LayerSelectionError, ScoreConfig, compute_scores, fit_factors,
                             select_layers)
from ekfac_influence.config import QueryConfig
from ekfac_influence.data import pack
from ekfac_influence.demo import pydoc_documents
from ekfac_influence.model import ModelLoadError, load_causal_lm
from ekfac_influence.query import query_influence
from ekfac_influence.query_inputs import Query, collate_query_rows, encode_query

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


# ----------------------------------------------------------------------------- every family, built from its config in memory

DENSE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64)
GATED = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
EXPERTS = {f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")}
MOE = dict(DENSE, num_experts_per_tok=2)
FAMILIES = {
    # name: (config class, keyword arguments, the tracked names of a block with its prefix and index cut off)
    "opt": ("OPTConfig", dict(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16,
                              max_position_embeddings=64), {"fc1", "fc2"}),
    "phi": ("PhiConfig", DENSE, {"mlp.fc1", "mlp.fc2"}),
    "phi3": ("Phi3Config", dict(DENSE, pad_token_id=0), {"mlp.gate_up_proj", "mlp.down_proj"}),
    "gemma": ("GemmaConfig", dict(DENSE, head_dim=8), GATED),
    "gemma2": ("Gemma2Config", dict(DENSE, head_dim=8, attn_implementation="eager"), GATED),  # no SDPA in transformers
    "gemma3": ("Gemma3TextConfig", dict(DENSE, head_dim=8), GATED),
    "falcon": ("FalconConfig", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2),
               {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
    "bloom": ("BloomConfig", dict(hidden_size=16, n_layer=2, n_head=2, attn_implementation="eager"),
              {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
    "gptj": ("GPTJConfig", dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, rotary_dim=4), {"mlp.fc_in", "mlp.fc_out"}),
    "stablelm": ("StableLmConfig", DENSE, GATED),
    "olmo": ("OlmoConfig", DENSE, GATED),
    "olmo2": ("Olmo2Config", DENSE, GATED),
    "granite": ("GraniteConfig", DENSE, GATED),
    "qwen3": ("Qwen3Config", dict(DENSE, head_dim=8), GATED),
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=4), EXPERTS),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=16),
                  EXPERTS | {f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, num_experts=4, moe_intermediate_size=8, head_dim=8), EXPERTS),
    "olmoe": ("OlmoeConfig", dict(MOE, num_experts=4), EXPERTS),
    "deepseek_v3": ("DeepseekV3Config",  # block 0 dense, block 1 routed experts + a shared one (MLA attention)
                    dict(MOE, num_key_value_heads=2, moe_intermediate_size=8, first_k_dense_replace=1, n_routed_experts=4,
                         n_group=2, topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8,
                         qk_nope_head_dim=4, n_shared_experts=1),
                    GATED | EXPERTS | {f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}),
}
FAMILY_QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x")]


def tiny_model(name: str, **overrides):
    """A float64 model of family `name` from its config, on SDPA (or eager) attention and eager experts."""
    import transformers

    config_class, kwargs, _ = FAMILIES[name]
    kwargs = dict(kwargs, **overrides)
    attention = kwargs.pop("attn_implementation", "sdpa")
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **kwargs)
    config._attn_implementation = attention
    config._experts_implementation = "eager"  # the default grouped_mm kernel has no float64 on CPU
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


def block_names(layers) -> set[str]:
    """Tracked names without the model's prefix and the block index: model.layers.1.mlp.fc1 → mlp.fc1."""
    return {re.sub(r"^.*?\.\d+\.", "", layer.name) for layer in layers}


def flat_gradients(layers, loss) -> torch.Tensor:
    """∂loss/∂W of every tracked layer by autograd, O × I each (an expert: its slice of the stacked weight), concatenated."""
    params = list({id(p): p for layer in layers for p in layer.parameters}.values())
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    return torch.cat([layer.layout_OI(tuple(grads[id(p)] for p in layer.parameters)).reshape(-1) for layer in layers])


def autograd_gradient_rows(model, layers, batches, loss_of_one) -> torch.Tensor:
    """[N, P]: one backward per sequence (each sequence alone, unpadded)."""
    return torch.stack([flat_gradients(layers, loss_of_one(model, {k: v[b : b + 1] for k, v in batch.items()}))
                        for batch in batches for b in range(batch["input_ids"].shape[0])])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_tracks_its_mlp_by_default_and_scores_equal_the_autograd_and_dense_references(name):
    """Default selection = MLP (or expert) weights only. identity: score = ∇f_q · ∇log p(z_n) from autograd per
    sequence; ekfac: score = Σ_ℓ ∇_ℓ f_qᵀ (Q_S ⊗ Q_A) diag(1/(Λ + λ)) (Q_S ⊗ Q_A)ᵀ ∇_ℓ log p(z_n) of the fitted factors."""
    model = tiny_model(name)
    layers = select_layers(model)
    assert block_names(layers) == FAMILIES[name][2]
    head = model.get_output_embeddings()
    assert all(layer.module is not head for layer in layers)

    objective = CausalLMObjective()
    train = lm_batches(char_sequences(4, 10), 2)
    queries = query_batches(FAMILY_QUERIES, batch_size=1)  # unpadded: eager attention of some families
    grads_QP = autograd_gradient_rows(model, layers, queries, lambda m, one: objective.measurement(m, one))
    train_NP = -autograd_gradient_rows(model, layers, train, lambda m, one: objective.train_loss(m, one, sample_labels=False))
    assert grads_QP.abs().max() > 0 and train_NP.abs().max() > 0
    for strategy in ("identity", "ekfac"):
        factors = fit_factors(model, train, objective, FactorConfig(strategy=strategy, factor_dtype="float64"),
                              show_progress=False)
        assert factors.layer_names == [layer.name for layer in layers]
        result = compute_scores(model, factors, queries, train, objective, ScoreConfig(compute_dtype="float64"),
                                show_progress=False)
        expected_QN = preconditioned(factors, grads_QP) @ train_NP.T
        assert_close(result.scores, expected_QN, rtol=1e-7, atol=1e-9 * expected_QN.abs().max().item())


def test_opt_no_longer_tracks_attention_or_its_tied_output_head_and_refuses_the_head_when_named():
    """OPT's MLP is `layers.N.fc1/fc2` (no `mlp` module); lm_head shares the embedding's tensor."""
    model = tiny_model("opt")
    names = [layer.name for layer in select_layers(model)]
    assert names == [f"model.decoder.layers.{i}.{p}" for i in range(2) for p in ("fc1", "fc2")]
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(LayerSelectionError, match=r"lm_head cannot be tracked: its weight is tied.*embed_tokens"):
        select_layers(model, (r"^lm_head$",))
    assert len(select_layers(model, (r"self_attn\.",))) == 8  # asked for by name, attention is tracked


@pytest.mark.parametrize("case", ["unknown_mlp", "unsupported_experts"])
def test_a_transformer_whose_mlp_is_not_recognised_is_refused_with_its_linear_names(case):
    """No silent fallback to every Linear: the error lists the Linear-like modules and says how to name layers."""
    import transformers

    if case == "unknown_mlp":  # BERT as a decoder: its MLP is intermediate.dense / output.dense
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, is_decoder=True)
    else:  # gpt-oss stores experts transposed, interleaved, with biases
        config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                                           num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(LayerSelectionError) as error:
        select_layers(model)
    message = str(error.value)
    assert "factors.layers" in message and "no MLP layer recognised" in message
    if case == "unknown_mlp":
        assert "bert.encoder.layer.0.intermediate.dense" in message and "cls.predictions.decoder" in message
        assert [l.name for l in select_layers(model, (r"intermediate\.dense$", r"layer\.\d+\.output\.dense$"))] == \
            ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]
    else:
        assert "mlp.experts.gate_up_proj" in message and "is_transposed=True" in message and "self_attn.q_proj" in message
