"""Score decompositions, low-rank queries, and invariances (batch size, padding, query batching)."""

from __future__ import annotations

import pytest
import torch
from conftest import char_sequences, correlation, lm_batches, make_llama, query_batches, train_lm
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import ekfac_influence as ei
from ekfac_influence.config import ROTATION_ORDERS
from ekfac_influence.precondition import LowRank, compress
from ekfac_influence.scores import (choose_form, contraction_costs, dense_sequence_scores, dense_token_scores, layer_scores,
                                    low_rank_token_scores, scoring_form)

QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"),
           ("a for loop", " iterates over"), ("the import statement", " loads a module"), ("x = [1, 2]", " a list")]
FLOAT64 = ei.ScoreConfig(compute_dtype="float64")


@pytest.fixture
def fitted(trained_llama):
    train = lm_batches(char_sequences(16, 20), 4)
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    return trained_llama, factors, train, objective


def test_per_token_scores_sum_to_sequence_scores_and_per_layer_scores_to_the_total(fitted):
    model, factors, train, objective = fitted
    config = ei.ScoreConfig(per_token=True, per_layer=True, compute_dtype="float64")
    result = ei.compute_scores(model, factors, query_batches(QUERIES), train, objective, config, show_progress=False)
    assert result.per_token.shape == (5, 16, 20)
    assert_close(result.per_token.sum(-1), result.scores)
    assert_close(sum(result.per_layer.values()), result.scores)
    assert set(result.per_layer) == set(factors.layer_names)
    plain = ei.compute_scores(model, factors, query_batches(QUERIES), train, objective, FLOAT64, show_progress=False)
    assert_close(plain.scores, result.scores)


def test_the_last_position_predicts_nothing_so_its_token_influence_is_zero(fitted):
    """Position t carries the influence of predicting token t+1; the last position has no successor."""
    model, factors, train, objective = fitted
    config = ei.ScoreConfig(per_token=True, compute_dtype="float64")
    result = ei.compute_scores(model, factors, query_batches(QUERIES[:2]), train, objective, config, show_progress=False)
    assert result.per_token[:, :, -1].abs().max() == 0
    assert result.per_token[:, :, :-1].abs().max() > 0


def test_score_kernels_agree_with_each_other():
    """Σ_t d_tᵀ P ā_t computed via per-sequence gradients, token by token, and through a factored P."""
    generator = torch.Generator().manual_seed(0)
    d, a = torch.randn(3, 5, 6, generator=generator, dtype=torch.float64), torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    left, right = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64), torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    low_rank = LowRank(left, right)
    P = low_rank.dense()
    reference = torch.einsum("bto,qoi,bti->qb", d, P, a)
    assert_close(dense_sequence_scores(P, d, a), reference)
    assert_close(dense_token_scores(P, d, a).sum(-1), reference)
    assert_close(low_rank_token_scores(low_rank, d, a).sum(-1), reference)
    for per_token in (False, True):
        assert_close(layer_scores(low_rank, d, a, per_token=per_token)[0], reference)
        assert_close(layer_scores(P, d, a, per_token=per_token)[0], reference)


def padded_case(Q: int = 3, B: int = 4, T: int = 7, O: int = 5, I: int = 4):
    """Random d, ā zero on padding (sequence 1 left-padded by 2, sequence 2 right-padded by 3, sequence 3 empty
    but for one token), a dense P [Q, O, I] and the same P as an exact rank-I factorisation (P · I_I)."""
    generator = torch.Generator().manual_seed(1)
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    mask_BT[1, :2] = False
    mask_BT[2, -3:] = False
    mask_BT[3, :] = False
    mask_BT[3, 3] = True
    d = torch.randn(B, T, O, generator=generator, dtype=torch.float64) * mask_BT[..., None]
    a = torch.randn(B, T, I, generator=generator, dtype=torch.float64) * mask_BT[..., None]
    P = torch.randn(Q, O, I, generator=generator, dtype=torch.float64)
    exact = LowRank(P.clone(), torch.eye(I, dtype=torch.float64).expand(Q, I, I).clone())
    return d, a, mask_BT, P, exact


