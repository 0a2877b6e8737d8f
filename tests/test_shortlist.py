"""The TF-IDF shortlist: scores against reference formulas, storage, streaming, ranking, recall.

Reference formulas (C sequences, n_t of them contain t, c(t, D) counts t in D):

    bm25:  score(Q, D) = Σ_{t ∈ set(Q)} log((C − n_t + 0.5)/(n_t + 0.5) + 1) · (k1 + 1) e / (k1 + e),  e = [t ∈ D]
    tfidf: w(t, D) = c(t, D) idf(t) / ‖c(·, D) idf‖₂,  idf(t) = ln((1 + C)/(1 + n_t)) + 1,
           score(Q, D) = Σ_t w(t, Q) w(t, D)  (the query weighted as a document)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekfac_influence import shortlist
from ekfac_influence.evaluate import RecallAtK, recall_at_k, shortlist_recall
from ekfac_influence.shortlist import ShortlistError, ShortlistIndex

CORPUS = [[1, 2, 3, 3], [2, 4], [], [5, 1, 1, 1, 2], [1, 2, 3], [6], [4, 4, 2, 7]]


def bm25_reference(corpus, query, k1=1.5, *, counted=True) -> list[float]:
    """The paper's modified BM25 in plain loops: Σ over the query's tokens (repeats counted), or over its set."""
    C, scores = len(corpus), []
    for doc in corpus:
        score = 0.0
        for t in (query if counted else set(query)):
            n_t = sum(1 for d in corpus if t in d)
            e = 1 if t in doc else 0
            score += math.log((C - n_t + 0.5) / (n_t + 0.5) + 1) * (k1 + 1) * e / (k1 + e)
        scores.append(score)
    return scores


def tfidf_reference(corpus, query, vocab_size) -> list[float]:
    """scikit-learn's TF-IDF (smooth idf, l2 rows) and cosine score, in plain loops."""
    C = len(corpus)
    idf = [math.log((1 + C) / (1 + sum(1 for d in corpus if t in d))) + 1 for t in range(vocab_size)]

    def vector(tokens):
        weights = {t: tokens.count(t) * idf[t] for t in set(tokens) if 0 <= t < vocab_size}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        return {t: w / norm for t, w in weights.items()} if norm else {}

    q = vector(list(query))
    return [sum(w * vector(list(doc)).get(t, 0.0) for t, w in q.items()) for doc in corpus]


def all_scores(index: ShortlistIndex, query) -> np.ndarray:
    """Every sequence's score, in sequence order, from a search with k = N."""
    ids, scores = index.search(query, len(index))
    full = np.full(len(index), np.nan)
    full[ids] = scores
    return full


def assert_ranked(ids: np.ndarray, scores: np.ndarray) -> None:
    """Scores descending; equal scores in ascending sequence index."""
    assert np.array_equal(np.lexsort((ids, -scores)), np.arange(ids.size))


