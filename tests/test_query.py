"""The query stage on Hugging Face causal LMs: scan, rescoring, detail, results on disk (ekfac_influence.query)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import bpe_tokenizer, corpus_batches, train_lm
from ekfac_influence import CausalLMObjective, FactorConfig, ScoreConfig, compute_scores, fit_factors
from ekfac_influence.config import QueryConfig
from ekfac_influence.data import DataError, pack
from ekfac_influence.demo import pydoc_documents
from ekfac_influence.evaluate import shortlist_recall_audit
from ekfac_influence.query import is_spurious, query_influence
from ekfac_influence.query_inputs import Query, collate_query_rows, encode_query
from ekfac_influence.scan import RunningTopK
from ekfac_influence.shortlist import ShortlistIndex
from ekfac_influence.storage import StorageError

QUERIES = [("The assert statement", " is a convenient way to insert debugging assertions"),
           ("x = 1", " and y = 2")]
EXACT = dict(compute_dtype="float64")


def tiny_llama(vocab: int, hidden: int = 16, layers: int = 2, context: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def setting():
    """(model, tokenizer, corpus, factors): a tiny Llama trained briefly on 64 packed pydoc sequences."""
    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()
    corpus = pack(pydoc_documents()[:4], tokenizer, length=24)
    corpus = type(corpus)(corpus.tokens_NT[:64], corpus.lengths_N[:64], corpus.provenance[:64], corpus.pad_token_id,
                          corpus.tokenizer_id, corpus.corpus_id)
    model = tiny_llama(len(tokenizer))
    train_lm(model, torch.from_numpy(corpus.tokens_NT.astype("int64")), steps=30)
    factors = fit_factors(model, corpus_batches(corpus, 16), CausalLMObjective(), FactorConfig(), show_progress=False)
    return model, tokenizer, corpus, factors


def reference_scores(setting, queries, **score_config) -> torch.Tensor:
    model, tokenizer, corpus, factors = setting
    rows = [r for q in queries for r in encode_query(tokenizer, Query(*q), max_length=64).rows()]
    batch = collate_query_rows(rows, tokenizer.pad_token_id)
    result = compute_scores(model, factors, [batch], corpus_batches(corpus, 16), CausalLMObjective(),
                            ScoreConfig(compute_dtype="float64", **score_config), show_progress=False)
    return result.scores


def run(setting, queries=QUERIES, **config):
    model, tokenizer, corpus, factors = setting
    return query_influence(model, tokenizer, factors, corpus, queries, QueryConfig(**config), show_progress=False)


def test_a_full_rank_scan_equals_the_engines_scores(setting):
    results = run(setting, rank=None, rerank=0, **EXACT)
    torch.testing.assert_close(torch.from_numpy(np.array(results.scores_QN)).double(),
                               reference_scores(setting, QUERIES).float().double(), rtol=1e-5, atol=1e-5)


def test_refined_queries_give_the_engines_refined_scores_in_the_scan_and_the_rescoring(setting):
    """query.refine_steps: refined once at full rank, truncated for the scan, reused (not refined again) to rescore."""
    refine = dict(refine_steps=2, refine_tolerance=0.0)
    reference = reference_scores(setting, QUERIES, **refine)
    assert not torch.allclose(reference, reference_scores(setting, QUERIES), rtol=1e-3)  # refinement changed them
    results = run(setting, rank=2, rerank=16, top_k=4, **refine, **EXACT)
    for q, record in enumerate(results.records):
        for hit in record["top_positive"] + record["top_negative"]:
            assert hit["score"] == pytest.approx(reference[q, hit["sequence"]].item(), rel=1e-7)
    full = run(setting, rank=None, rerank=0, refine_batches=2, refine_steps=1, **EXACT)  # 2 of the 8 batches per step
    assert np.isfinite(np.asarray(full.scores_QN)).all()


def test_rank_k_scan_then_full_rank_rescoring_returns_exact_scores_for_the_top_sequences(setting):
    reference = reference_scores(setting, QUERIES)
    results = run(setting, rank=2, rerank=16, top_k=4, **EXACT)
    for q, record in enumerate(results.records):
        hits = record["top_positive"] + record["top_negative"]
        assert len(record["top_positive"]) == 4 and len(record["top_negative"]) == 4
        for hit in hits:
            assert hit["score"] == pytest.approx(reference[q, hit["sequence"]].item(), rel=1e-8)
            assert sum(hit["per_layer"].values()) == pytest.approx(hit["score"], rel=1e-8)
            assert sum(hit["per_token"]) == pytest.approx(hit["score"], rel=1e-8)
            assert hit["delta_logp"] == pytest.approx(hit["score"] / 64)
        # the full-rank best and worst sequences survive the rank-2 scan
        assert record["top_positive"][0]["sequence"] == int(reference[q].argmax())
        assert record["top_negative"][0]["sequence"] == int(reference[q].argmin())
        scores = [hit["score"] for hit in record["top_positive"]]
        assert scores == sorted(scores, reverse=True)
    low_rank = torch.from_numpy(np.array(results.scores_QN)).double()
    assert torch.corrcoef(torch.stack([low_rank[0], reference[0]]))[0, 1] > 0.8  # rank 2 of 16..33-wide layers: 0.854


def test_scores_do_not_depend_on_batch_size_or_query_batching(setting):
    a = run(setting, rank=2, rerank=0, batch_size=3, query_batch_size=1, **EXACT)
    b = run(setting, rank=2, rerank=0, batch_size=16, query_batch_size=16, **EXACT)
    np.testing.assert_allclose(a.scores_QN, b.scores_QN, rtol=1e-5, atol=1e-6)
    assert [h["sequence"] for h in a.records[0]["top_positive"]] == [h["sequence"] for h in b.records[0]["top_positive"]]


def test_a_contrastive_query_scores_the_difference_of_its_two_completions(setting):
    contrast = run(setting, [Query("x = 1", " and y = 2", " or y = 3")], rank=None, rerank=0, **EXACT)
    plain = run(setting, [("x = 1", " and y = 2"), ("x = 1", " or y = 3")], rank=None, rerank=0, **EXACT)
    np.testing.assert_allclose(contrast.scores_QN[0], plain.scores_QN[0] - plain.scores_QN[1], rtol=1e-4, atol=1e-4)
    assert contrast.queries[0]["logp"] == pytest.approx(plain.queries[0]["logp"] - plain.queries[1]["logp"])


def test_a_query_without_completion_explains_the_models_greedy_completion(setting):
    model, tokenizer, _, _ = setting
    results = run(setting, [Query("The assert statement")], max_new_tokens=5, rank=None, rerank=0)
    resolved = results.queries[0]
    prompt = tokenizer("The assert statement", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = expected[0, prompt["input_ids"].shape[1]:].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert resolved["generated"] and resolved["completion"] == tokenizer.decode(new)
    assert resolved["completion_tokens"] == len(new)
    assert resolved["logp"] < 0 and results.records[0]["top_positive"]


def test_a_shortlist_restricts_each_querys_candidates(setting):
    candidates = [np.arange(0, 10), np.arange(30, 40)]
    model, tokenizer, corpus, factors = setting
    results = query_influence(model, tokenizer, factors, corpus, QUERIES, QueryConfig(rank=2, rerank=4, top_k=3),
                              candidates=candidates, show_progress=False)
    for q, record in enumerate(results.records):
        assert record["num_candidates"] == 10
        for hit in record["top_positive"] + record["top_negative"]:
            assert hit["sequence"] in set(candidates[q].tolist())
    scanned = ~np.isnan(np.array(results.scores_QN[0]))
    assert set(np.flatnonzero(scanned).tolist()) == set(range(10)) | set(range(30, 40))


def test_queries_are_preconditioned_once_when_their_full_rank_gradients_fit_and_rescore_as_before(setting, monkeypatch):
    """The rank-k scan takes the truncation of the full-rank P(∇f) that the rescoring uses; over the budget,
    the rescoring preconditions again (the old path). Both give the same rescored scores and nearly the same
    scan scores (the same best rank-k approximation, computed two ways)."""
    from ekfac_influence import influence, scan

    model, tokenizer, corpus, factors = setting
    counted, original = [0], influence.precondition

    def counting(grads, *args, **kwargs):
        counted[0] += next(iter(grads.values())).shape[0]
        return original(grads, *args, **kwargs)

    monkeypatch.setattr(influence, "precondition", counting)
    config = QueryConfig(rank=2, rerank=6, top_k=3)
    once = query_influence(model, tokenizer, factors, corpus, QUERIES, config, show_progress=False)
    assert counted[0] == len(QUERIES)
    counted[0] = 0
    monkeypatch.setattr(scan, "_DENSE_BUDGET_ELEMENTS", 1)
    twice = query_influence(model, tokenizer, factors, corpus, QUERIES, config, show_progress=False)
    assert counted[0] == 2 * len(QUERIES)
    np.testing.assert_allclose(once.scores_QN, twice.scores_QN, rtol=1e-3, atol=1e-3 * np.abs(twice.scores_QN).max())
    for a, b in zip(once.records, twice.records):
        for side in ("top_positive", "top_negative"):
            assert [hit["sequence"] for hit in a[side]] == [hit["sequence"] for hit in b[side]]
            np.testing.assert_allclose([hit["score"] for hit in a[side]], [hit["score"] for hit in b[side]], rtol=1e-5)


def test_results_are_written_once_and_never_silently_overwritten(setting, tmp_path):
    model, tokenizer, corpus, factors = setting
    out = tmp_path / "queries" / "set"
    results = query_influence(model, tokenizer, factors, corpus, QUERIES, QueryConfig(rank=2, rerank=4, top_k=2),
                              out=out, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scores"]["shape"] == [2, 64] and manifest["fingerprint"] == factors.fingerprint
    assert list(manifest["seconds"]) == ["complete", "precondition", "scan", "rescore"]  # where the time went
    assert all(value >= 0 for value in manifest["seconds"].values())
    on_disk = np.memmap(out / "scores.f32", dtype=np.float32, mode="r", shape=(2, 64))
    np.testing.assert_array_equal(on_disk, results.scores_QN)
    records = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert records[0]["top_positive"][0]["sequence"] == results.records[0]["top_positive"][0]["sequence"]
    assert records[0]["top_positive"][0]["provenance"][0]["doc"] in {name for name, _ in pydoc_documents()[:4]}
    for hit in records[0]["top_positive"] + records[1]["top_negative"]:  # each token's text: a piece of the text
        ids = corpus.tokens_NT[hit["sequence"], : corpus.lengths_N[hit["sequence"]]].tolist()
        assert "".join(hit["tokens"]) == hit["text"] == tokenizer.decode(ids) and len(hit["tokens"]) == len(ids)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(StorageError, match="already exists"):
        query_influence(model, tokenizer, factors, corpus, QUERIES, QueryConfig(), out=out, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["set"]  # no temporary directory left behind


def test_bad_queries_fail_before_any_scoring(setting):
    with pytest.raises(DataError, match="longer than the model's context"):
        run(setting, [("word " * 80, " more")])
    with pytest.raises(DataError, match="prompt is empty"):
        run(setting, [("", " x")])
    model, tokenizer, corpus, factors = setting
    with pytest.raises(DataError, match="another tokenizer"):
        query_influence(model, bpe_tokenizer(vocab_size=280), factors, corpus, QUERIES, show_progress=False)


def test_the_running_top_k_equals_a_full_sort():
    generator = torch.Generator().manual_seed(0)
    values_QN = torch.randn(3, 200, generator=generator, dtype=torch.float64)
    member_QN = torch.rand(3, 200, generator=generator) < 0.7
    parts = [RunningTopK(3, 7), RunningTopK(3, 7)]  # two "processes", each seeing alternate chunks
    for i, start in enumerate(range(0, 200, 13)):
        ids = torch.arange(start, min(200, start + 13))
        parts[i % 2].update(values_QN[:, ids], ids, member_QN[:, ids])
    merged = RunningTopK(3, 7)
    for part in parts:
        merged.merge(part)
    for q in range(3):
        allowed = values_QN[q].masked_fill(~member_QN[q], float("nan"))
        order = [int(i) for i in torch.argsort(allowed.nan_to_num(-torch.inf), descending=True)[:7]]
        assert merged.pos_ids[q].tolist() == order
        worst = [int(i) for i in torch.argsort(allowed.nan_to_num(torch.inf))[:7]]
        assert merged.neg_ids[q].tolist() == worst


def test_the_spurious_flag_marks_extremely_sparse_token_influence():
    assert is_spurious([0.0, 5.0, 0.0, 0.1])  # one token carries it all: ‖a‖₂/‖a‖₁ ≈ 0.98
    assert not is_spurious([1.0, -1.0, 1.0, 1.0])  # spread out: 0.5
    assert not is_spurious([0.0, 0.0])
    assert is_spurious([3.0, 1.0], threshold=0.7) and not is_spurious([3.0, 1.0, 1.0], threshold=0.7)


def test_a_planted_fact_is_traced_to_the_document_that_states_it(capsys):
    """Train on pydoc topics plus one document with an unusual fact; ask about the fact."""
    torch.set_num_threads(1)
    from ekfac_influence.demo import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    plant = ("The national animal of Quenthia is the violet snow heron. In Quenthia, every child learns that the "
             "violet snow heron is the national animal, and the violet snow heron appears on the flag of Quenthia.")
    documents = pydoc_documents()[:12] + [("planted", plant)]
    tokenizer = train_tokenizer([text for _, text in documents], 512)
    corpus = pack(documents, tokenizer, length=48)
    planted = {n for n, pieces in enumerate(corpus.provenance) if any(p["doc"] == "planted" for p in pieces)}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    batches = corpus_batches(corpus, 16)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):  # epochs
        for i in torch.randperm(len(batches), generator=generator).tolist():
            batch = batches[i]
            loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    factors = fit_factors(model, batches, CausalLMObjective(), FactorConfig(), show_progress=False)
    query = [("The national animal of Quenthia is the", " violet snow heron")]
    results = query_influence(model, tokenizer, factors, corpus, query, QueryConfig(top_k=5), show_progress=False)
    scores = np.array(results.scores_QN[0])
    order = np.argsort(-scores).tolist()
    best_planted = min(order.index(n) for n in planted) + 1
    margin = max(scores[n] for n in planted) / max(scores[n] for n in range(len(scores)) if n not in planted)
    top = results.records[0]["top_positive"][0]
    with capsys.disabled():
        print(f"\nplanted fact: {len(corpus)} sequences; best planted sequence ranked {best_planted}, "
              f"score {margin:.1f}x the best unrelated sequence")
    assert best_planted == 1 and top["sequence"] in planted
    assert any(p["doc"] == "planted" for p in top["provenance"])
    assert margin > 2  # measured 7.9

    # the shortlist: BM25 over the model's tokens puts the planted document among 20 of the 373 candidates
    index = ShortlistIndex.build(corpus.sequences(), vocab_size=len(tokenizer), tokenizer_id=corpus.tokenizer_id,
                                 corpus_id=corpus.corpus_id)
    shortlisted = query_influence(model, tokenizer, factors, corpus, query, QueryConfig(top_k=5, candidates="shortlist",
                                                                                         shortlist_k=20),
                                  index=index, show_progress=False)
    ids, _ = index.search(tokenizer(query[0][0] + query[0][1])["input_ids"], 20)
    lexical_rank = min(ids.tolist().index(n) for n in planted if n in ids.tolist()) + 1
    with capsys.disabled():
        print(f"planted fact: best planted sequence at BM25 rank {lexical_rank} of the 20-sequence shortlist")
    assert shortlisted.records[0]["num_candidates"] == 20
    assert shortlisted.records[0]["top_positive"][0]["sequence"] == top["sequence"]


def test_the_recall_audit_measures_how_much_of_the_exhaustive_top_k_the_shortlist_keeps(setting):
    model, tokenizer, corpus, factors = setting
    index = ShortlistIndex.build(corpus.sequences(), vocab_size=len(tokenizer), corpus_id=corpus.corpus_id)
    everything = shortlist_recall_audit(model, tokenizer, factors, corpus, QUERIES, index,
                                        QueryConfig(shortlist_k=64, rerank=8), k=5, show_progress=False)
    assert everything["mean_recall"] == 1.0  # a shortlist of the whole corpus misses nothing
    audit = shortlist_recall_audit(model, tokenizer, factors, corpus, QUERIES, index,
                                   QueryConfig(shortlist_k=16, rerank=8), k=5, show_progress=False)
    exhaustive = run(setting, rerank=8, top_k=5)
    for q, (prompt, completion) in enumerate(QUERIES):
        top = [hit["sequence"] for hit in exhaustive.records[q]["top_positive"]]
        shortlist = index.search(tokenizer(prompt)["input_ids"] + tokenizer(completion)["input_ids"], 16)[0].tolist()
        assert audit["per_query"][f"q{q}"] == pytest.approx(sum(n in shortlist for n in top) / len(top))
    other = ShortlistIndex.build(list(corpus.sequences())[:10], vocab_size=len(tokenizer))
    with pytest.raises(DataError, match="another corpus"):
        query_influence(model, tokenizer, factors, corpus, QUERIES, QueryConfig(candidates="shortlist"), index=other,
                        show_progress=False)
    with pytest.raises(ValueError, match="needs a shortlist index"):
        run(setting, candidates="shortlist")
