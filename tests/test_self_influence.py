"""Self-influence s(n) = ∇log p(z_n)ᵀ (G + λI)⁻¹ ∇log p(z_n), near-duplicate groups and the audit stage."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import ekfac_influence as ei
from conftest import char_sequences, lm_batches
from ekfac_influence import audit
from ekfac_influence import factors as factors_module
from ekfac_influence import similarity
from ekfac_influence.config import ROTATION_ORDERS
from ekfac_influence.factors import rotation_costs
from ekfac_influence.storage import PassCheckpoint

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac", "exact"]


@pytest.fixture(scope="module")
def llama_factors():
    """A trained 2-layer Llama, 12 training sequences of 20 characters in batches of 4, factors of every strategy."""
    from conftest import _trained_llama_state, make_llama

    model = make_llama()
    model.load_state_dict(_trained_llama_state())
    model.eval()
    train = lm_batches(char_sequences(12, 20, offset=3), 4)
    factors = {s: ei.fit_factors(model, train, ei.CausalLMObjective(), ei.FactorConfig(strategy=s, factor_dtype="float64"),
                                 show_progress=False) for s in STRATEGIES}
    return model, train, factors


F64 = ei.SelfInfluenceConfig(compute_dtype="float64")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_self_influence_is_the_diagonal_of_the_training_set_scored_against_itself(llama_factors, strategy):
    """The measurement of training sequence n as a query is log p(z_n) = −L(z_n): score(n, n) = s(n), layer by layer."""
    model, train, factors = llama_factors
    objective = ei.CausalLMObjective()
    reference = ei.compute_scores(model, factors[strategy], train, train, objective,
                                  ei.ScoreConfig(compute_dtype="float64"), show_progress=False)
    result = ei.self_influence(model, factors[strategy], train, objective, F64, show_progress=False)
    assert result.values.shape == (12,) and (result.values > 0).all()
    assert_close(result.values, reference.scores.diagonal(), rtol=1e-8, atol=0)
    for name, values in result.per_layer.items():
        assert_close(values, reference.per_layer[name].diagonal(), rtol=1e-8, atol=1e-14, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_token_self_influence_is_the_diagonal_of_the_per_token_scores(llama_factors, strategy):
    model, train, factors = llama_factors
    objective = ei.CausalLMObjective()
    reference = ei.compute_scores(model, factors[strategy], train, train, objective,
                                  ei.ScoreConfig(compute_dtype="float64", per_token=True), show_progress=False)
    result = ei.self_influence(model, factors[strategy], train, objective,
                               ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True), show_progress=False)
    diagonal_NT = torch.stack([reference.per_token[n, n] for n in range(12)])
    assert_close(result.per_token, diagonal_NT, rtol=1e-8, atol=1e-12)


def test_exact_self_influence_of_a_digits_mlp_equals_the_dense_damped_gauss_newton_form(digits):
    """s(n) = ∇fᵀ (G + diag(λ))⁻¹ ∇f with f = log p(y_n | x_n) and G = (1/N) Σ_n J_nᵀ (diag p − p pᵀ) J_n by autograd."""
    model, train, _ = digits
    train = train[:3]
    objective = ei.ClassificationObjective()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(strategy="exact", factor_dtype="float64"),
                             show_progress=False)
    X = torch.cat([x for x, _ in train])
    y = torch.cat([t for _, t in train])
    linears = [m for m in model if isinstance(m, nn.Linear)]
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logits(theta, x):
        return torch.func.functional_call(model, theta, (x[None],))[0]

    def flat(tree) -> torch.Tensor:  # per tracked layer [W | b] row-major, the factors' layout
        parts = []
        for i, m in enumerate(linears):
            key = f"{list(model).index(m)}"
            parts.append(torch.cat([tree[f"{key}.weight"], tree[f"{key}.bias"][..., None]], -1).flatten(-2))
        return torch.cat(parts, -1)

    J_NVP = flat(torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, X))
    p_NV = torch.softmax(torch.stack([logits(params, x) for x in X]), -1)
    H_NVV = torch.diag_embed(p_NV) - p_NV[:, :, None] * p_NV[:, None, :]
    G_PP = torch.einsum("nvp,nvw,nwq->pq", J_NVP, H_NVV, J_NVP) / len(X)
    grad_NP = J_NVP[torch.arange(len(X)), y] - torch.einsum("nv,nvp->np", p_NV, J_NVP)  # ∇ log softmax_y
    damping_P = torch.cat([torch.full((l.out_dim * l.in_dim,), l.damping, dtype=torch.float64) for l in factors.layers])
    expected_N = (grad_NP * torch.linalg.solve(G_PP + torch.diag(damping_P), grad_NP.T).T).sum(1)
    result = ei.self_influence(model, factors, train, objective, F64, show_progress=False)
    assert_close(result.values, expected_N, rtol=1e-7, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cosines_of_whitened_gradients_are_the_normalised_scores_between_training_sequences(llama_factors, strategy):
    """cos(n, m) = score(n, m) / √(s(n) s(m)), score from `compute_scores` of the training set against itself."""
    model, train, factors = llama_factors
    objective = ei.CausalLMObjective()
    S_NN = ei.compute_scores(model, factors[strategy], train, train, objective, ei.ScoreConfig(compute_dtype="float64"),
                             show_progress=False).scores
    W_ND = similarity.whitened_gradients(model, factors[strategy], train, objective, dtype=torch.float64)
    assert_close((W_ND * W_ND).sum(1), S_NN.diagonal(), rtol=1e-8, atol=0)
    scale_N = S_NN.diagonal().sqrt()
    assert_close(similarity.cosine_matrix(W_ND), S_NN / scale_N[:, None] / scale_N[None], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac", "exact"])
def test_sketched_cosines_estimate_the_cosines_of_the_whitened_gradients(llama_factors, strategy):
    model, train, factors = llama_factors
    objective = ei.CausalLMObjective()
    W_ND = similarity.whitened_gradients(model, factors[strategy], train, objective, dtype=torch.float64)
    exact_NN = similarity.cosine_matrix(W_ND)
    errors = []
    for side in (16, 64, 256):
        config = ei.SelfInfluenceConfig(compute_dtype="float64", duplicate_sketch=side)
        sketch_NK = ei.self_influence(model, factors[strategy], train, objective, config, show_progress=False).sketch
        assert sketch_NK.shape == (len(W_ND), side * side)
        errors.append((similarity.cosine_matrix(sketch_NK) - exact_NN).abs().mean().item())
    # these gradients have rank ≤ 16 (16 tokens): the error falls like 1/√k, from below 0.1 at k = 16
    assert errors[0] < 0.1 and errors[1] < errors[0] / 1.5 and errors[2] < errors[1] / 1.5, errors
    ratio_N = (sketch_NK**2).sum(1) / (W_ND**2).sum(1)  # ‖sketch‖² estimates s(n) = ‖W_n‖²
    assert (ratio_N - 1).abs().max() < 0.1


def test_the_whole_corpus_search_groups_copies_whatever_their_self_influence(llama_factors):
    model, train, factors = llama_factors
    ids = torch.cat([train[0]["input_ids"], train[1]["input_ids"]])
    real = torch.ones(8, ids.shape[1], dtype=torch.long)
    rows = [0, 1, 0, 2, 3, 1, 0, 4]  # copies of sequence 0 at 0, 2, 6 and of sequence 1 at 1, 5
    batches = [{"input_ids": ids[rows[:4]], "attention_mask": real[:4], "labels": ids[rows[:4]]},
               {"input_ids": ids[rows[4:]], "attention_mask": real[4:], "labels": ids[rows[4:]]}]
    result = ei.self_influence(model, factors["ekfac"], batches, ei.CausalLMObjective(), show_progress=False)
    assert similarity.near_duplicate_groups(result.sketch, 0.99) == [[0, 2, 6], [1, 5]]
    assert similarity.near_duplicate_groups(result.sketch, 0.99, chunk=3) == [[0, 2, 6], [1, 5]]  # pairs across chunks
    off = ei.self_influence(model, factors["ekfac"], batches, ei.CausalLMObjective(),
                            ei.SelfInfluenceConfig(duplicate_sketch=0), show_progress=False)
    assert off.sketch is None


@pytest.mark.parametrize("strategy", ["ekfac", "exact"])
def test_a_groups_joint_self_influence_is_its_summed_gradient_scored_against_itself(llama_factors, strategy):
    """s(G) = ‖Σ_{n∈G} W_n‖² = Σ_{n,m∈G} score(n, m), from `compute_scores` of the sequences against themselves.

    Copies: the sketched cosines are 1, so the value is exact (|G|² s(n) for identical sequences); other sequences:
    within the sketched cosines' error, Σ_{n≠m} δcos √(s(n) s(m)), which a sketch of 32 × 32 keeps under 5% here.
    """
    model, train, factors = llama_factors
    ids = torch.cat([train[0]["input_ids"], train[1]["input_ids"]])
    rows = [0, 1, 0, 2, 3, 1, 0, 4]  # copies of sequence 0 at 0, 2, 6 and of sequence 1 at 1, 5
    batches = [{"input_ids": ids[rows[:4]], "attention_mask": torch.ones(4, ids.shape[1], dtype=torch.long),
                "labels": ids[rows[:4]]},
               {"input_ids": ids[rows[4:]], "attention_mask": torch.ones(4, ids.shape[1], dtype=torch.long),
                "labels": ids[rows[4:]]}]
    objective = ei.CausalLMObjective()
    S_NN = ei.compute_scores(model, factors[strategy], batches, batches, objective,
                             ei.ScoreConfig(compute_dtype="float64"), show_progress=False).scores.double()
    result = ei.self_influence(model, factors[strategy], batches, objective, F64, show_progress=False)
    for members in ([0, 2, 6], [1, 5], [0, 2, 6, 1, 5]):  # copies, copies, two sets of copies (cos < 1 across)
        exact = float(S_NN[members][:, members].sum())
        estimate = similarity.joint_self_influence(result.sketch, result.values, members)
        if len(set(rows[n] for n in members)) == 1:
            assert estimate == pytest.approx(exact, rel=1e-8) and estimate == pytest.approx(
                len(members) ** 2 * float(result.values[members[0]]), rel=1e-8)
        else:
            assert estimate == pytest.approx(exact, rel=0.05)
            assert abs(estimate - exact) > 1e-10 * exact  # read from the sketch: not exact across different sequences
    assert similarity.joint_self_influence(result.sketch, result.values, [3]) == pytest.approx(float(result.values[3]))
    every = list(range(8))
    assert similarity.joint_self_influence(result.sketch, result.values, every, chunk=3) == pytest.approx(
        similarity.joint_self_influence(result.sketch, result.values, every), rel=1e-12)  # a group in chunks
    distinct = [3, 4, 7]
    exact = float(S_NN[distinct][:, distinct].sum())
    estimate = similarity.joint_self_influence(result.sketch, result.values, distinct)
    bound = sum(float(S_NN[n, n] * S_NN[m, m]) ** 0.5 for n in distinct for m in distinct if n != m)
    assert abs(estimate - exact) < 0.15 * bound, (estimate, exact, bound)


def test_duplicate_groups_join_chains_of_pairs_above_the_threshold_and_drop_singletons():
    cos = torch.eye(6, dtype=torch.float64)
    for i, j, value in [(0, 3, 0.95), (3, 5, 0.91), (1, 2, 0.89), (2, 4, 0.99)]:
        cos[i, j] = cos[j, i] = value
    assert similarity.duplicate_groups(cos, 0.9) == [[0, 3, 5], [2, 4]]
    assert similarity.duplicate_groups(cos, 0.999) == []


@pytest.mark.parametrize("tolerance", [0.0, 0.3])
def test_a_pass_interrupted_after_a_save_resumes_to_the_result_of_an_uninterrupted_one(llama_factors, damped_factors,
                                                                                     tolerance, tmp_path, monkeypatch):
    """Also with a tolerance, whose per-sequence error bound is saved and restored with the values."""
    model, train, factors = llama_factors
    if tolerance:
        factors = damped_factors
        _every_cut_worth_it(monkeypatch)
    objective = ei.CausalLMObjective()
    config = ei.SelfInfluenceConfig(compute_dtype="float64", tolerance=tolerance)
    whole = ei.self_influence(model, factors["ekfac"], train, objective, config, show_progress=False)
    checkpoint = PassCheckpoint(tmp_path, {"test": 1}, every_batches=2)  # batches 0 and 1 worked as one group
    original, seen, killed = audit.group_self_influence, [], []

    def failing(items, *args, **kwargs):
        seen.extend(item.index for item in items)
        if 2 in seen and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return original(items, *args, **kwargs)

    monkeypatch.setattr(audit, "group_self_influence", failing)
    with pytest.raises(RuntimeError, match="killed"):
        ei.self_influence(model, factors["ekfac"], train, objective, config, show_progress=False, checkpoint=checkpoint)
    seen.clear()
    resumed = ei.self_influence(model, factors["ekfac"], train, objective, config, show_progress=False,
                                checkpoint=PassCheckpoint(tmp_path, {"test": 1}, every_batches=2))
    assert seen == [2]  # batches 0 and 1 came from the checkpoint
    assert_close(resumed.values, whole.values, rtol=0, atol=0)
    if tolerance:
        assert (whole.error > 0).any()
        assert_close(resumed.error, whole.error, rtol=0, atol=0)
    for name in whole.per_layer:
        assert_close(resumed.per_layer[name], whole.per_layer[name], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["ekfac", "ekfac with a tolerance", "exact", "identity"])
def test_batches_worked_in_groups_give_the_values_of_each_batch_worked_alone(llama_factors, damped_factors, case,
                                                                            monkeypatch):
    """The pass works batches of equal T together, up to 16 sequences (`group_self_influence`): here batches of
    5, 1, 5, 5, 4 and 2 sequences at T = 20, then 2 batches of 3 padded to T = 24. Every value (per layer, per
    token, sketch, error) equals the pass that works each batch alone."""
    model, _, factors = llama_factors
    tolerance = 0.3 if case == "ekfac with a tolerance" else 0.0
    if tolerance:
        factors = damped_factors
        _every_cut_worth_it(monkeypatch)
    factors = factors[case.split()[0]]
    tokens = char_sequences(22, 20, offset=3)
    train = (lm_batches(tokens[:5], 5) + lm_batches(tokens[5:6], 1) + lm_batches(tokens[6:16], 5)
             + lm_batches(tokens[16:], 4)
             + lm_batches(char_sequences(6, 20, offset=40)[:, :17], 3, pad_to=24))
    config = ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True, tolerance=tolerance)
    groups, original = [], audit.group_self_influence

    def spy(items, *args, **kwargs):
        groups.append([item.index for item in items])
        values = original(items, *args, **kwargs)
        assert [len(per_layer[factors.layer_names[0]]) for per_layer, *_ in values] == [i.num_sequences for i in items]
        return values

    monkeypatch.setattr(audit, "group_self_influence", spy)
    grouped = ei.self_influence(model, factors, train, ei.CausalLMObjective(), config, show_progress=False)
    assert groups == [[0, 1, 2, 3], [4, 5], [6, 7]]  # 16 sequences; then a new T; then the end
    groups.clear()
    monkeypatch.setattr(audit, "GROUP_BYTES", 0)
    alone = ei.self_influence(model, factors, train, ei.CausalLMObjective(), config, show_progress=False)
    assert groups == [[i] for i in range(8)]
    assert_close(grouped.values, alone.values, rtol=1e-12, atol=0)
    for name in alone.per_layer:
        assert_close(grouped.per_layer[name], alone.per_layer[name], rtol=1e-12, atol=1e-18, msg=name)
    assert grouped.per_token.shape == (28, 24) and (grouped.per_token[22:, 17:] == 0).all()
    assert_close(grouped.per_token, alone.per_token, rtol=1e-10, atol=1e-14)
    assert_close(grouped.sketch, alone.sketch, rtol=1e-10, atol=1e-14)
    if tolerance:
        assert (alone.error > 0).any()
        assert_close(grouped.error, alone.error, rtol=1e-12, atol=0)


@pytest.mark.parametrize("budget, worked", [
    (150, [([0], [0]), ([1], [0, 1]), ([2], [0, 1, 2]), ([3], [0, 1, 2, 3]), ([4], [0, 1, 2, 3, 4])]),
    (10**9, [([0, 1], [0, 1]), ([2, 3], [0, 1, 2, 3, 4]), ([4], [0, 1, 2, 3, 4])]),
])
def test_a_batch_too_large_to_pair_is_worked_before_the_next_one_is_captured(budget, worked, monkeypatch):
    """Groups close at GROUP_SEQUENCES (here 8), at a new T, and as soon as one more batch like the last would pass
    GROUP_BYTES: a batch that cannot be paired is handed out alone before the capture is asked for the next, so
    peak memory stays one batch's where two would not fit."""
    from ekfac_influence.passes import BatchCapture

    monkeypatch.setattr(audit, "GROUP_SEQUENCES", 8)
    monkeypatch.setattr(audit, "GROUP_BYTES", budget)
    pulled = []

    def captures():
        for index, (B, T) in enumerate([(4, 8), (4, 8), (4, 8), (2, 8), (4, 9)]):
            pulled.append(index)
            yield BatchCapture(index, 4 * index, B, B * T, {"layer": torch.zeros(B, T, 3)},
                               {"layer": torch.zeros(B, T, 2)})

    groups = audit._grouped(captures(), lambda batches: 100 * len(batches), lambda item: False)
    assert [([batch.index for batch in group], list(pulled)) for group in groups] == worked


