"""The curvature and score math against references written out in each test's docstring."""

from __future__ import annotations

import pytest
import torch
from conftest import char_sequences, lm_batches, query_batches
from torch.testing import assert_close

import ekfac_influence as ei
from ekfac_influence.reference import exact_ggn
from ekfac_influence.config import ROTATION_ORDERS
from ekfac_influence.factors import rotated_gradients, rotation_costs, rotation_order, sequence_gradients
from ekfac_influence.hooks import Capture
from ekfac_influence.objectives import batch_size
from ekfac_influence.passes import capture_pass
from ekfac_influence.precondition import eigenbasis_inverse_product

QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"),
           ("a for loop", " iterates over")]


def flat_tracked_gradient(layers: list[ei.TrackedLayer]) -> torch.Tensor:
    return torch.cat([layer.gradient_OI().reshape(-1) for layer in layers])


def autograd_gradients(model, layers, batches, loss_of_one) -> torch.Tensor:
    """[N, P]: one backward per sequence, read from .grad of the tracked parameters."""
    rows = []
    for batch in batches:
        for b in range(batch_size(batch)):
            one = {k: v[b : b + 1] for k, v in batch.items()} if isinstance(batch, dict) else tuple(v[b : b + 1] for v in batch)
            model.zero_grad()
            loss_of_one(model, one).backward()
            rows.append(flat_tracked_gradient(layers))
    return torch.stack(rows)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


def test_ekfac_inverse_equals_the_explicit_kronecker_eigenbasis_inverse():
    """P(V) = Q_S[(Q_Sᵀ V Q_A) ⊘ (Λ+λ)]Q_Aᵀ equals (Q_S ⊗ Q_A) diag(1/(Λ+λ)) (Q_S ⊗ Q_A)ᵀ vec V (row-major vec)."""
    generator = torch.Generator().manual_seed(0)
    O, I, Q = 5, 7, 3
    QS, QA = random_orthogonal(O, generator), random_orthogonal(I, generator)
    lambda_OI = torch.rand(O, I, generator=generator, dtype=torch.float64)
    damping = 0.05
    V_QOI = torch.randn(Q, O, I, generator=generator, dtype=torch.float64)
    K = torch.kron(QS, QA)
    dense = K @ torch.diag(1 / (lambda_OI.reshape(-1) + damping)) @ K.T
    expected = (dense @ V_QOI.reshape(Q, -1).T).T.reshape(Q, O, I)
    assert_close(eigenbasis_inverse_product(V_QOI, QS, QA, lambda_OI, damping), expected)


def test_damped_inverse_with_tiny_damping_inverts_the_kronecker_product():
    """With Λ = Λ_S ⊗ Λ_A and λ → 0, P(S V A) = V: the inverse of S ⊗ A."""
    generator = torch.Generator().manual_seed(1)
    O, I = 4, 6
    QS, QA = random_orthogonal(O, generator), random_orthogonal(I, generator)
    eigS, eigA = 1 + torch.rand(O, generator=generator, dtype=torch.float64), 1 + torch.rand(I, generator=generator, dtype=torch.float64)
    S, A = QS @ torch.diag(eigS) @ QS.T, QA @ torch.diag(eigA) @ QA.T
    V = torch.randn(1, O, I, generator=generator, dtype=torch.float64)
    assert_close(eigenbasis_inverse_product(S @ V @ A, QS, QA, torch.outer(eigS, eigA), 0.0), V)


@pytest.mark.parametrize("T, O, I, expected", [(4, 12, 10, "tokens"), (100, 6, 5, "sequences"),
                                               (20, 40, 4, "inputs first"), (20, 4, 40, "outputs first")])
