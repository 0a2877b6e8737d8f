"""Mixture-of-experts blocks (stacked 3-D expert weights, transformers 5): each expert's projections are layers.

The per-family scores of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 against autograd and the dense
preconditioner are in test_architectures.py; 1 and 2 processes in test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, char_sequences, lm_batches, query_batches
from torch import nn
from torch.testing import assert_close

import ekfac_influence as ei

EXACT = dict(rtol=1e-10, atol=1e-14)


def tiny_mixtral(experts: int = 4, top_k: int = 2, seed: int = 0, intermediate: int = 32) -> nn.Module:
    """A 2-block Mixtral (hidden 16), float64, eager experts (grouped_mm has no float64 on CPU)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64, num_local_experts=experts,
                           num_experts_per_tok=top_k, tie_word_embeddings=False)
    config._attn_implementation, config._experts_implementation = "sdpa", "eager"
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).to(torch.float64).eval()


class DenseMLP(nn.Module):
    """down_proj(act(gate) ⊙ up), (gate, up) = gate_up_proj(x): one expert as two nn.Linear (Phi-3's layout)."""

    def __init__(self, experts: nn.Module, e: int):
        super().__init__()
        E, O, I = experts.gate_up_proj.shape
        self.gate_up_proj = nn.Linear(I, O, bias=False, dtype=torch.float64)
        self.down_proj = nn.Linear(O // 2, I, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(experts.gate_up_proj[e])
            self.down_proj.weight.copy_(experts.down_proj[e])
        self.act_fn = experts.act_fn

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def test_a_one_expert_block_with_routing_weight_one_gives_the_factors_and_scores_of_the_dense_mlp():
    """One expert, top-1: its routing weight is 1 and every token reaches it, so the block is its MLP.
    A_e, S_e, Λ_e and the scores equal those of the same weights as nn.Linear layers."""
    moe = tiny_mixtral(experts=1, top_k=1)
    dense = copy.deepcopy(moe)
    for block in dense.model.layers:
        block.mlp = DenseMLP(block.mlp.experts, 0)
    train = lm_batches(char_sequences(6, 12), 4, pad_to=14)
    queries = query_batches([("the assert statement", " raises"), ("def f(x):", " return x")])
    with torch.no_grad():
        assert_close(dense(input_ids=train[0]["input_ids"]).logits, moe(input_ids=train[0]["input_ids"]).logits, **EXACT)

    objective, config = ei.CausalLMObjective(), ei.FactorConfig(strategy="ekfac", factor_dtype="float64")
    fitted = [ei.fit_factors(model, train, objective, config, show_progress=False) for model in (moe, dense)]
    assert fitted[0].layer_names == [f"model.layers.{i}.mlp.experts.0.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert fitted[1].layer_names == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert fitted[0].num_tokens == fitted[1].num_tokens == 6 * 12
    for expert, linear in zip(*(f.layers for f in fitted)):
        for key in ("A_II", "S_OO", "lambda_OI"):
            assert_close(getattr(expert, key), getattr(linear, key), **EXACT)
    scores = [ei.compute_scores(model, f, queries, train, objective, ei.ScoreConfig(compute_dtype="float64", per_layer=True),
                                show_progress=False) for model, f in zip((moe, dense), fitted)]
    assert scores[0].scores.abs().max() > 0
    assert_close(scores[0].scores, scores[1].scores, rtol=1e-9, atol=1e-12)
    for expert, linear in zip(*(f.layer_names for f in fitted)):
        assert_close(scores[0].per_layer[expert], scores[1].per_layer[linear], rtol=1e-9, atol=1e-12)


def routed_inputs(model: nn.Module, batches: list[dict]) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """{block: [(hidden_NH, top_k_index_NK) per batch]}, recorded by plain forward hooks on the experts modules."""
    seen = {i: [] for i in range(len(model.model.layers))}
    handles = [block.mlp.experts.register_forward_hook(lambda m, args, out, i=i: seen[i].append((args[0], args[1])))
               for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return seen


def test_each_experts_input_covariance_averages_over_the_real_tokens_routed_to_it():
    """A_e = Σ_{t real, e ∈ top-k(t)} x_t x_tᵀ / (number of real tokens): tokens routed elsewhere and pads add nothing."""
    model = tiny_mixtral()
    train = lm_batches(char_sequences(6, 10), 3, pad_to=13)
    factors = ei.fit_factors(model, train, ei.CausalLMObjective(), ei.FactorConfig(strategy="kfac", factor_dtype="float64"),
                             show_progress=False)
    assert all("forward" not in block.mlp.experts.__dict__ for block in model.model.layers)  # the capture put it back
    by_name = {layer.name: layer for layer in factors.layers}
    real_N = torch.cat([batch["attention_mask"].flatten() for batch in train]).bool()
    assert factors.num_tokens == int(real_N.sum()) == 60
    for i, calls in routed_inputs(model, train).items():
        hidden_NH = torch.cat([h for h, _ in calls])
        index_NK = torch.cat([k for _, k in calls])
        for e in range(4):
            routed_N = (index_NK == e).any(-1) & real_N
            assert 0 < int(routed_N.sum()) < 60  # every expert gets some tokens, none gets all
            x_nH = hidden_NH[routed_N]
            assert_close(by_name[f"model.layers.{i}.mlp.experts.{e}.gate_up_proj"].A_II, x_nH.T @ x_nH / 60, **EXACT)


def test_experts_in_a_layout_we_cannot_run_are_refused_by_name_and_other_layers_stay_selectable():
    """Only the default layout (gate and up concatenated, O × I, no bias) is run; a pattern on attention still works."""
    model = tiny_mixtral()
    model.model.layers[0].mlp.experts.is_transposed = True
    names = [layer.name for layer in ei.select_layers(model)]
    assert names and all(name.startswith("model.layers.1.") for name in names)
    assert len(ei.select_layers(model, (r"layers\.0\.self_attn\.q_proj$",))) == 1
    with pytest.raises(ei.LayerSelectionError, match="matches no"):
        ei.select_layers(model, (r"layers\.0\.mlp\.experts",))