@pytest.mark.parametrize("form", ["sequences", "tokens", "rank"])
@pytest.mark.parametrize("per_token", [False, True])
def test_every_contraction_form_gives_the_reference_scores_on_padded_batches(form, per_token):
    """score_QB = Σ_t d_tᵀ P ā_t and token_QBT = d_tᵀ P ā_t (written out as one einsum), whichever form contracts
    them, with the padding skipped (packed tokens, trimmed positions); the old unpacked kernels agree too."""
    d, a, mask_BT, P, exact = padded_case()
    reference_QBT = torch.einsum("bto,qoi,bti->qbt", d, P, a)
    if form == "sequences" and per_token:
        with pytest.raises(ValueError, match="per-token"):
            layer_scores(P, d, a, per_token=True, mask_BT=mask_BT, form=form)
        return
    with FlopCounterMode(display=False) as counted:
        score_QB, tokens_QBT = layer_scores(exact if form == "rank" else P, d, a, per_token=per_token, mask_BT=mask_BT,
                                            form=form)
    (Q, O, I), (B, T), N = P.shape, mask_BT.shape, int(mask_BT.sum())
    assert counted.get_total_flops() == 2 * contraction_costs(Q, B, T, N, O, I, I)[form]  # the cost model's count
    assert_close(score_QB, reference_QBT.sum(-1))
    if per_token:
        assert_close(tokens_QBT, reference_QBT)
        assert tokens_QBT[~mask_BT.expand_as(tokens_QBT)].abs().max() == 0
    assert_close(dense_sequence_scores(P, d, a), reference_QBT.sum(-1))
    assert_close(dense_token_scores(P, d, a), reference_QBT)
    assert_close(low_rank_token_scores(exact, d, a), reference_QBT)


def test_a_form_that_does_not_apply_to_the_query_gradients_is_refused():
    d, a, mask_BT, P, exact = padded_case()
    with pytest.raises(ValueError, match="does not apply"):
        layer_scores(P, d, a, per_token=False, mask_BT=mask_BT, form="rank")
    with pytest.raises(ValueError, match="does not apply"):
        layer_scores(exact, d, a, per_token=False, mask_BT=mask_BT, form="tokens")


@pytest.mark.parametrize("Q, N, per_token, low_rank, expected", [
    (16, 8 * 128, False, False, "sequences"),  # many queries share the per-sequence gradients
    (1, 8 * 128, False, False, "tokens"),  # one query: d_tᵀ (P ā_t) skips forming D
    (16, 40, False, False, "tokens"),  # a batch that is mostly padding: only its 40 real tokens are worked on
    (16, 8 * 128, True, False, "tokens"),  # per-token scores need a token form
    (2, 8 * 128, False, True, "rank"),  # two queries at rank 4
], ids=["16 queries", "1 query", "mostly padding", "per token", "rank k"])
def test_the_cost_model_chooses_each_form_where_it_is_cheapest(Q, N, per_token, low_rank, expected):
    """Shapes of the engine benchmark's gate projection (O × I = 512 × 128), a batch of 8 × 128 positions."""
    P = LowRank(torch.zeros(Q, 512, 4), torch.zeros(Q, 128, 4)) if low_rank else torch.zeros(Q, 512, 128)
    assert choose_form(P, 8, 128, N, per_token=per_token) == expected
    costs = contraction_costs(Q, 8, 128, N, 512, 128, 4 if low_rank else None)
    if not per_token:
        assert costs[expected] == min(costs.values())


def test_a_rank_k_query_set_is_made_dense_only_where_a_dense_form_is_cheaper():
    """128 queries at rank 32 on 512 × 128: Q·B·T·K·(O + I) > B·T·O·I + Q·B·O·I, dense wins; 2 queries at rank 4 do not."""
    many = {"layer": LowRank(torch.randn(128, 512, 32), torch.randn(128, 128, 32))}
    assert isinstance(scoring_form(many, "layer", (8, 128, 512), 128, False), torch.Tensor)
    assert isinstance(many["layer"], torch.Tensor)  # for good
    few = {"layer": LowRank(torch.randn(2, 512, 4), torch.randn(2, 128, 4))}
    assert isinstance(scoring_form(few, "layer", (8, 128, 512), 128, False), LowRank)