def test_each_rotation_order_is_chosen_where_it_is_cheapest_and_all_give_the_rotation_of_the_sequence_gradient(
        T, O, I, expected):
    """R = Q_Sᵀ (Σ_t g_t ā_tᵀ) Q_A, written out, against every order on a shape where `expected` is the cheapest."""
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(0)
    g = torch.randn(3, T, O, generator=generator, dtype=torch.float64)
    a = torch.randn(3, T, I, generator=generator, dtype=torch.float64)
    QS = torch.linalg.qr(torch.randn(O, O, generator=generator, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(I, I, generator=generator, dtype=torch.float64))[0]
    reference = torch.einsum("op,bto,bti,iq->bpq", QS, g, a, QA)
    costs = rotation_costs(T, O, I)
    assert rotation_order(T, O, I) == expected and costs[expected] == min(costs.values())
    for order in ROTATION_ORDERS:
        with FlopCounterMode(display=False) as counted:  # the cost model counts what the kernels do
            R, g_rotated, a_rotated = rotated_gradients(g, a, QS, QA, order)
        assert counted.get_total_flops() == 2 * 3 * costs[order], order
        assert_close(R, reference, msg=order)
        for rotated, plain, Q in ((g_rotated, g, QS), (a_rotated, a, QA)):
            if rotated is not None:
                assert_close(rotated, plain @ Q, msg=order)
    assert_close(rotated_gradients(g, a, QS, QA)[0], reference, msg="auto")
    with pytest.raises(ValueError, match="rotation order must be auto or one of tokens, sequences"):
        rotated_gradients(g, a, QS, QA, "columns")


def test_covariances_are_averages_over_real_tokens_and_ekfac_eigenvalues_over_sequences(trained_llama):
    """A = mean_t ā ā ᵀ, S = mean_t g gᵀ over non-pad tokens; Λ = mean_n (Q_Sᵀ DW_n Q_A)² (empirical Fisher)."""
    model = trained_llama
    tokens = char_sequences(12, 20)
    batches = lm_batches(tokens, 4, pad_to=24)
    objective = ei.CausalLMObjective()
    config = ei.FactorConfig(strategy="ekfac", sample_labels=False, factor_dtype="float64", layers=(r"layers\.1\.mlp\.down_proj",))
    factors = ei.fit_factors(model, batches, objective, config, show_progress=False)
    layer = ei.select_layers(model, config.layers)[0]
    fitted = factors.layers[0]

    acts, grads = [], []
    for b in range(tokens.shape[0]):  # one unpadded sequence at a time, hooks as the reference capture
        with Capture([layer]) as capture:
            loss = objective.train_loss(model, lm_batches(tokens[b : b + 1], 1)[0], sample_labels=False)
        grads.append(capture.output_gradients(loss)[layer.name][0])
        acts.append(capture.activations(layer)[0])
    a_NI, g_NO = torch.cat(acts), torch.cat(grads)
    assert factors.num_tokens == a_NI.shape[0] == 12 * 20
    assert_close(fitted.A_II, a_NI.T @ a_NI / a_NI.shape[0])
    assert_close(fitted.S_OO, g_NO.T @ g_NO / g_NO.shape[0])
    per_sequence = autograd_gradients(model, [layer], lm_batches(tokens, 4),
                                      lambda m, one: objective.train_loss(m, one, sample_labels=False))
    DW_NOI = per_sequence.reshape(-1, layer.out_features, layer.in_dim)
    expected = (fitted.QS_OO.T @ DW_NOI @ fitted.QA_II).square().mean(0)
    assert_close(fitted.lambda_OI, expected)
    assert fitted.damping == pytest.approx(0.1 * expected.mean().item())


def test_kfac_eigenvalues_are_the_kronecker_product_of_the_factor_eigenvalues_times_tokens_per_sequence(trained_llama):
    """kfac: Λ = T̄ Λ_S ⊗ Λ_A, so T̄ (S ⊗ A) estimates the per-sequence G like the other strategies."""
    batches = lm_batches(char_sequences(8, 16), 4)
    factors = ei.fit_factors(trained_llama, batches, ei.CausalLMObjective(),
                             ei.FactorConfig(strategy="kfac", factor_dtype="float64"), show_progress=False)
    for layer in factors.layers:
        assert_close(layer.lambda_OI, 16 * torch.outer(layer.eigS_O, layer.eigA_I))
        reconstructed = layer.QA_II @ torch.diag(layer.eigA_I) @ layer.QA_II.T
        assert_close(reconstructed, layer.A_II)


def test_identity_scores_equal_explicit_gradient_dot_products(trained_llama):
    """identity: score(q, n) = ∇f_q · ∇log p(z_n), both from one autograd backward per sequence."""
    model = trained_llama
    objective = ei.CausalLMObjective()
    train = lm_batches(char_sequences(10, 16), 4, pad_to=18)
    queries = query_batches(QUERIES, batch_size=2)
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(strategy="identity"), show_progress=False)
    result = ei.compute_scores(model, factors, queries, train, objective, ei.ScoreConfig(compute_dtype="float64"), show_progress=False)
    layers = ei.select_layers(model)
    query_grads = autograd_gradients(model, layers, queries, lambda m, one: objective.measurement(m, one))
    train_grads = -autograd_gradients(model, layers, train, lambda m, one: objective.train_loss(m, one, sample_labels=False))
    assert_close(result.scores, query_grads @ train_grads.T)
    assert factors.num_sequences == result.num_train_sequences == 10
    assert_close(result.delta_logp, result.scores / 10)