NAMED = r"non-finite values \(NaN or inf\) in the {} of layer model\.layers\.1\.mlp\.{} in batch 1 \(sequences 4\.\.7\)"


@pytest.mark.parametrize("strategy, tensor, layer, poison, message", [
    ("ekfac", "grads", "up_proj", float("nan"), NAMED.format("output gradients", "up_proj")),
    ("ekfac", "acts", "down_proj", float("inf"), NAMED.format("inputs", "down_proj")),  # gate and up share an input
    ("exact", "grads", "up_proj", float("-inf"), NAMED.format("output gradients", "up_proj")),
    ("ekfac", "grads", "up_proj", 1e30, r"the self-influence of layer model\.layers\.1\.mlp\.up_proj in batch 1 "
                                        r"\(sequences 4\.\.7\) is not finite although its activations and gradients "
                                        r"are: an overflow in torch\.float32 \(self_influence\.compute_dtype float64"),
])
def test_nan_or_inf_in_a_batch_is_named_by_layer_and_batch_and_an_overflow_as_such(llama_factors, strategy, tensor,
                                                                                  layer, poison, message, monkeypatch):
    """The pass skips the capture's check of every value and checks the values it computes: NaN or inf in one
    activation or gradient of one sequence still names the layer and the batch (also where the exact strategy
    couples the layers), and a finite gradient whose self-influence overflows float32 is called an overflow."""
    from ekfac_influence import passes
    from ekfac_influence.passes import NonFiniteError

    model, train, factors = llama_factors
    original = passes._forward_backward

    def poisoned(*args, **kwargs):
        item = original(*args, **kwargs)
        if item.index == 1:
            getattr(item, tensor)[f"model.layers.1.mlp.{layer}"][2, 5, 7] = poison
        return item

    monkeypatch.setattr(passes, "_forward_backward", poisoned)
    with pytest.raises(NonFiniteError, match=message):
        ei.self_influence(model, factors[strategy], train, ei.CausalLMObjective(), show_progress=False)