def test_rank_k_compression_keeps_the_top_singular_directions():
    """compress(P, k) = U_k diag(σ_k) V_kᵀ, the best rank-k approximation (Eckart-Young)."""
    generator = torch.Generator().manual_seed(1)
    P = torch.randn(2, 8, 6, generator=generator, dtype=torch.float64)
    low_rank = compress(P, 3)
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    assert_close(low_rank.dense(), U[:, :, :3] @ torch.diag_embed(S[:, :3]) @ Vh[:, :3])
    assert compress(P, 6) is P  # full rank: nothing to gain


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_float32_rank_k_compression_survives_gradients_whose_squares_overflow_or_underflow(scale):
    """The Gram matrix is formed from each query scaled to max |entry| = 1: (1e25)² overflows float32."""
    generator = torch.Generator().manual_seed(1)
    P = torch.randn(3, 40, 12, generator=generator, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    best = U[:, :, :4] @ torch.diag_embed(S[:, :4]) @ Vh[:, :4]
    low_rank = compress((P * scale).float(), 4)
    assert bool(torch.isfinite(low_rank.left_QOK).all() and torch.isfinite(low_rank.right_QIK).all())
    assert_close(low_rank.dense().double() / scale, best, rtol=1e-4, atol=1e-4)


def test_low_rank_query_gradients_match_full_rank_to_a_measured_correlation():
    """Rank-k preconditioned query gradients vs full rank on a Llama with 64 × 128 MLP layers.

    Measured (mean per-query Pearson over 64 training sequences): rank 32: 0.9993, rank 8: 0.961, rank 2: 0.823.
    """
    model = train_lm(make_llama(hidden=64, intermediate=128, layers=1, dtype=torch.float32),
                     char_sequences(128, 32), steps=60)
    train = lm_batches(char_sequences(64, 32), 16)
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, train, objective, show_progress=False)
    queries = query_batches(QUERIES)
    full = ei.compute_scores(model, factors, queries, train, objective, show_progress=False).scores
    measured = {}
    for rank in (32, 8, 2):
        low = ei.compute_scores(model, factors, queries, train, objective, ei.ScoreConfig(rank=rank), show_progress=False)
        measured[rank] = correlation(full, low.scores)
    print("\nrank-k vs full-rank correlation:", {k: round(v, 4) for k, v in measured.items()})
    assert measured[32] >= 0.995
    assert measured[8] >= 0.94
    assert measured[32] >= measured[8] >= measured[2] - 1e-3


def test_factors_and_scores_do_not_depend_on_batch_size(trained_llama):
    """Sampled labels are keyed to (seed, sequence index): batch size changes nothing but rounding."""
    tokens = char_sequences(12, 16)
    objective = ei.CausalLMObjective()
    queries = query_batches(QUERIES)
    results = []
    for batch_size in (1, 5, 12):
        train = lm_batches(tokens, batch_size)
        factors = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
        results.append((factors, ei.compute_scores(trained_llama, factors, queries, train, objective, FLOAT64, show_progress=False)))
    for factors, result in results[1:]:
        for mine, reference in zip(factors.layers, results[0][0].layers):
            assert_close(mine.lambda_OI, reference.lambda_OI)
            assert_close(mine.A_II, reference.A_II)
        assert_close(result.scores, results[0][1].scores)


@pytest.mark.parametrize("left, labelled_pads", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["right-padded", "left-padded", "right-padded, pads labelled", "left-padded, pads labelled"])
def test_factors_and_scores_do_not_depend_on_padding(trained_llama, left, labelled_pads):
    """Padding changes nothing, also when the caller's labels are the pad ids rather than −100 there."""
    tokens = char_sequences(8, 16)
    objective = ei.CausalLMObjective()
    queries = query_batches(QUERIES)
    plain, padded = lm_batches(tokens, 4), lm_batches(tokens, 4, pad_to=21, left=left)
    if labelled_pads:
        padded = [dict(batch, labels=batch["input_ids"].clone()) for batch in padded]
    config = ei.ScoreConfig(per_token=True, compute_dtype="float64")
    outcomes = []
    for train in (plain, padded):
        factors = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
        outcomes.append((factors, ei.compute_scores(trained_llama, factors, queries, train, objective, config, show_progress=False)))
    (f_plain, r_plain), (f_padded, r_padded) = outcomes
    assert f_plain.num_tokens == f_padded.num_tokens == 8 * 16
    for a, b in zip(f_plain.layers, f_padded.layers):
        assert_close(a.A_II, b.A_II)
        assert_close(a.S_OO, b.S_OO)
        assert_close(a.lambda_OI, b.lambda_OI)
    assert_close(r_plain.scores, r_padded.scores)
    real = slice(5, 21) if left else slice(0, 16)
    assert_close(r_padded.per_token[:, :, real], r_plain.per_token)
    assert r_padded.per_token[:, :, slice(0, 5) if left else slice(16, 21)].abs().max() == 0


def test_query_scores_do_not_depend_on_how_queries_are_batched(fitted):
    model, factors, train, objective = fitted
    one_by_one = ei.compute_scores(model, factors, query_batches(QUERIES, batch_size=1), train, objective, FLOAT64, show_progress=False)
    together = ei.compute_scores(model, factors, query_batches(QUERIES, batch_size=5), train, objective, FLOAT64, show_progress=False)
    assert_close(one_by_one.scores, together.scores)


@pytest.mark.parametrize("order", ROTATION_ORDERS)
def test_ekfac_contraction_order_does_not_change_the_factors(trained_llama, order):
    train = lm_batches(char_sequences(8, 16), 4)
    objective = ei.CausalLMObjective()
    auto = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    forced = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64", correction_order=order),
                            show_progress=False)
    for a, b in zip(auto.layers, forced.layers):
        assert_close(a.lambda_OI, b.lambda_OI)