def exact_ggn_reference(model, layers, batches) -> torch.Tensor:
    """G = mean_n Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t, with J_t from one backward per logit (a loop)."""
    P = sum(layer.num_params for layer in layers)
    G, count = torch.zeros(P, P, dtype=torch.float64), 0
    for x, _ in batches:
        for b in range(x.shape[0]):
            logits = model(x[b : b + 1])[0]
            rows = []
            for v in range(logits.shape[0]):
                model.zero_grad()
                logits[v].backward(retain_graph=True)
                rows.append(flat_tracked_gradient(layers))
            J_VP = torch.stack(rows)
            p = torch.softmax(logits.detach(), -1)
            G += J_VP.T @ (torch.diag(p) - torch.outer(p, p)) @ J_VP
            count += 1
    return G / count


def test_exact_scores_equal_a_dense_damped_gauss_newton_built_independently(digits):
    """exact: score = ∇f_qᵀ (G + diag λ)⁻¹ ∇log p(z_n), λ_ℓ = 0.1 mean(diag G_ℓℓ), G from a Jacobian loop."""
    model, train, queries = digits
    train = [(x[:40], y[:40]) for x, y in train[:2]]
    objective = ei.ClassificationObjective()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(strategy="exact", factor_dtype="float64"), show_progress=False)
    result = ei.compute_scores(model, factors, queries, train, objective, ei.ScoreConfig(compute_dtype="float64"), show_progress=False)

    layers = ei.select_layers(model)
    G = exact_ggn_reference(model, layers, train)
    assert_close(factors.ggn_PP, G)
    damping = []
    for layer in layers:
        start = sum(l.num_params for l in layers[: layers.index(layer)])
        block = torch.diagonal(G)[start : start + layer.num_params]
        damping.append(torch.full((layer.num_params,), 0.1 * block.mean().item(), dtype=torch.float64))
    inverse = torch.linalg.inv(G + torch.diag(torch.cat(damping)))
    query_grads = autograd_gradients(model, layers, queries, lambda m, one: objective.measurement(m, one))
    train_grads = -autograd_gradients(model, layers, train, lambda m, one: objective.train_loss(m, one, sample_labels=False))
    assert_close(result.scores, query_grads @ inverse @ train_grads.T)


def test_exact_gauss_newton_of_a_transformer_equals_the_mean_of_sampled_fishers_in_expectation(trained_llama):
    """On a causal LM, G_exact = E_y[∇L̃ ∇L̃ᵀ]: the mean outer product of many sampled-label gradients converges to it."""
    model = trained_llama
    layers = ei.select_layers(model, (r"layers\.1\.mlp\.down_proj",))
    batches = lm_batches(char_sequences(2, 8), 2)
    objective = ei.CausalLMObjective()
    G = exact_ggn(model, layers, batches, objective, show_progress=False)[0]
    copies = 1500  # every copy has its own sequence index, hence its own sampled labels
    repeated = lm_batches(char_sequences(2, 8).repeat(copies, 1), 500)
    total = torch.zeros_like(G)
    for item in capture_pass(model, layers, repeated, objective, loss="sampled", seed=0, show_progress=False):
        DW = sequence_gradients(item.grads[layers[0].name], item.acts[layers[0].name]).reshape(item.num_sequences, -1)
        total += DW.T @ DW
    estimate = total / (2 * copies)
    relative_error = ((estimate - G).norm() / G.norm()).item()
    assert relative_error < 0.1, relative_error