def test_the_self_influence_verb_audits_a_tiny_run_and_refuses_factors_of_another_model(tmp_path, monkeypatch, capsys):
    import json

    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    from ekfac_influence.cli import main
    from test_cli import make_project

    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    overrides = ["--self_influence.top", "3", "--self_influence.duplicate_threshold", "0.5", "--quiet"]
    assert main(["fit", "--config", "run.yaml", "--quiet"]) == 0
    assert main(["self-influence", "--config", "run.yaml", *overrides]) == 0
    out = tmp_path / "runs" / "tiny" / "self_influence"
    manifest = json.loads((out / "manifest.json").read_text())
    values_N = np.fromfile(out / "self_influence.f32", dtype=np.float32)
    assert values_N.shape == (manifest["num_sequences"],) and (values_N > 0).all()
    assert set(manifest["seconds"]) == {"pass", "extremes per token"} and min(manifest["seconds"].values()) >= 0
    records = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    highest = [r for r in records if r["kind"] == "highest"]
    assert [r["sequence"] for r in highest] == np.argsort(-values_N, kind="stable")[:3].tolist()
    lowest = [r for r in records if r["kind"] == "lowest"]
    assert [r["sequence"] for r in lowest] == np.argsort(values_N, kind="stable")[:3].tolist()
    assert [r["rank"] for r in lowest] == [1, 2, 3] and all(r["per_token"] and r["provenance"] for r in lowest)
    assert highest[0]["provenance"][0]["doc"] and highest[0]["text"]
    assert sum(highest[0]["per_token"]) == pytest.approx(float(values_N[highest[0]["sequence"]]), rel=1e-4)
    groups = [r for r in records if r["kind"] == "duplicate_group"]
    assert groups  # at cosine ≥ 0.5 this tiny corpus has some
    for group in groups:  # s(G) = Σ cos √(s s'): between Σ s + min cos · Σ_{n≠m} √(s s') and Σ s + Σ_{n≠m} √(s s')
        s_M = np.array([member["self_influence"] for member in group["sequences"]])
        cross = float(np.sqrt(np.outer(s_M, s_M)).sum() - s_M.sum())
        low, high = s_M.sum() + group["min_cosine"] * cross, s_M.sum() + cross
        assert low * (1 - 1e-6) <= group["joint_self_influence"] <= high * (1 + 1e-6), (low, group, high)
        assert group["joint_over_sum"] == pytest.approx(group["joint_self_influence"] / s_M.sum(), rel=1e-6)
    assert [g["group"] for g in groups] == list(range(len(groups)))
    joint_G = [g["joint_self_influence"] for g in groups]
    assert joint_G == sorted(joint_G, reverse=True)  # the strongest joint pull first
    for r in records[: len(records) - len(groups)]:  # a sequence's group badge names the group that holds it
        assert r["group"] is None or r["sequence"] in {m["sequence"] for m in groups[r["group"]]["sequences"]}
    page = (out / "self_influence.html").read_text()
    assert "<svg" in page and "<script" not in page and "default-src 'none'" in page
    assert page.count("Taken as one, the group's self-influence s(G)") == len(groups)
    assert json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["stages"]["self_influence"]
    assert not (tmp_path / "runs" / "tiny" / ".self_influence.partial").exists()
    # top ≥ N / 2: every sequence is shown, so the per-token values come from the one pass, equal to the second's
    assert main(["self-influence", "--config", "run.yaml", "--overwrite", "--quiet", "--self_influence.top",
                 str(-(-len(values_N) // 2))]) == 0
    assert set(json.loads((out / "manifest.json").read_text())["seconds"]) == {"pass"}
    again = {(r["kind"], r["rank"]): r for r in map(json.loads, (out / "top.jsonl").read_text().splitlines())
             if r["kind"] != "duplicate_group"}
    for r in (r for r in records if r["kind"] != "duplicate_group"):
        twin = again[r["kind"], r["rank"]]
        assert twin["sequence"] == r["sequence"] and twin["text"] == r["text"]
        assert twin["per_layer"] == pytest.approx(r["per_layer"], rel=1e-5)
        assert twin["per_token"] == pytest.approx(r["per_token"], rel=1e-4, abs=1e-6 * max(map(abs, r["per_token"])))
    assert main(["self-influence", "--config", "run.yaml", *overrides, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["self-influence", "--config", "run.yaml", "--quiet"]) == 2  # finished: not recomputed silently
    assert "--overwrite" in capsys.readouterr().err
    assert manifest["tolerance"] == 0 and manifest["max_relative_error"] is None and "tolerance ε" not in page
    assert main(["self-influence", "--config", "run.yaml", *overrides, "--overwrite",
                 "--self_influence.tolerance", "0.5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tolerance"] == 0.5 and 0 <= manifest["max_relative_error"] <= 1
    assert "tolerance ε <b>0.5: each s(n) is high by at most" in (out / "self_influence.html").read_text()

    # query.normalize takes s(n) from the run's audit for its pool; without an audit it says what it does instead
    capsys.readouterr()
    normalised = ["--query.candidates", "all", "--query.normalize", "relatif", "--query.rerank", "0", "--quiet"]
    out.rename(out.with_name("audit.aside"))
    assert main(["query", "--config", "run.yaml", "--queries.name", "raw", *normalised]) == 0
    assert "rescore the scan's best raw candidates; a self-influence audit" in capsys.readouterr().out
    out.with_name("audit.aside").rename(out)
    assert main(["query", "--config", "run.yaml", "--queries.name", "pooled", *normalised]) == 0
    assert "the scan keeps the best normalised candidates, by s(n) from" in capsys.readouterr().out
    for name, pool in (("raw", "best raw scores"), ("pooled", "best normalised scores")):
        answers = [json.loads(line) for line in (tmp_path / "runs/tiny/queries" / name / "topk.jsonl").read_text().splitlines()]
        assert all(pool in record["ranking"] for record in answers) and answers[0]["top_positive"]

    torch.manual_seed(1)  # another model where the factors' model was
    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    other.save_pretrained(tmp_path / "model")
    assert main(["self-influence", "--config", "run.yaml", "--overwrite", "--quiet"]) == 2
    assert "factors were fitted for another model" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["relatif", "cosine"])
def test_normalised_query_rankings_divide_each_raw_score_by_the_self_influence_forms(kind):
    """relatif = score / √s(n), cosine = score / (‖P^{1/2}∇f‖ √s(n)): checked against compute_scores of the queries
    and the diagonal forms (the query's own ∇fᵀP∇f from scoring the query against itself)."""
    from conftest import bpe_tokenizer, corpus_batches
    from transformers import LlamaConfig, LlamaForCausalLM

    from ekfac_influence.data import pack, pad_token_id
    from ekfac_influence.demo import pydoc_documents
    from ekfac_influence.query_inputs import Query, collate_query_rows, encode_query, query_rows

    tokenizer = bpe_tokenizer()
    corpus = pack(pydoc_documents()[:2], tokenizer, length=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).double().eval()
    train = corpus_batches(corpus, 8)
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    query = Query("The assert statement", " is a debugging aid", id="a")
    config = ei.QueryConfig(rank=None, rerank=30, top_k=4, batch_size=8, compute_dtype="float64", normalize=kind)
    record = ei.query_influence(model, tokenizer, factors, corpus, [query], config, show_progress=False).records[0]
    rows, _ = query_rows([encode_query(tokenizer, query, max_length=64)])
    batch = collate_query_rows(rows, pad_token_id(tokenizer))
    raw_N = ei.compute_scores(model, factors, [batch], train, objective, ei.ScoreConfig(compute_dtype="float64"),
                              show_progress=False).scores[0]
    self_N = ei.self_influence(model, factors, train, objective, F64, show_progress=False).values
    query_form = ei.compute_scores(model, factors, [batch], [batch], objective, ei.ScoreConfig(compute_dtype="float64"),
                                   show_progress=False).scores[0, 0]
    expected_N = raw_N / self_N.sqrt() / (query_form.sqrt() if kind == "cosine" else 1)
    hits = record["top_positive"] + record["top_negative"]
    assert record["ranking"].startswith(kind) and hits
    for hit in hits:
        assert hit["score"] == pytest.approx(float(raw_N[hit["sequence"]]), rel=1e-6)
        assert hit["normalized_score"] == pytest.approx(float(expected_N[hit["sequence"]]), rel=1e-6)
    # the normalised value re-ranks the scan's 30 best and 30 worst raw candidates
    pool = set(torch.argsort(-raw_N)[:30].tolist()) | set(torch.argsort(raw_N)[:30].tolist())
    best = sorted(pool, key=lambda n: -float(expected_N[n]))[:4]
    assert [h["sequence"] for h in record["top_positive"]] == best
    assert best != torch.argsort(-raw_N)[:4].tolist()  # the normalisation changed the ranking
    if kind == "cosine":
        assert all(abs(h["normalized_score"]) <= 1 + 1e-9 for h in hits)
    assert "best raw scores" in record["ranking"]

    # with every s(n) given (an audit's values), the scan keeps the best normalised candidates: a pool of 4 then
    # holds the corpus's best normalised sequences, which the best 4 raw scores do not
    narrow = dataclasses.replace(config, rerank=0)
    audited = ei.query_influence(model, tokenizer, factors, corpus, [query], narrow, show_progress=False,
                                 self_influence_N=self_N.numpy()).records[0]
    unaudited = ei.query_influence(model, tokenizer, factors, corpus, [query], narrow, show_progress=False).records[0]
    everywhere = [n for n in torch.argsort(-expected_N).tolist() if expected_N[n] > 0][:4]
    assert [h["sequence"] for h in audited["top_positive"]] == everywhere
    assert [h["sequence"] for h in unaudited["top_positive"]] != everywhere
    assert "best normalised scores" in audited["ranking"]
    for hit in audited["top_positive"] + audited["top_negative"]:
        assert hit["normalized_score"] == pytest.approx(float(expected_N[hit["sequence"]]), rel=1e-6)
    with pytest.raises(ValueError, match="finite s\\(n\\) for each of the corpus"):
        ei.query_influence(model, tokenizer, factors, corpus, [query], narrow, show_progress=False,
                           self_influence_N=self_N.numpy()[:-1])


@pytest.mark.slow
def test_two_processes_give_the_self_influence_and_whitened_gradients_of_one(tmp_path):
    from safetensors.torch import load_file

    from test_distributed import run_alone_and_on_two_processes

    worker = __import__("pathlib").Path(__file__).parent / "workers" / "distributed_self_influence.py"
    run_alone_and_on_two_processes(worker, tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    assert one["values"].shape == (28,)
    for key, value in one.items():
        if key not in ("world", "whitened", "sketch"):
            assert_close(two[key], value, rtol=1e-10, atol=1e-14, msg=key)
    # the sketch is of the symmetric root P^{1/2}: the same whatever signs each fit's eigh chose
    assert_close(two["sketch"], one["sketch"], rtol=1e-7, atol=1e-9 * one["sketch"].abs().max().item())
    # each fit's eigh may flip an eigenvector's sign: the basis-free inner products must agree
    assert_close(two["whitened"] @ two["whitened"].T, one["whitened"] @ one["whitened"].T, rtol=1e-9, atol=1e-9)


def test_planted_oddities_rank_in_the_top_5_percent_and_the_copies_form_one_group():
    """Random bytes, German, shuffled tokens and 20 copies of a paragraph planted in the quick demo corpus.

    The quick demo's LM trained for 8 epochs (as the demo trains its own), EK-FAC, s(n) over all 767
    sequences (scripts/planted_oddities.py, docs/self_influence.md). The copies are memorised, so
    their s(n) is LOW: they are found by the whole-corpus sketch search, with the first sequence of
    the document they were copied from; taken as one, s(G) = ‖Σ W_n‖², they pull over 10 times harder than
    as many ordinary sequences drawn at random.
    """
    import dataclasses
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("planted", Path(__file__).parents[1] / "scripts" / "planted_oddities.py")
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)
    found = planted.audit_planted(dataclasses.replace(planted.DemoConfig.quick(), epochs=8))
    for kind in ("random", "german", "shuffled"):
        assert max(found["percentile"][kind]) <= 5, (kind, found["percentile"][kind])
    assert found["groups_with_copies"] == [20]  # every copy, in one group
    assert found["group_of_copies_size"] == [21] and found["source_in_group"]
    # taken as one, the copies add up like copies (s(G) ≈ 21 × Σ s(n)), as many ordinary sequences like unrelated ones
    (copies,), control = found["group_of_copies_joint_over_median"], found["control_joint_over_median"]
    assert copies > 10 * control, (copies, control)
    assert found["group_of_copies_joint_over_sum"][0] > 15 and 0.5 < found["control_joint_over_sum"] < 2, found


def test_identical_sequences_have_whitened_cosine_one_and_form_one_group(llama_factors):
    model, train, factors = llama_factors
    ids = train[0]["input_ids"]
    copies = [{"input_ids": ids[[0, 1, 0, 2, 0]], "attention_mask": torch.ones(5, ids.shape[1], dtype=torch.long),
               "labels": ids[[0, 1, 0, 2, 0]]}]
    W_CD = similarity.whitened_gradients(model, factors["ekfac"], copies, ei.CausalLMObjective(), dtype=torch.float64)
    assert similarity.duplicate_groups(similarity.cosine_matrix(W_CD), 0.9) == [[0, 2, 4]]


def test_the_audit_page_shows_each_sequence_byte_for_byte_escaped_and_runs_no_script():
    import html
    import re
    from types import SimpleNamespace

    import numpy as np

    from conftest import bpe_tokenizer
    from ekfac_influence.audit_report import CSP, group_record, render_page, sequence_record

    tokenizer = bpe_tokenizer()
    texts = ["東京と京都 🎉👍🏽 naïve café", '<script>window.__pwned = 1</script><img src=x onerror="alert(1)">']
    ids = [tokenizer(text)["input_ids"] for text in texts]
    T = max(map(len, ids))
    corpus = SimpleNamespace(tokens_NT=np.array([row + [0] * (T - len(row)) for row in ids], dtype=np.int32),
                             lengths_N=np.array([len(row) for row in ids]),
                             provenance=[[{"doc": "tokyo <b>", "row": 0}], [{"doc": "payload", "row": 1}]])
    values_N = np.array([2.0, 0.5])
    records = [sequence_record("highest", 1, 0, 2.0, corpus, tokenizer, per_token=[0.1] * len(ids[0])),
               sequence_record("lowest", 1, 1, 0.5, corpus, tokenizer, per_token=[-0.01] * len(ids[1])),
               group_record(0, [0, 1], values_N, 0.91, 9.0, corpus, tokenizer)]
    assert [r["text"] for r in records[:2]] == texts and "".join(records[0]["tokens"]) == texts[0]
    page = render_page(values_N, records, {"strategy": "ekfac", "duplicate_threshold": 0.9})
    shown = [html.unescape(re.sub(r"<[^>]+>", "", box)) for box in re.findall(r'<div class="tokens">(.*?)</div>', page)]
    assert shown == texts  # the token spans, joined, are the text byte for byte: no �, no added space
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;window.__pwned" in page
    assert "tokyo &lt;b&gt;:0" in page and "every pairwise sketched cosine ≥ 0.910" in page and "<svg" in page
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page


def test_the_audit_histogram_counts_every_positive_self_influence_and_tokens_are_shaded_by_their_sign():
    import re
    from types import SimpleNamespace

    import numpy as np

    from conftest import bpe_tokenizer
    from ekfac_influence.audit_report import histogram, render_page, sequence_record

    values_N = np.array([1e-3, 2e-3, 0.5, 0.7, 3.0, 40.0, 0.0, np.nan, np.inf, -1.0])
    drawn = histogram(values_N, bins=5)
    counts = [r["count"] for r in drawn["rects"]]
    expected, edges = np.histogram(np.log10([1e-3, 2e-3, 0.5, 0.7, 3.0, 40.0]), bins=5)
    assert counts == expected.tolist() and sum(counts) == 6  # zero, NaN, inf and negative values are not drawn
    assert (drawn["low"], drawn["high"], drawn["peak"]) == (f"{edges[0]:.2f}", f"{edges[-1]:.2f}", max(counts))
    heights = [float(r["height"]) for r in drawn["rects"]]
    assert heights[counts.index(max(counts))] == max(heights) and heights[counts.index(0)] == 0
    assert histogram(np.array([0.0, -2.0])) is None

    tokenizer = bpe_tokenizer()
    ids = tokenizer("one two three")["input_ids"]
    corpus = SimpleNamespace(tokens_NT=np.array([ids]), lengths_N=np.array([len(ids)]), provenance=[[{"doc": "d", "row": 0}]])
    per_token = [1.0, -0.5] + [0.0] * (len(ids) - 2)
    page = render_page(np.array([0.5]), [sequence_record("highest", 1, 0, 0.5, corpus, tokenizer, per_token=per_token)], {})
    styles = re.findall(r'<span class="tok"( style="[^"]*")? title="([^"]*)">', page)
    assert len(styles) == len(ids)
    # shaded within the sequence: its largest |s_t| at full alpha, red for > 0, teal for < 0, none for 0
    assert [style for style, _ in styles[:3]] == [' style="background:rgba(239,68,68,0.85)"',
                                                  ' style="background:rgba(20,184,166,0.425)"', ""]
    assert page.count("<rect ") == len(histogram(np.array([0.5]))["rects"])  # every bar drawn, with its count
    assert "<title>1 sequences with log10 s in" in page


def test_the_audit_page_links_each_sequence_to_its_documents_and_group_and_back(monkeypatch):
    """Every in-page link has one target: a sequence's source documents (a section per document, listing the shown
    sequences from it and linking back), its group, and a group member to its record where the lists show it."""
    import html
    import re
    from html.parser import HTMLParser
    from types import SimpleNamespace

    import numpy as np

    from conftest import bpe_tokenizer
    from ekfac_influence import audit_report
    from ekfac_influence.audit_report import group_record, render_page, sequence_record

    tokenizer = bpe_tokenizer()
    ids = [tokenizer(text)["input_ids"] for text in ("first text", "second", "packed over two", "a copy")]
    T = max(map(len, ids))
    A, B, C = {"doc": 'a "quoted" <doc>', "row": 0}, {"doc": "b", "row": 1}, {"doc": "c", "row": 2}
    corpus = SimpleNamespace(tokens_NT=np.array([row + [0] * (T - len(row)) for row in ids], dtype=np.int32),
                             lengths_N=np.array([len(row) for row in ids]),
                             provenance=[[dict(A, char_span=[0, 10])], [dict(B, char_span=[0, 6])],
                                         [dict(A, char_span=[10, 20]), dict(B, char_span=[6, 9])],
                                         [dict(C, char_span=[0, 6])]])
    values_N = np.array([4.0, 0.1, 2.0, 3.0])
    records = [sequence_record("highest", 1, 0, 4.0, corpus, tokenizer, group=0),
               sequence_record("highest", 2, 2, 2.0, corpus, tokenizer),
               sequence_record("lowest", 1, 1, 0.1, corpus, tokenizer),
               sequence_record("lowest", 2, 2, 2.0, corpus, tokenizer),  # shown twice: one anchor
               group_record(0, [0, 3], values_N, 0.95, 2.5, corpus, tokenizer)]
    page = render_page(values_N, records, {"strategy": "ekfac", "duplicate_threshold": 0.9})

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.hrefs, self.stack = [], [], []  # hrefs: (from the element with this id, to)

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "id" in attrs:
                self.ids.append(attrs["id"])
            if tag == "a":
                self.hrefs.append((next((i for _, i in reversed(self.stack) if i), None), attrs["href"][1:]))
            elif tag != "meta":  # the page's one void element
                self.stack.append((tag, attrs.get("id")))

        def handle_endtag(self, tag):
            if any(open_tag == tag for open_tag, _ in self.stack):
                while self.stack.pop()[0] != tag:
                    pass

    parsed = Links()
    parsed.feed(page)
    links = set(parsed.hrefs)
    assert len(parsed.ids) == len(set(parsed.ids))  # each sequence anchored once
    assert {to for _, to in links} <= set(parsed.ids)  # no link without its target
    documents = {html.unescape(re.search(r'id="(doc-\d+)"><h3 class="doc">(.*?)</h3>', block).group(2)):
                 re.search(r'id="(doc-\d+)"', block).group(1) for block in page.split('<div class="source" ')[1:]}
    assert sorted(documents) == ['a "quoted" <doc>:0', "b:1", "c:2"]  # escaped on the page, the name exactly
    a, b, c = (documents[name] for name in sorted(documents))
    assert {("seq-0", a), ("seq-0", "group-0"), ("seq-2", a), ("seq-2", b), ("seq-1", b)} <= links
    assert {(a, "seq-0"), (a, "seq-2"), (b, "seq-2"), (b, "seq-1"), (c, "group-0")} <= links  # back from the documents
    assert ("group-0", "seq-0") in links and not any(to == "seq-3" for _, to in links)  # seq 3: only in its group
    assert ("group-0", c) in links
    assert "2 sequences, every pairwise sketched cosine ≥ 0.950" in page
    assert records[-1]["joint_self_influence"] == 2.5 and records[-1]["joint_over_sum"] == 2.5 / 7  # s(n) 4 and 3
    assert ("s(G) = ‖Σ<sub>n∈G</sub> P<sup>1/2</sup>∇log p(z<sub>n</sub>)‖² is 2.500e+00 (exact s(n), sketched cosines): "
            "0.357 × the sum of its members' s(n) (about 1 × for unrelated sequences, 2 × for 2 identical ones)") in page
    monkeypatch.setattr(audit_report, "COSINE_SAMPLE", 1)  # a group larger than the pairs its lowest cosine is over
    sampled = render_page(values_N, records[:-1] + [group_record(0, [0, 3], values_N, 0.95, 2.5, corpus, tokenizer)], {})
    assert "2 sequences, every pairwise sketched cosine among its first 1 sequences ≥ 0.950" in sampled


@pytest.mark.parametrize("order", ROTATION_ORDERS)
def test_self_influence_tokens_and_sketches_do_not_depend_on_the_rotation_order(llama_factors, order, monkeypatch):
    """Every order forced on every layer gives the s(n), per-layer, per-token values and k × k sketches of the
    cost model's choice."""
    model, train, factors = llama_factors
    config = ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True)
    chosen = ei.self_influence(model, factors["ekfac"], train, ei.CausalLMObjective(), config, show_progress=False)
    monkeypatch.setattr(factors_module, "rotation_order", lambda *shape: order)
    forced = ei.self_influence(model, factors["ekfac"], train, ei.CausalLMObjective(), config, show_progress=False)
    assert_close(forced.values, chosen.values, rtol=1e-10, atol=0)
    for name in chosen.per_layer:
        assert_close(forced.per_layer[name], chosen.per_layer[name], rtol=1e-10, atol=1e-15)
    assert_close(forced.per_token, chosen.per_token, rtol=1e-9, atol=1e-13)
    assert_close(forced.sketch, chosen.sketch, rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------- tolerance-ε truncation


def test_the_truncation_cross_holds_every_direction_above_the_tolerance_and_bounds_the_rest():
    """On fast-falling spectra (a Kronecker product with noise, as EK-FAC's corrected eigenvalues are) the cross
    holds every w > ε, w_rest is the largest w outside it, and it costs less than a full rotation."""
    generator = torch.Generator().manual_seed(0)
    O, I, damping, shapes, kept = 24, 18, 1e-3, set(), set()
    for _ in range(10):
        lam_OI = torch.outer(torch.logspace(0, -5, O, dtype=torch.float64), torch.logspace(0, -4, I, dtype=torch.float64))
        lam_OI = lam_OI * torch.randn(O, I, generator=generator, dtype=torch.float64).mul(2).exp()
        lam_OI = lam_OI[torch.randperm(O, generator=generator)][:, torch.randperm(I, generator=generator)]
        layer = audit.LayerFactors(name="x", out_dim=O, in_dim=I, damping=damping, lambda_OI=lam_OI,
                                   QS_OO=torch.eye(O, dtype=torch.float64), QA_II=torch.eye(I, dtype=torch.float64))
        w_OI = lam_OI / (lam_OI + damping)
        costs = []
        for tolerance in (0.01, 0.1, 0.5, 0.9):
            cut = audit.truncation(layer, tolerance)
            costs.append(cut.cost)
            inside_OI = torch.zeros(O, I, dtype=torch.bool)
            inside_OI[cut.rows_K] = True
            inside_OI[:, cut.columns_J] = True
            assert (w_OI[~inside_OI] <= tolerance).all()
            assert cut.w_rest == (float(w_OI[~inside_OI].max()) if (~inside_OI).any() else 0.0)
            assert cut.cost == len(cut.rows_K) * (2 * O * I + I * I) + len(cut.columns_J) * (2 * O * I + O * O)
            assert cut.cost <= min(O * (2 * O * I + I * I), I * (2 * O * I + O * O))  # never worse than all rows or all columns
            shapes.add((len(cut.rows_K) > 0, len(cut.columns_J) > 0))
            taken = any(cut.worth_it(T, O, I) for T in [*range(1, 200), *(2**j for j in range(8, 40))])
            assert cut.ever_worth_it(O, I) == taken  # the plan drops exactly the crosses no length would take
            kept.add(taken)
        assert costs == sorted(costs, reverse=True)  # fewer directions above a larger tolerance
    assert shapes == {(True, False), (False, True), (True, True)}  # rows only, columns only and true crosses
    assert kept == {True, False}
    O, I = 512, 128  # the benchmark's layer, eigenvalues of S and A falling as 1/k²: 1% of w above 0.05
    lam_OI = torch.outer(torch.arange(1, O + 1, dtype=torch.float64)**-2, torch.arange(1, I + 1, dtype=torch.float64)**-2)
    layer = audit.LayerFactors(name="x", out_dim=O, in_dim=I, damping=1e-3, lambda_OI=lam_OI,
                               QS_OO=torch.eye(O, dtype=torch.float64), QA_II=torch.eye(I, dtype=torch.float64))
    cut = audit.truncation(layer, 0.05)
    assert cut.worth_it(T=128, O=O, I=I) and cut.ever_worth_it(O, I) and cut.cost < 0.2 * min(rotation_costs(128, O, I).values())


@pytest.fixture(scope="module")
def damped_factors(llama_factors):
    """kfac and ekfac factors of the trained Llama with λ = mean(Λ): a spectrum where many directions have a small
    w = Λ / (Λ + λ), as on a larger trained model (the tiny model's spectrum is flat at the default damping)."""
    model, train, _ = llama_factors
    return {s: ei.fit_factors(model, train, ei.CausalLMObjective(),
                              ei.FactorConfig(strategy=s, factor_dtype="float64", damping_factor=1.0), show_progress=False)
            for s in ("kfac", "ekfac")}


def _every_cut_worth_it(monkeypatch):
    """The tiny model's layers are small enough that a full rotation is cheaper; force the cross to test its math."""
    monkeypatch.setattr(audit.Truncation, "worth_it", lambda self, T, O, I: True)
    monkeypatch.setattr(audit.Truncation, "ever_worth_it", lambda self, O, I: True)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("tolerance", [0.05, 0.3])
def test_a_tolerance_over_estimates_each_self_influence_by_at_most_its_stored_error(llama_factors, damped_factors,
                                                                                     strategy, tolerance, monkeypatch):
    """s(n) − error(n) ≤ exact s(n) ≤ s(n), layer by layer and summed; error(n) ≤ ε / (1 − ε) · s(n); per-token
    values add up to s(n) and lie near the exact ones; the sketch is the exact sketch up to the same order."""
    model, train, _ = llama_factors
    factors, objective = damped_factors, ei.CausalLMObjective()
    config = ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True, duplicate_sketch=8)
    exact = ei.self_influence(model, factors[strategy], train, objective, config, show_progress=False)
    _every_cut_worth_it(monkeypatch)
    cut = ei.self_influence(model, factors[strategy], train, objective,
                            ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True, duplicate_sketch=8,
                                                   tolerance=tolerance), show_progress=False)
    slack = 1e-12 * exact.values
    assert ((cut.values - cut.error - slack <= exact.values) & (exact.values <= cut.values + slack)).all()
    assert (cut.error <= tolerance / (1 - tolerance) * cut.values + slack).all()
    assert (cut.values - exact.values).max() > 1e-6 * exact.values.max()  # something was truncated
    assert cut.max_relative_error() == pytest.approx(float((cut.error / cut.values).max()))
    assert exact.error is None and exact.max_relative_error() is None
    for name in exact.per_layer:
        assert (exact.per_layer[name] <= cut.per_layer[name] * (1 + 1e-12)).all(), name
    assert_close(cut.per_token.sum(1), cut.values, rtol=1e-10, atol=0)
    gap_N = (cut.values - exact.values)[:, None]
    assert ((cut.per_token - exact.per_token).abs() <= 2 * gap_N + 1e-12).all()
    assert_close(cut.sketch, exact.sketch, rtol=0, atol=float(2 * (gap_N.max() * exact.values.max()) ** 0.5))


def test_a_tolerance_below_every_direction_gives_the_exact_self_influence(llama_factors, monkeypatch):
    model, train, factors = llama_factors
    config = ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True)
    exact = ei.self_influence(model, factors["ekfac"], train, ei.CausalLMObjective(), config, show_progress=False)
    _every_cut_worth_it(monkeypatch)
    cut = ei.self_influence(model, factors["ekfac"], train, ei.CausalLMObjective(),
                            ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True, tolerance=1e-300),
                            show_progress=False)
    assert (cut.error == 0).all()
    assert_close(cut.values, exact.values, rtol=1e-10, atol=0)
    assert_close(cut.per_token, exact.per_token, rtol=1e-9, atol=1e-12)
    assert_close(cut.sketch, exact.sketch, rtol=1e-9, atol=1e-12)


def test_a_cross_never_cheaper_than_a_full_rotation_is_not_kept_and_the_audit_is_exact(llama_factors):
    """A tolerance below every direction puts all rows (or all columns) in the cross, which costs more than rotating DW
    at any length: the plan keeps no cross (nor its copies of the eigenvectors), and the pass is exact, error 0."""
    model, train, factors = llama_factors
    config = ei.SelfInfluenceConfig(compute_dtype="float64", tolerance=1e-300)
    plan = audit.plan_audit(factors["ekfac"], config)
    assert all(layer.cut is None for layer in plan.layers.values())
    whole = audit.truncation(factors["ekfac"].layers[0], 1e-300)
    assert not whole.ever_worth_it(whole.QS_OK.shape[0], whole.QA_IJ.shape[0])
    exact = ei.self_influence(model, factors["ekfac"], train, ei.CausalLMObjective(),
                              ei.SelfInfluenceConfig(compute_dtype="float64"), show_progress=False)
    cut = ei.self_influence(model, factors["ekfac"], train, ei.CausalLMObjective(), config, show_progress=False)
    assert cut.max_relative_error() == 0 and exact.max_relative_error() is None
    assert_close(cut.values, exact.values, rtol=1e-12, atol=0)


def test_a_tolerance_outside_0_to_1_is_refused_by_name():
    for bad in (-0.1, 1.0):
        with pytest.raises(ei.ConfigError, match="self_influence.tolerance"):
            ei.SelfInfluenceConfig(tolerance=bad)