def assert_same_index(a: ShortlistIndex, b: ShortlistIndex) -> None:
    assert (a.num_sequences, a.vocab_size, a.weighting, a.k1) == (b.num_sequences, b.vocab_size, b.weighting, b.k1)
    for name in ("indptr", "indices", "data", "idf"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


# ----------------------------------------------------------------------------- scores


def test_bm25_scores_equal_a_hand_computed_formula_on_a_small_corpus():
    index = ShortlistIndex.build(CORPUS)
    for query in ([1, 2], [3], [4, 7, 7], [1, 2, 3, 4, 5, 6, 7], [9]):
        np.testing.assert_allclose(all_scores(index, query), bm25_reference(CORPUS, query), rtol=1e-6, atol=1e-7)
    # one value by hand: token 3 is in 2 of 7 sequences, so IDF = log(5.5 / 2.5 + 1)
    assert all_scores(index, [3])[0] == pytest.approx(math.log(5.5 / 2.5 + 1), rel=1e-6)


def test_bm25_counts_a_repeated_query_token_as_often_as_the_query_holds_it():
    """The paper's form: [3, 3, 3, 1] scores 3·IDF(3) + IDF(1) where both occur."""
    index = ShortlistIndex.build(CORPUS)
    np.testing.assert_allclose(all_scores(index, [3, 3, 3, 1]), bm25_reference(CORPUS, [3, 3, 3, 1]), rtol=1e-6)
    idf = {t: math.log((7 - n + 0.5) / (n + 0.5) + 1) for t, n in ((3, 2), (1, 3))}
    assert all_scores(index, [3, 3, 3, 1])[0] == pytest.approx(3 * idf[3] + idf[1], rel=1e-6)  # [1, 2, 3, 3] holds both
    assert all_scores(index, [3, 3, 3, 1])[3] == pytest.approx(idf[1], rel=1e-6)  # [5, 1, 1, 1, 2] holds 1 only


def test_bm25_as_a_set_counts_a_repeated_query_token_once():
    index = ShortlistIndex.build(CORPUS)
    ids, scores = index.search([3, 3, 3, 1], 7, query_counts=False)
    once = np.full(7, np.nan)
    once[ids] = scores
    np.testing.assert_allclose(once, bm25_reference(CORPUS, [1, 3], counted=False), rtol=1e-6)
    assert np.array_equal(once, all_scores(index, [1, 3]))


def test_k1_has_no_effect_on_bm25_with_presence_weighting():
    a, b = ShortlistIndex.build(CORPUS, k1=0.0), ShortlistIndex.build(CORPUS, k1=1.5)
    assert np.array_equal(a.data, b.data) and a.k1 == 0.0 and b.k1 == 1.5


def test_tfidf_equals_sklearn_tfidf_transformer_on_the_count_matrix():
    from sklearn.feature_extraction.text import TfidfTransformer

    vocab = 10
    counts_NV = np.zeros((len(CORPUS), vocab))
    for n, doc in enumerate(CORPUS):
        np.add.at(counts_NV[n], doc, 1)
    transformer = TfidfTransformer().fit(counts_NV)
    index = ShortlistIndex.build(CORPUS, weighting="tfidf", vocab_size=vocab)
    np.testing.assert_allclose(index.weights.toarray(), transformer.transform(counts_NV).toarray(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(index.idf, transformer.idf_, rtol=1e-12)
    for query in ([1, 1, 2], [4, 7, 9], [3]):
        query_V = np.bincount(query, minlength=vocab)[None].astype(float)
        expected = (transformer.transform(counts_NV) @ transformer.transform(query_V).T).toarray()[:, 0]
        np.testing.assert_allclose(all_scores(index, query), expected, rtol=1e-6, atol=1e-7)


def test_query_tokens_outside_the_vocabulary_are_absent_terms():
    for weighting in ("bm25", "tfidf"):
        index = ShortlistIndex.build(CORPUS, weighting=weighting, vocab_size=8)
        assert np.array_equal(all_scores(index, [1, 2, 8, 10**6, -1, -100]), all_scores(index, [1, 2]))
        ids, scores = index.search([50_000, -100], 3)
        assert ids.tolist() == [0, 1, 2] and not scores.any()


# ----------------------------------------------------------------------------- ranking


def test_top_k_is_ordered_by_score_then_by_lower_sequence_index():
    corpus = [[9], [1, 2], [5], [1, 2], [1], [1, 2], [3]]
    index = ShortlistIndex.build(corpus)
    ids, scores = index.search([1, 2], 4)
    assert ids.tolist() == [1, 3, 5, 4]  # three equal best scores in index order, then the partial match
    assert scores[0] == scores[1] == scores[2] > scores[3] > 0
    ids, scores = index.search([1, 2], 2)  # a tie cut by k keeps the lower indices
    assert ids.tolist() == [1, 3]
    ids, _ = index.search([1, 2], 6)  # the zero-score tail is in index order too
    assert ids.tolist() == [1, 3, 5, 4, 0, 2]
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_k_larger_than_the_corpus_returns_every_sequence():
    index = ShortlistIndex.build(CORPUS)
    ids, scores = index.search([1], 1000)
    assert sorted(ids.tolist()) == list(range(len(CORPUS))) and scores.shape == (len(CORPUS),)
    ids_QK, scores_QK = index.search_batch([[1], [2, 3]], 1000)
    assert ids_QK.shape == scores_QK.shape == (2, len(CORPUS))


def test_an_empty_query_or_a_bad_k_is_refused_with_a_clear_error():
    index = ShortlistIndex.build(CORPUS)
    with pytest.raises(ShortlistError, match="query is empty"):
        index.search([], 3)
    with pytest.raises(ShortlistError, match="query 1 is empty"):
        index.search_batch([[1], np.array([], dtype=np.int64)], 3)
    with pytest.raises(ShortlistError, match="k must be a positive integer"):
        index.search([1], 0)
    with pytest.raises(ShortlistError, match="integers"):
        index.search([1.5, 2.0], 3)
    assert issubclass(ShortlistError, ValueError)


def test_search_batch_equals_one_search_per_query_even_across_scoring_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    corpus = [rng.integers(0, 30, size=rng.integers(0, 40)) for _ in range(50)]
    queries = [rng.integers(0, 35, size=rng.integers(1, 10)) for _ in range(7)]
    for weighting in ("bm25", "tfidf"):
        index = ShortlistIndex.build(corpus, weighting=weighting)
        monkeypatch.setattr(shortlist, "SCORE_BLOCK_ELEMENTS", 3 * len(corpus))  # blocks of 3 queries
        ids_QK, scores_QK = index.search_batch(queries, 10)
        for q, query in enumerate(queries):
            ids, scores = index.search(query, 10)
            assert np.array_equal(ids_QK[q], ids) and np.array_equal(scores_QK[q], scores)
            assert_ranked(ids, scores)


# ----------------------------------------------------------------------------- building


def test_chunk_size_and_a_generator_input_give_the_same_index():
    rng = np.random.default_rng(1)
    corpus = [rng.integers(0, 50, size=rng.integers(0, 30)).tolist() for _ in range(40)] + [list(range(49, -1, -1)) * 20]
    for weighting in ("bm25", "tfidf"):
        reference = ShortlistIndex.build(corpus, weighting=weighting, chunk_size=1000)
        for chunk_size in (1, 3, 7):
            assert_same_index(ShortlistIndex.build(corpus, weighting=weighting, chunk_size=chunk_size), reference)
        streamed = ShortlistIndex.build((np.array(seq, dtype=np.int32) for seq in corpus), weighting=weighting, chunk_size=3)
        assert_same_index(streamed, reference)


def test_the_index_is_the_same_when_chunks_are_merged_into_many_segments(monkeypatch):
    rng = np.random.default_rng(2)
    corpus = [rng.integers(0, 40, size=rng.integers(0, 60)) for _ in range(30)]
    for weighting in ("bm25", "tfidf"):
        reference = ShortlistIndex.build(corpus, weighting=weighting)
        monkeypatch.setattr(shortlist, "SEGMENT_PAIRS", 50)
        assert_same_index(ShortlistIndex.build(corpus, weighting=weighting, chunk_size=2), reference)
        monkeypatch.undo()


def test_padded_row_sort_and_key_sort_agree_on_a_chunk_with_one_very_long_sequence():
    long = np.tile(np.arange(300), 40)[::-1]  # 12,000 tokens: its chunk takes the key sort, alone the row sort
    corpus = [[1, 1, 2], long, [], [299, 0]]
    index = ShortlistIndex.build(corpus, weighting="tfidf", chunk_size=4)
    assert_same_index(index, ShortlistIndex.build(corpus, weighting="tfidf", chunk_size=1))
    assert index.doc_freq[[0, 1, 2, 299]].tolist() == [2, 2, 2, 2] and index.nnz == 2 + 300 + 2


def test_bad_corpora_are_refused_naming_the_sequence():
    with pytest.raises(ShortlistError, match="sequence 2 holds token id -1"):
        ShortlistIndex.build([[1], [2], [3, -1]], chunk_size=2)
    with pytest.raises(ShortlistError, match=r"sequence 1 holds token id 8, outside \[0, 7\]"):
        ShortlistIndex.build([[1], [8]], vocab_size=8)
    with pytest.raises(ShortlistError, match="sequence 0 must be a 1-D"):
        ShortlistIndex.build([[[1, 2]]])
    with pytest.raises(ShortlistError, match="nothing to index"):
        ShortlistIndex.build(iter([]))
    with pytest.raises(ShortlistError, match="weighting"):
        ShortlistIndex.build(CORPUS, weighting="bm42")


def test_show_progress_draws_a_bar_over_sequences(capsys):
    ShortlistIndex.build(CORPUS, show_progress=True, chunk_size=2)
    assert "7/7" in capsys.readouterr().err


def test_the_module_imports_without_torch():
    code = ("import sys; import ekfac_influence.shortlist as m; "
            "m.ShortlistIndex.build([[1, 2]]).search([1], 1); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("weighting", ["bm25", "tfidf"])
def test_a_saved_and_loaded_index_gives_identical_search_results(tmp_path, weighting):
    index = ShortlistIndex.build(CORPUS, weighting=weighting, vocab_size=12, tokenizer_id="tok-a", corpus_id="corpus-1")
    index.save(tmp_path / "index")
    loaded = ShortlistIndex.load(tmp_path / "index", tokenizer_id="tok-a", corpus_id="corpus-1")
    assert_same_index(loaded, index)
    queries = [[1, 2], [4, 4, 7], [11, 3]]
    for a, b in zip(index.search_batch(queries, 5), loaded.search_batch(queries, 5)):
        assert np.array_equal(a, b)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["num_sequences"] == 7 and manifest["vocab_size"] == 12 and manifest["tokenizer_id"] == "tok-a"
    files = {"indptr.npy", "indices.npy", "idf.npy"} | ({"data.npy"} if weighting == "tfidf" else set())
    assert set(manifest["checksums"]) == files
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temporary directory left behind
    # nothing sized by the corpus is read into memory (issue 18): the postings are memory maps, and bm25
    # keeps one weight per term, not one per (term, sequence) pair
    assert isinstance(loaded.indices, np.memmap) and isinstance(loaded.indptr, np.memmap)
    assert (loaded._pair_weights is None) == (weighting == "bm25")


def test_saving_over_an_existing_index_is_refused_unless_overwrite(tmp_path):
    ShortlistIndex.build(CORPUS).save(tmp_path / "index")
    with pytest.raises(ShortlistError, match=f"{tmp_path / 'index'} already exists.*overwrite=True"):
        ShortlistIndex.build([[1]]).save(tmp_path / "index")
    assert len(ShortlistIndex.load(tmp_path / "index")) == len(CORPUS)
    ShortlistIndex.build([[1]]).save(tmp_path / "index", overwrite=True)
    assert len(ShortlistIndex.load(tmp_path / "index")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_loading_for_another_tokenizer_or_corpus_is_refused_with_a_message_naming_it(tmp_path):
    ShortlistIndex.build(CORPUS, tokenizer_id="gpt2", corpus_id="wiki@abc").save(tmp_path / "index")
    with pytest.raises(ShortlistError, match=r"built for tokenizer 'gpt2', not 'llama'.*Rebuild.*overwrite"):
        ShortlistIndex.load(tmp_path / "index", tokenizer_id="llama")
    with pytest.raises(ShortlistError, match=r"built for corpus 'wiki@abc', not 'web@def'.*Rebuild"):
        ShortlistIndex.load(tmp_path / "index", tokenizer_id="gpt2", corpus_id="web@def")
    ShortlistIndex.build(CORPUS).save(tmp_path / "anonymous")
    with pytest.raises(ShortlistError, match="built for tokenizer None"):
        ShortlistIndex.load(tmp_path / "anonymous", tokenizer_id="gpt2")
    assert ShortlistIndex.load(tmp_path / "index").tokenizer_id == "gpt2"


def test_a_corrupted_or_truncated_array_file_is_detected_and_named(tmp_path):
    ShortlistIndex.build(CORPUS).save(tmp_path / "index")
    indices = tmp_path / "index" / "indices.npy"
    raw = bytearray(indices.read_bytes())
    raw[-1] ^= 0xFF
    indices.write_bytes(bytes(raw))
    with pytest.raises(ShortlistError, match=r"indices\.npy is corrupted"):
        ShortlistIndex.load(tmp_path / "index")
    idf = tmp_path / "index" / "idf.npy"
    raw[-1] ^= 0xFF
    indices.write_bytes(bytes(raw))
    idf.write_bytes(idf.read_bytes()[:-8])
    with pytest.raises(ShortlistError, match=r"idf\.npy is corrupted or truncated"):
        ShortlistIndex.load(tmp_path / "index")
    with pytest.raises(ShortlistError, match="manifest.json is missing"):
        ShortlistIndex.load(tmp_path / "nowhere")


def test_a_manifest_that_does_not_match_its_arrays_is_refused(tmp_path):
    ShortlistIndex.build(CORPUS).save(tmp_path / "index")
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, num_sequences=3)))  # postings name sequences 3 to 6
    with pytest.raises(ShortlistError, match="do not form the index its manifest describes"):
        ShortlistIndex.load(tmp_path / "index")
    manifest_path.write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(ShortlistError, match="format version 99"):
        ShortlistIndex.load(tmp_path / "index")


# ----------------------------------------------------------------------------- recall


def test_shortlist_recall_on_hand_cases():
    assert shortlist_recall([5, 1, 9], [1, 2, 3, 4], k=2) == 0.5  # top-2 {1, 2}: 1 found
    assert shortlist_recall([4, 3, 2, 1], [1, 2, 3, 4], k=4) == 1.0
    assert shortlist_recall([7, 8], [1, 2, 3], k=3) == 0.0
    assert shortlist_recall(np.array([3]), np.array([3, 1]), k=10) == 0.5  # k past the ranking: all of it
    with pytest.raises(ShortlistError, match="repeats"):
        shortlist_recall([1], [1, 1, 2], k=2)
    with pytest.raises(ShortlistError, match="k must be"):
        shortlist_recall([1], [1], k=0)


def test_recall_at_k_gives_each_query_its_recall_and_the_mean():
    result = recall_at_k([[1, 2], [9], [3, 4, 5]], np.array([[1, 3, 2], [1, 2, 3], [5, 4, 3]]), k=2)
    assert isinstance(result, RecallAtK)
    assert result.per_query.tolist() == [0.5, 0.0, 1.0] and result.mean == pytest.approx(0.5)
    per_query, mean = result
    assert mean == result.mean
    with pytest.raises(ShortlistError, match="2 shortlists but 1"):
        recall_at_k([[1], [2]], [[1]], k=1)


def test_search_recall_of_a_shortlist_against_its_own_exhaustive_ranking():
    index = ShortlistIndex.build(CORPUS)
    exhaustive, _ = index.search([1, 2, 3], len(index))
    shortlist_ids, _ = index.search([1, 2, 3], 3)
    assert shortlist_recall(shortlist_ids, exhaustive, k=3) == 1.0
    assert shortlist_recall(shortlist_ids, exhaustive, k=6) == 0.5


# ----------------------------------------------------------------------------- properties

tokens = st.integers(0, 11)
sequences = st.one_of(st.lists(tokens, max_size=30), st.lists(tokens, min_size=300, max_size=2000))
corpora = st.lists(sequences, min_size=1, max_size=10)
queries = st.lists(st.integers(-3, 15), min_size=1, max_size=20)


@settings(max_examples=30, deadline=None)
@given(corpus=corpora, query=queries, weighting=st.sampled_from(["bm25", "tfidf"]), k=st.integers(1, 12))
def test_index_scores_equal_the_brute_force_reference_on_random_corpora(corpus, query, weighting, k):
    index = ShortlistIndex.build(corpus, weighting=weighting)
    vocab = max((max(doc) for doc in corpus if doc), default=-1) + 1
    assert index.vocab_size == vocab and len(index) == len(corpus)
    expected = bm25_reference(corpus, query) if weighting == "bm25" else tfidf_reference(corpus, query, vocab)
    np.testing.assert_allclose(all_scores(index, query), expected, rtol=1e-5, atol=1e-6)
    ids_all, scores_all = index.search(query, len(corpus))
    assert_ranked(ids_all, scores_all)
    ids, scores = index.search(query, k)
    assert np.array_equal(ids, ids_all[:k]) and np.array_equal(scores, scores_all[:k])


@settings(max_examples=30, deadline=None)
@given(corpus=corpora, chunk_size=st.integers(1, 11), segment_pairs=st.integers(1, 400),
       weighting=st.sampled_from(["bm25", "tfidf"]))
def test_the_index_does_not_depend_on_the_chunk_or_segment_size(corpus, chunk_size, segment_pairs, weighting):
    reference = ShortlistIndex.build(iter(corpus), weighting=weighting, chunk_size=len(corpus) + 1)
    default, shortlist.SEGMENT_PAIRS = shortlist.SEGMENT_PAIRS, segment_pairs  # chunks merged every few pairs
    try:
        assert_same_index(ShortlistIndex.build(corpus, weighting=weighting, chunk_size=chunk_size), reference)
    finally:
        shortlist.SEGMENT_PAIRS = default
