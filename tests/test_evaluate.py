"""The evaluation harness (ekfac_influence.lds, planted, metrics, scorecard, evaluate): its math, its cache, its CLI.

LDS_q = ρ_spearman over subsets m of (Σ_{n ∈ S_m} score(q, n), f_q(S_m)); recall@k = |planted ∩ top k| /
min(k, |planted|); RR = 1 / (rank of the best planted sequence). References: scipy.stats, hand cases,
and a training function whose effect influence predicts exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from conftest import bpe_tokenizer, make_mlp, train_lm
from ekfac_influence.cli import main
from ekfac_influence.config import ConfigError, EvaluateConfig
from ekfac_influence.run_config import load_run_config
from ekfac_influence.data import pack
from ekfac_influence.demo import pydoc_documents
from ekfac_influence.lds import draw_subsets, linear_datamodeling_score
from ekfac_influence.metrics import (average_ranks, lds_per_query, mean_and_se, recall_at, reciprocal_rank,
                                     retrieval_metrics, retrieval_ranks, spearman)
from ekfac_influence.objectives import ClassificationObjective
from ekfac_influence.planted import invented_facts, plant_documents, planted_fact_recall
from ekfac_influence.scorecard import format_table, html_page, write_evaluation
from ekfac_influence.train import epoch_orders
from ekfac_influence.variants import variant, variants_from_config

DOUBLE = dict(factor_dtype="float64", compute_dtype="float64")


# ----------------------------------------------------------------------------- Spearman and the LDS


def test_spearman_matches_a_hand_computed_case_and_scipy_with_ties():
    x, y = np.array([1.0, 2, 3, 4, 5]), np.array([5.0, 6, 7, 8, 7])
    # ranks of y: 1, 2, 3.5, 5, 3.5; deviations from 3: rx = (-2, -1, 0, 1, 2), ry = (-2, -1, 0.5, 2, 0.5)
    # ρ = Σ rx ry / √(Σ rx² Σ ry²) = (4 + 1 + 0 + 2 + 1) / √(10 × 9.5) = 8 / √95
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    generator = np.random.default_rng(0)
    for _ in range(20):
        a, b = generator.integers(0, 5, 12).astype(float), generator.normal(size=12)
        np.testing.assert_allclose(average_ranks(a), scipy.stats.rankdata(a))
        assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman(np.ones(4), np.arange(4.0)))  # a constant variable has no rank correlation
    with pytest.raises(ValueError, match="one length"):
        spearman(np.ones(3), np.ones(4))


def test_lds_per_query_is_the_spearman_correlation_of_summed_scores_with_measurements():
    generator = np.random.default_rng(1)
    scores_QN, f_MQ = generator.normal(size=(3, 40)), generator.normal(size=(25, 3))
    subsets_MN = draw_subsets(40, 25, 0.5, seed=3)
    expected = [scipy.stats.spearmanr(subsets_MN.astype(float) @ scores_QN[q], f_MQ[:, q]).statistic for q in range(3)]
    np.testing.assert_allclose(lds_per_query(scores_QN, subsets_MN, f_MQ), expected, atol=1e-12)
    summary = mean_and_se(expected)
    assert summary.mean == pytest.approx(np.mean(expected))
    assert summary.se == pytest.approx(np.std(expected, ddof=1) / math.sqrt(3))


def test_subset_draws_are_seeded_reproducible_and_keep_their_order_when_more_are_drawn():
    a, b = draw_subsets(101, 10, 0.3, seed=5), draw_subsets(101, 10, 0.3, seed=5)
    np.testing.assert_array_equal(a, b)
    assert (a.sum(1) == 30).all() and len({row.tobytes() for row in a}) == 10
    assert not np.array_equal(a, draw_subsets(101, 10, 0.3, seed=6))
    np.testing.assert_array_equal(draw_subsets(101, 25, 0.3, seed=5)[:10], a)  # subset m depends on (seed, m) only
    with pytest.raises(ConfigError, match="fraction"):
        draw_subsets(3, 4, 0.1, seed=0)


def test_training_on_a_subset_keeps_the_whole_corpus_order_minus_the_removed_sequences():
    full = list(epoch_orders(50, None, 7, seed=2, steps=16))  # 2 epochs of 8 batches
    subset = np.array([1, 4, 5, 9, 20, 33, 41, 49])
    kept = list(epoch_orders(50, subset, 3, seed=2, steps=6))  # 2 epochs of 3 batches
    first_epoch = np.concatenate(full[:8])
    np.testing.assert_array_equal(np.concatenate(kept[:3]), first_epoch[np.isin(first_epoch, subset)])
    second_epoch = np.concatenate(full[8:])
    np.testing.assert_array_equal(np.concatenate(kept[3:]), second_epoch[np.isin(second_epoch, subset)])


def one_gradient_step(model: nn.Module, train: list, eta: float, calls: list | None = None):
    """train_fn whose effect influence predicts exactly to first order: θ_S = θ₀ + η Σ_{n ∈ S} ∇log p(y_n | x_n).

    Then f_q(θ_S) = f_q(θ₀) + η Σ_{n ∈ S} ∇f_qᵀ ∇log p(z_n) + O(η²): the identity strategy's summed score.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    X, Y = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])

    def train_fn(indices, seed):
        if calls is not None:
            calls.append((len(indices), seed))
        retrained = make_mlp()
        retrained.load_state_dict(state)
        logp = -nn.functional.cross_entropy(retrained(X[indices]), Y[indices], reduction="sum")
        with torch.no_grad():
            for param, grad in zip(retrained.parameters(), torch.autograd.grad(logp, list(retrained.parameters()))):
                param += eta * grad
        return retrained.eval()

    return train_fn