def test_top_k_returns_the_most_helpful_and_most_harmful_sequences():
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.0], [-1.0, 1.0, -3.0, 2.0]])
    top = ei.top_k(ei.ScoreResult(scores=scores, num_train_sequences=4), 2)
    assert top.positive_indices.tolist() == [[2, 0], [3, 1]]
    assert top.negative_indices.tolist() == [[1, -1], [2, 0]]  # a zero score is not harmful
    assert_close(top.positive_scores, torch.tensor([[3.0, 0.5], [2.0, 1.0]]))


def test_top_k_never_puts_a_score_of_the_other_sign_on_a_side():
    """With fewer than k scores of a sign, the side's other slots are index −1 and score NaN."""
    scores = torch.tensor([[5.0, 4.0, 3.0, -1.0, float("nan")], [-3.0, -2.0, -1.0, -4.0, -5.0]])
    top = ei.top_k(scores, 3)
    assert top.positive_indices.tolist() == [[0, 1, 2], [-1, -1, -1]]
    assert top.negative_indices.tolist() == [[3, -1, -1], [4, 3, 0]]
    assert_close(top.negative_scores, torch.tensor([[-1.0, float("nan"), float("nan")], [-5.0, -4.0, -3.0]]),
                 equal_nan=True)
    assert not (top.positive_scores <= 0).any() and not (top.negative_scores >= 0).any()
    with pytest.raises(ValueError, match="positive integer"):
        ei.top_k(scores, 0)


def test_a_one_shot_iterator_of_training_batches_is_refused(trained_llama):
    batches = iter(lm_batches(char_sequences(4, 8), 2))
    with pytest.raises(TypeError, match="re-iterable"):
        ei.fit_factors(trained_llama, batches, ei.CausalLMObjective(), show_progress=False)


def test_bad_config_values_name_the_field():
    with pytest.raises(ei.ConfigError, match="strategy"):
        ei.FactorConfig(strategy="ekafc")
    with pytest.raises(ei.ConfigError, match="damping"):
        ei.FactorConfig(damping=0.0)
    with pytest.raises(ei.ConfigError, match="rank"):
        ei.ScoreConfig(rank=0)


def test_truncating_in_the_eigenbasis_gives_the_best_rank_k_approximation_of_the_preconditioned_gradient():
    """P = Q_S X Q_Aᵀ with orthogonal Q: the rank-k truncation of X, rotated, is P's own (Eckart-Young)."""
    from ekfac_influence.precondition import eigenbasis_inverse_product, eigenbasis_low_rank

    generator = torch.Generator().manual_seed(3)
    QS = torch.linalg.qr(torch.randn(9, 9, generator=generator, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))[0]
    lambda_OI = torch.rand(9, 7, generator=generator, dtype=torch.float64)
    V = torch.randn(2, 9, 7, generator=generator, dtype=torch.float64)
    full = eigenbasis_inverse_product(V, QS, QA, lambda_OI, 0.1)
    assert_close(eigenbasis_low_rank(V, QS, QA, lambda_OI, 0.1, 3).dense(), compress(full, 3).dense())


@pytest.mark.parametrize("budget, flushes", [(1, 0), (24576, 2), (2**26, 1)], ids=["no-grouping", "mid-pass", "whole-pass"])
def test_grouping_per_sequence_gradients_before_the_query_product_changes_no_score(fitted, monkeypatch, budget, flushes):
    """Per-sequence gradients scored batch by batch, flushed every 4 batches of 2, or once at the end: same scores.

    Budget 24,576 elements: a batch of 2 holds 2 × 512 × 6 layers = 6,144, so 4 batches fill it.
    """
    import ekfac_influence.scores as scores

    model, factors, _, objective = fitted
    train = lm_batches(char_sequences(16, 20), 2)
    reference = ei.compute_scores(model, factors, query_batches(QUERIES), train, objective,
                                  ei.ScoreConfig(per_token=True, compute_dtype="float64"), show_progress=False)
    calls = []
    original = scores._score_group
    monkeypatch.setattr(scores, "_GROUP_ELEMENTS", budget)
    monkeypatch.setattr(scores, "_score_group", lambda group, *rest: (calls.append(len(group)) if len(group) else None,
                                                                        original(group, *rest)))
    grouped = ei.compute_scores(model, factors, query_batches(QUERIES), train, objective, FLOAT64, show_progress=False)
    assert sum(1 for size in calls if size) == flushes
    assert_close(grouped.scores, reference.scores)
    for name in factors.layer_names:
        assert_close(grouped.per_layer[name], reference.per_layer[name])