def test_fitting_in_groups_of_layers_under_a_memory_budget_gives_the_same_factors(trained_llama):
    from ekfac_influence.fit import factor_bytes, layer_groups

    train = lm_batches(char_sequences(16, 24), 4)
    objective = ei.CausalLMObjective()
    layers = ei.select_layers(trained_llama)
    budget_gb = 1.5 * max(factor_bytes(l) for l in layers) / 2**30
    assert len(layer_groups(layers, budget_gb)) > 2  # the budget really splits the work
    whole = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    grouped = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(factor_dtype="float64", memory_budget_gb=budget_gb),
                             show_progress=False)
    assert grouped.layer_names == whole.layer_names
    for a, b in zip(whole.layers, grouped.layers):
        torch.testing.assert_close(b.lambda_OI, a.lambda_OI, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(b.A_II, a.A_II, rtol=1e-10, atol=1e-14)
        assert b.damping == pytest.approx(a.damping, rel=1e-10)


def test_non_finite_fitted_factors_are_refused_naming_the_layer_and_the_factor(trained_llama, monkeypatch):
    """A NaN that appears only after the passes (here: one eigendecomposition that fails) is caught before the
    factors are returned, and the error names the layer and which of its factors holds it."""
    import ekfac_influence.fit as fit
    from ekfac_influence.passes import NonFiniteError

    train, config = lm_batches(char_sequences(8, 16), 4), ei.FactorConfig(strategy="kfac", factor_dtype="float64")
    clean = ei.fit_factors(trained_llama, train, ei.CausalLMObjective(), config, show_progress=False)
    seen, eigendecompose = [], fit.eigendecompose

    def failing(cov_XX):
        eigenvalues_X, eigenvectors_XX = eigendecompose(cov_XX)
        seen.append(cov_XX)
        if len(seen) == 4:
            eigenvectors_XX = torch.full_like(eigenvectors_XX, float("nan"))
        return eigenvalues_X, eigenvectors_XX

    monkeypatch.setattr(fit, "eigendecompose", failing)
    with pytest.raises(NonFiniteError) as raised:
        ei.fit_factors(trained_llama, train, ei.CausalLMObjective(), config, show_progress=False)
    # the layer and side whose covariance was the fourth one decomposed
    (name, key), = [(layer.name, {"A_II": "QA_II", "S_OO": "QS_OO"}[side]) for layer in clean.layers
                    for side in ("A_II", "S_OO") if torch.equal(getattr(layer, side), seen[3])]
    assert f"the factor {key} of layer {name} in the fitted factors" in str(raised.value)


def test_running_covariance_sums_equal_the_dense_products_of_all_rows():
    """`add_covariance` over batches (large factors as products of their halves, odd sizes, blocks, float32
    products into float64 sums) equals xᵀx of all rows at once, computed in float64."""
    from ekfac_influence.factors import BlockDiagonal, add_covariance

    torch.manual_seed(0)
    for X, blocks in ((7, 1), (301, 1), (600, 2), (513, 2)):
        batches = [torch.randn(n, X) for n in (50, 1, 80)]
        total = None
        for x_NX in batches:
            total = add_covariance(total, x_NX, blocks, torch.float64)
        rows = torch.cat(batches).double()
        dense = rows.T @ rows
        if blocks > 1:
            assert isinstance(total, BlockDiagonal)
            half = round(X / 2)
            assert [b.shape[0] for b in total.blocks] == [half, X - half]
            dense[:half, half:] = 0
            dense[half:, :half] = 0
            total = total.dense()
        assert total.dtype == torch.float64
        torch.testing.assert_close(total, dense, rtol=1e-5, atol=1e-4, msg=f"X={X}, blocks={blocks}")


def test_block_diagonal_factors_multiply_like_their_dense_matrix_and_are_stored_as_blocks(tmp_path):
    """Q @ x, x @ Q, Q.T, the rotations and preconditioning: equal to the dense block-diagonal matrix."""
    from ekfac_influence.factors import BlockDiagonal, blocked_covariance, eigendecompose
    from ekfac_influence.factors import flatten_blocks, unflatten_blocks

    torch.manual_seed(0)
    x_NX = torch.randn(40, 7, dtype=torch.float64)
    cov = blocked_covariance(x_NX, 2)
    assert isinstance(cov, BlockDiagonal) and [b.shape[0] for b in cov.blocks] == [4, 3]  # 7 = 4 + 3 (uneven)
    assert cov.numel() == 16 + 9
    dense = torch.zeros(7, 7, dtype=torch.float64)
    dense[:4, :4], dense[4:, 4:] = x_NX[:, :4].T @ x_NX[:, :4], x_NX[:, 4:].T @ x_NX[:, 4:]
    assert_close(cov.dense(), dense)
    values, Q = eigendecompose(cov)
    assert_close(Q.dense() @ torch.diag(values) @ Q.dense().T, dense)
    y = torch.randn(3, 7, 5, dtype=torch.float64)
    assert_close(Q @ y, Q.dense() @ y)
    assert_close(Q.T @ y, Q.dense().T @ y)
    assert_close(y.transpose(1, 2) @ Q, y.transpose(1, 2) @ Q.dense())
    g_BTO, a_BTI = torch.randn(2, 6, 7, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)
    QA = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    for order in ROTATION_ORDERS:
        for blocked, dense in zip(rotated_gradients(g_BTO, a_BTI, Q, QA, order), rotated_gradients(g_BTO, a_BTI, Q.dense(), QA, order)):
            assert (blocked is None) == (dense is None)
            if blocked is not None:
                assert_close(blocked, dense)
    lambda_OI = torch.rand(7, 5, dtype=torch.float64)
    V_QOI = torch.randn(3, 7, 5, dtype=torch.float64)
    assert_close(eigenbasis_inverse_product(V_QOI, Q, QA, lambda_OI, 0.1),
                 eigenbasis_inverse_product(V_QOI, Q.dense(), QA, lambda_OI, 0.1))
    flat = flatten_blocks({"layer/QS_OO": Q, "layer/lambda_OI": lambda_OI})
    assert sorted(flat) == ["layer/QS_OO#0", "layer/QS_OO#1", "layer/lambda_OI"]
    assert_close(unflatten_blocks(flat)["layer/QS_OO"].dense(), Q.dense())