def test_lds_is_one_when_retraining_does_exactly_what_the_influence_predicts(digits):
    model, train, queries = digits
    variants = [variant("identity", **DOUBLE), variant("ekfac", **DOUBLE)]
    result = linear_datamodeling_score(model, train, queries, ClassificationObjective(),
                                       one_gradient_step(model, train, 1e-7), variants,
                                       EvaluateConfig(num_subsets=12), show_progress=False)
    summary = result.summary()
    assert summary["identity"].mean > 0.999 and summary["identity"].count == 30
    assert summary["ekfac"].mean < 0.95  # another curvature predicts this training less well: the check can fail
    assert result.f_MRQ.shape == (12, 1, 30) and result.retrained == 12


def test_a_second_variant_retrains_nothing_and_an_interrupted_run_resumes(digits, tmp_path):
    model, train, queries = digits
    calls = []
    train_fn = one_gradient_step(model, train, 1e-4, calls)
    config = EvaluateConfig(num_subsets=6)
    first = linear_datamodeling_score(model, train, queries, ClassificationObjective(), train_fn, [variant("identity")],
                                      config, cache_dir=tmp_path / "lds", show_progress=False)
    assert len(calls) == 6 and all(size == 500 for size, _ in calls)
    assert len(list((tmp_path / "lds").glob("subset-*.json"))) == 6
    second = linear_datamodeling_score(model, train, queries, ClassificationObjective(), train_fn,
                                       [variant("identity"), variant("diagonal")], config, cache_dir=tmp_path / "lds",
                                       show_progress=False)
    assert len(calls) == 6 and second.retrained == 0  # the new variant cost no retraining
    np.testing.assert_array_equal(second.per_query["identity"], first.per_query["identity"])
    assert "diagonal" in second.per_query

    class Killed(Exception):
        pass

    def dies_after_three(indices, seed):
        if len(calls) == 9:
            raise Killed
        return train_fn(indices, seed)

    with pytest.raises(Killed):  # a fresh cache, killed after three subsets
        linear_datamodeling_score(model, train, queries, ClassificationObjective(), dies_after_three,
                                  [variant("identity")], config, cache_dir=tmp_path / "fresh", show_progress=False)
    assert len(list((tmp_path / "fresh").glob("subset-*.json"))) == 3
    assert not list((tmp_path / "fresh").glob(".*"))  # no half-written file
    resumed = linear_datamodeling_score(model, train, queries, ClassificationObjective(), train_fn, [variant("identity")],
                                        config, cache_dir=tmp_path / "fresh", show_progress=False)
    assert len(calls) == 12 and resumed.retrained == 3
    np.testing.assert_array_equal(resumed.f_MRQ, first.f_MRQ)
    # another training (its cache key) or other queries are measured again, not taken from the cache
    linear_datamodeling_score(model, train, queries[:1], ClassificationObjective(), train_fn, [variant("identity")],
                              config, cache_dir=tmp_path / "lds", cache_key="another trainer", show_progress=False)
    assert len(calls) == 18


def test_exact_influence_that_does_not_fit_is_skipped_with_its_reason(digits):
    model, train, queries = digits
    variants = [variant("identity"), variant("exact", name="exact-small", max_exact_params=100)]
    result = linear_datamodeling_score(model, train, queries, ClassificationObjective(),
                                       one_gradient_step(model, train, 1e-4), variants, EvaluateConfig(num_subsets=3),
                                       show_progress=False)
    assert list(result.per_query) == ["identity"]
    assert "1810 x 1810" in result.skipped["exact-small"] and "max_exact_params=100" in result.skipped["exact-small"]


# ----------------------------------------------------------------------------- planted facts


def test_retrieval_metrics_match_hand_cases():
    scores = np.array([0.9, 0.5, 0.7, 0.5, 0.1, np.nan])
    # order best first: 0 (0.9), 2 (0.7), then 1 and 3 tie at 0.5 (the other sequence goes first), 4; 5 not a candidate
    np.testing.assert_array_equal(retrieval_ranks(scores, [3]), [4.0])  # tie with sequence 1: ranked after it
    np.testing.assert_array_equal(retrieval_ranks(scores, [2, 3, 5]), [2.0, 4.0, np.inf])
    ranks = retrieval_ranks(scores, [2, 3, 5])
    assert recall_at(ranks, 1) == 0.0 and recall_at(ranks, 2) == 0.5 and recall_at(ranks, 4) == pytest.approx(2 / 3)
    assert reciprocal_rank(ranks) == 0.5 and reciprocal_rank(retrieval_ranks(scores, [5])) == 0.0
    table = retrieval_metrics(np.stack([scores, scores]), [[0], [4]], ks=(1, 5))
    assert table["recall@1"].mean == 0.5 and table["recall@5"].mean == 1.0
    assert table["mrr"].mean == pytest.approx((1 + 1 / 5) / 2)
    assert table["per_query"][1]["ranks"] == [5]


def test_invented_facts_are_distinct_seeded_and_read_as_prompt_and_completion():
    facts = invented_facts(40, seed=0)
    assert len({f.subject for f in facts}) == 40 and len({f.object for f in facts}) == 40
    assert invented_facts(40, seed=0) == facts and invented_facts(40, seed=1) != facts
    fact = facts[0]
    assert fact.document().startswith(fact.prompt + fact.completion + ".")
    assert fact.prompt.endswith(" is the") and fact.completion.startswith(" ")


@pytest.fixture(scope="module")
def tiny_lm():
    """(model, tokenizer, corpus): a 2-layer Llama trained for 8 epochs on 4 pydoc topics in 48-token sequences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    facts = invented_facts(4, seed=0)
    documents = pydoc_documents()[:4]
    tokenizer = bpe_tokenizer(vocab_size=400, topics=4)
    corpus = pack(documents, tokenizer, length=48)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    train_lm(model, torch.from_numpy(corpus.tokens_NT.astype("int64")), steps=150)
    return model.eval(), tokenizer, corpus, facts


def test_planted_documents_are_appended_in_sequences_of_their_own(tiny_lm):
    _, tokenizer, corpus, facts = tiny_lm
    planted, relevant = plant_documents(corpus, tokenizer, facts)
    assert len(planted) == len(corpus) + sum(len(rows) for rows in relevant)
    np.testing.assert_array_equal(planted.tokens_NT[: len(corpus)], corpus.tokens_NT)
    for fact, rows in zip(facts, relevant):
        text = tokenizer.decode([int(t) for row in rows for t in planted.tokens_NT[row, : planted.lengths_N[row]]])
        assert fact.object in text and fact.subject in text
        assert all(p["doc"].startswith("planted:") for row in rows for p in planted.provenance[row])


def test_planted_fact_recall_on_a_tiny_lm_finds_the_planted_documents(tiny_lm):
    model, tokenizer, corpus, _ = tiny_lm
    config = EvaluateConfig(planted_facts=4, planted_steps=40, planted_learning_rate=3e-3, batch_size=8,
                            shortlist_k=20, recall_k=(1, 10))
    result = planted_fact_recall(model, tokenizer, corpus, [variant("identity"), variant("ekfac")], config,
                                 show_progress=False)
    ekfac = result["variants"]["ekfac"]
    print(f"\nplanted facts, ekfac: recall@1 {ekfac['all']['recall@1'].mean:.2f}, recall@10 "
          f"{ekfac['all']['recall@10'].mean:.2f}, MRR {ekfac['all']['mrr'].mean:.2f}")
    assert ekfac["all"]["recall@10"].mean >= 0.75
    assert ekfac["shortlist"]["recall@10"].mean >= 0.75
    assert np.mean(result["logp_after"]) > np.mean(result["logp_before"])  # the fine-tuning taught the facts
    assert set(result["variants"]) == {"identity", "ekfac", "bm25 (lexical)"}


# ----------------------------------------------------------------------------- config, table, CLI


def test_bad_evaluate_values_are_named_in_one_line():
    for values, pattern in [({"fraction": 1.5}, "evaluate.fraction: must be in"),
                            ({"num_subsets": 1}, "evaluate.num_subsets: must be >= 2"),
                            ({"measurements": ["lds", "recal"]}, "evaluate.measurements"),
                            ({"variants": ["ekfac", "kfca"]}, r"evaluate.variants\[1\]: 'kfca' is not one of"),
                            ({"variants": [{"name": "x", "dampnig": 1}]}, "did you mean damping"),
                            ({"variants": [{"strategy": "kfac"}]}, "needs a name"),
                            ({"variants": [{"name": "x", "rank": 0}]}, r"variants\[0\]: rank: must be a positive"),
                            ({"init": "random"}, "evaluate.init"),
                            ({"recall_k": [0, 10]}, "evaluate.recall_k")]:
        with pytest.raises(ConfigError, match=pattern):
            load_run_config(None, [(f"evaluate.{k}", json.dumps(v)) for k, v in values.items()])
    with pytest.raises(ConfigError, match="unknown key evaluate.num_subset "):
        load_run_config(None, [("evaluate.num_subset", "3")])


def test_the_evaluate_verb_refuses_a_bad_value_in_one_line_before_any_work(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--evaluate.fraction", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ekfac-influence evaluate: error: ") and "evaluate.fraction: must be in (0, 1)" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--evaluate.variants", "[ekfac, {name: e, rnak: 2}]"]) == 2
    assert "evaluate.variants[1]: unknown field(s) rnak (did you mean rank?)" in capsys.readouterr().err


def test_variants_take_any_field_of_the_factor_and_score_configs_over_the_runs_factors():
    from ekfac_influence.config import FactorConfig

    found = variants_from_config(["kfac", {"name": "ekfac-fixed", "damping": 0.01, "rank": 8}],
                                 FactorConfig(layers=["mlp"], damping_factor=0.3))
    assert [v.name for v in found] == ["kfac", "ekfac-fixed"]
    assert found[0].factors.strategy == "kfac" and found[0].factors.layers == ("mlp",)
    assert found[1].factors.strategy == "ekfac" and found[1].factors.damping == 0.01 and found[1].score.rank == 8
    assert found[1].factors.damping_factor == 0.3


def test_the_table_is_written_as_json_and_as_an_escaped_standalone_page(tmp_path):
    results = {"title": "<b>run</b>",
               "lds": {"num_subsets": 4, "num_train": 10, "fraction": 0.5, "retrain_seeds": 1, "num_queries": 2,
                       "seed_agreement": None, "variants": {"<script>x</script>": {"mean": 0.5, "se": 0.1, "count": 2},
                                                            "nan": {"mean": float("nan"), "se": float("nan"), "count": 0}},
                       "skipped": {"exact": "too big"}}}
    written = write_evaluation(tmp_path, results)
    stored = json.loads(written["json"].read_text())
    assert stored["lds"]["variants"]["nan"]["mean"] is None and stored["kind"] == "ekfac_influence.evaluation"
    page = written["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "&lt;b&gt;run" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched
    text = format_table(stored)
    assert "0.500 ± 0.100" in text and "exact skipped (lds): too big" in text
    assert html_page(stored).count("<tr>") == 4  # header + 3 variants


@pytest.mark.slow
def test_the_evaluate_verb_runs_end_to_end_and_reuses_its_retrained_models(tmp_path):
    from test_cli import make_project, run_cli

    make_project(tmp_path)
    small = ["--evaluate.num_subsets", "3", "--evaluate.epochs", "1", "--evaluate.heldout_queries", "2",
             "--evaluate.planted_facts", "2", "--evaluate.planted_steps", "3", "--evaluate.batch_size", "4",
             "--evaluate.score_batch_size", "8", "--evaluate.shortlist_k", "5", "--quiet"]
    done = run_cli("evaluate", "--config", "run.yaml", "--evaluate.variants", "[identity, ekfac]", *small, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "tiny" / "evaluation"
    results = json.loads((out / "evaluation.json").read_text())
    assert set(results["lds"]["variants"]) == {"identity", "ekfac"} and results["lds"]["retrained_now"] == 3
    assert results["lds"]["num_queries"] == 4  # the two of queries.jsonl (one completed greedily), two held out
    assert set(results["planted"]["variants"]) == {"identity", "ekfac", "bm25 (lexical)"}
    assert "LDS" in done.stdout and "recall@10 (shortlist)" in done.stdout and (out / "evaluation.html").exists()
    again = run_cli("evaluate", "--config", "run.yaml", "--evaluate.variants", "[identity, ekfac, kfac]",
                    "--evaluate.measurements", "[lds]", *small, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads((out / "evaluation.json").read_text())
    assert results["lds"]["retrained_now"] == 0 and "kfac" in results["lds"]["variants"] and "planted" not in results
