"""Corpora, packing and provenance (ekfac_influence.data); queries and their encoding (ekfac_influence.query_inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import bpe_tokenizer
from ekfac_influence.data import (DataError, PackedCorpus, dataset_documents, load_corpus, pack, pack_to_disk,
                                  tokenizer_id)
from ekfac_influence.demo import pydoc_documents
from ekfac_influence.query_inputs import Query, collate_query_rows, encode_query, query_rows, read_queries

DOCS = [("a", "The assert statement is a debugging aid."), ("empty", ""), ("b", "x = 1\nwhile x: x -= 1"),
        ("c", "Ünïcode tëxt — and a longer document " * 6)]


def test_packing_cuts_the_eos_joined_stream_into_full_rows_and_pads_only_the_last():
    tokenizer = bpe_tokenizer()
    corpus = pack(DOCS, tokenizer, length=16)
    stream = []
    for _, text in DOCS:
        if text:
            stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert corpus.lengths_N[:-1].tolist() == [16] * (len(corpus) - 1)
    flat = np.concatenate([row[:n] for row, n in zip(corpus.tokens_NT, corpus.lengths_N)])
    assert flat.tolist() == stream
    assert (corpus.tokens_NT[-1, corpus.lengths_N[-1]:] == corpus.pad_token_id).all()


def test_provenance_pieces_give_back_every_document_and_its_character_spans():
    tokenizer = bpe_tokenizer()
    texts = dict(DOCS)
    corpus = pack(DOCS, tokenizer, length=16)
    ids_of, spans_of = {}, {}
    for n, pieces in enumerate(corpus.provenance):
        assert pieces[0]["token_span"][0] == 0 and pieces[-1]["token_span"][1] == corpus.lengths_N[n]
        for piece in pieces:
            start, stop = piece["token_span"]
            ids_of.setdefault(piece["doc"], []).extend(corpus.tokens_NT[n, start:stop].tolist())
            spans_of.setdefault(piece["doc"], []).append(piece["char_span"])
            if piece["doc"] == "a":  # ASCII: each piece on its own decodes to its span of the text
                c0, c1 = piece["char_span"]
                assert tokenizer.decode(corpus.tokens_NT[n, start:stop].tolist(), skip_special_tokens=True) == texts["a"][c0:c1]
    assert set(ids_of) == {"a", "b", "c"}  # the empty document is skipped
    for doc, ids in ids_of.items():
        assert tokenizer.decode(ids, skip_special_tokens=True) == texts[doc]
        spans = spans_of[doc]
        assert spans[0][0] == 0 and spans[-1][1] == len(texts[doc])
        assert all(a[1] <= b[0] + 1 for a, b in zip(spans, spans[1:]))  # in order, no gap of more than a split char


def test_packing_to_disk_equals_packing_in_memory_and_round_trips(tmp_path):
    tokenizer = bpe_tokenizer()
    memory = pack(DOCS, tokenizer, length=16)
    disk = pack_to_disk(DOCS, tokenizer, tmp_path / "corpus", length=16)
    np.testing.assert_array_equal(disk.tokens_NT, memory.tokens_NT)
    np.testing.assert_array_equal(disk.lengths_N, memory.lengths_N)
    assert list(disk.provenance) == memory.provenance and disk.corpus_id == memory.corpus_id
    memory.save(tmp_path / "saved")
    assert PackedCorpus.load(tmp_path / "saved").corpus_id == disk.corpus_id
    with pytest.raises(DataError, match="already exists"):
        pack_to_disk(DOCS, tokenizer, tmp_path / "corpus", length=16)


def test_a_loaded_corpus_holds_nothing_per_sequence_outside_memory_maps(tmp_path):
    """Lengths and the provenance lines' offsets are memory maps (issue 18: 10 million sequences); a corpus
    packed before the offsets file existed still loads, its offsets found by a scan."""
    tokenizer = bpe_tokenizer()
    memory = pack(DOCS * 5, tokenizer, length=8)
    memory.save(tmp_path / "saved")
    pack_to_disk(DOCS * 5, tokenizer, tmp_path / "streamed", length=8)
    for name in ("saved", "streamed"):
        loaded = PackedCorpus.load(tmp_path / name)
        assert isinstance(loaded.tokens_NT, np.memmap) and isinstance(loaded.lengths_N, np.memmap)
        assert isinstance(loaded.provenance.offsets, np.memmap)
        assert [loaded.provenance[n] for n in range(len(loaded))[::-1]] == memory.provenance[::-1]
        np.testing.assert_array_equal(loaded.lengths_N, memory.lengths_N)
    old = tmp_path / "saved"
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["checksums"]["provenance.offsets"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "provenance.offsets").unlink()
    loaded = PackedCorpus.load(old)
    assert not isinstance(loaded.provenance.offsets, np.memmap) and list(loaded.provenance) == memory.provenance


def test_a_packed_corpus_refuses_another_tokenizer_and_a_corrupted_file(tmp_path):
    tokenizer = bpe_tokenizer()
    pack(DOCS, tokenizer, length=16).save(tmp_path / "corpus")
    other = bpe_tokenizer(vocab_size=280)
    with pytest.raises(DataError, match="another tokenizer"):
        PackedCorpus.load(tmp_path / "corpus", tokenizer_id=tokenizer_id(other))
    data = bytearray((tmp_path / "corpus" / "tokens.bin").read_bytes())
    data[5] ^= 0xFF
    (tmp_path / "corpus" / "tokens.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="tokens.bin.*checksum"):
        PackedCorpus.load(tmp_path / "corpus")


def test_an_empty_corpus_and_a_too_short_length_are_refused():
    with pytest.raises(DataError, match="no text"):
        pack([("a", ""), ("b", "")], bpe_tokenizer(), length=16)
    with pytest.raises(DataError, match="at least 2"):
        pack(DOCS, bpe_tokenizer(), length=1)


@pytest.mark.parametrize("suffix", ["jsonl", "txt", "parquet", "csv", "saved"])
def test_corpora_load_from_every_supported_format(tmp_path, suffix):
    import datasets

    texts = [text for _, text in pydoc_documents()[:3]]
    records = datasets.Dataset.from_dict({"text": texts, "name": ["x", "y", "z"]})
    path = tmp_path / f"corpus.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "name": n}) + "\n" for t, n in zip(texts, "xyz")))
    elif suffix == "txt":
        path.write_text("\n".join(texts))
    elif suffix == "parquet":
        records.to_parquet(str(path))
    elif suffix == "csv":
        records.to_csv(str(path), index=False)
    else:
        records.save_to_disk(str(path))
    dataset = load_corpus(path)
    joined = "\n".join(text for _, text in dataset_documents(dataset))
    assert all(line in joined for line in texts[0].splitlines() if line)
    if suffix != "txt":
        assert [doc for doc, _ in dataset_documents(dataset, id_column="name")] == ["x", "y", "z"]


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    with pytest.raises(DataError, match="no column 'text'.*body"):
        load_corpus(tmp_path / "c.jsonl")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (tmp_path / "d" / "b.csv").write_text("text\nb\n")
    with pytest.raises(DataError, match="share one of the formats"):
        load_corpus(tmp_path / "d")


def test_the_prompt_completion_boundary_is_exact_even_where_the_tokenizer_would_merge():
    tokenizer = bpe_tokenizer()
    word = next(w for w in ("statement", "expression", "assert", "the") if len(tokenizer(" " + w)["input_ids"]) == 1)
    prompt, completion = "The " + word[:2], word[2:] + " is a debugging aid"
    encoded = encode_query(tokenizer, Query(prompt, completion, id="q"), max_length=256)
    assert encoded.prompt_ids == tokenizer(prompt)["input_ids"]
    assert encoded.completion_ids == tokenizer(completion, add_special_tokens=False)["input_ids"]
    joined = tokenizer(prompt + completion)["input_ids"]
    assert len(joined) < len(encoded.prompt_ids) + len(encoded.completion_ids)  # given whole, BPE merges the word
    batch = collate_query_rows(encoded.rows(), pad_id=0)
    labels = batch["labels"][0].tolist()
    assert labels[: len(encoded.prompt_ids)] == [-100] * len(encoded.prompt_ids)
    assert labels[len(encoded.prompt_ids):] == encoded.completion_ids


def test_a_contrastive_query_becomes_two_rows_with_opposite_signs():
    tokenizer = bpe_tokenizer()
    items = [encode_query(tokenizer, Query("p", " yes", " no", "a"), max_length=64),
             encode_query(tokenizer, Query("p", " maybe", None, "b"), max_length=64)]
    rows, M_QR = query_rows(items)
    assert len(rows) == 3
    assert M_QR.tolist() == [[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]


def test_bad_queries_are_refused_with_the_reason():
    tokenizer = bpe_tokenizer()
    with pytest.raises(DataError, match="prompt is empty"):
        Query("  ", "x")
    with pytest.raises(DataError, match="completion is empty"):
        Query("p", "")
    with pytest.raises(DataError, match="longer than the model's context of 8"):
        encode_query(tokenizer, Query("a long prompt about the assert statement", " and more", id="q"), max_length=8)


def test_query_files_are_read_and_their_mistakes_located(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"prompt": "a", "completion": " b", "id": "one"}\n\n{"prompt": "c"}\n')
    queries = read_queries(path)
    assert [(q.id, q.prompt, q.completion) for q in queries] == [("one", "a", " b"), ("q1", "c", None)]
    cases = {'{"prompt": "a"\n': "line|JSON", '{"completion": "b"}\n': "prompt",
             '{"prompt": "a", "complete": "b"}\n': "unknown key.*complete",
             '{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n': "ids repeat", "\n": "no query"}
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_queries(path)


def test_separate_documents_start_each_document_in_a_new_sequence():
    tokenizer = bpe_tokenizer()
    corpus = pack(DOCS, tokenizer, length=16, separate_documents=True)
    for pieces in corpus.provenance:
        assert len(pieces) == 1 and pieces[0]["token_span"][0] == 0
    per_doc = {doc: len(tokenizer(text)["input_ids"]) + 1 for doc, text in DOCS if text}
    assert sorted(corpus.lengths_N.tolist()) == sorted(
        [16] * sum(n // 16 for n in per_doc.values()) + [n % 16 for n in per_doc.values() if n % 16])


def test_a_loaded_corpus_holds_a_few_bytes_per_sequence_not_python_objects(tmp_path, monkeypatch):
    """Scale: provenance stays on disk (byte offsets in memory), tokens are memory-mapped.

    Measured as the growth of the memory a loaded corpus holds (and of the peak while loading)
    between a corpus and one twice its size, so that fixed read buffers do not count.
    """
    import tracemalloc

    import ekfac_influence.data as data

    monkeypatch.setattr(data, "READ_CHUNK_BYTES", 1 << 14)  # fixed read buffers, far smaller than the corpora
    peaks, sizes = [], []
    for count in (2000, 4000):
        documents = [(f"doc{i}", f"x = {i} while y: assert z") for i in range(count)]
        pack_to_disk(documents, bpe_tokenizer(), tmp_path / f"corpus{count}", length=4)
        tracemalloc.start()
        corpus = PackedCorpus.load(tmp_path / f"corpus{count}")
        peaks.append(tracemalloc.get_traced_memory())  # (held now, peak)
        tracemalloc.stop()
        sizes.append(len(corpus))
    held, peak = ((peaks[1][i] - peaks[0][i]) / (sizes[1] - sizes[0]) for i in (0, 1))
    assert sizes[1] > 20_000
    # measured 16 B held per sequence (offsets and lengths); Python lists of dicts would be ~500 B
    assert held < 32 and peak < 64, (held, peak)
    assert corpus.provenance[123][0]["doc"] == pack(documents, bpe_tokenizer(), length=4).provenance[123][0]["doc"]


# ----------------------------------------------------------------------------- property-based

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)
DOCUMENT = st.one_of(TEXT, st.just(""), st.just("\n\n\n"), TEXT.map(lambda t: (t + "\n") * 40))  # empty lines, long documents


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(DOCUMENT, min_size=1, max_size=6), length=st.integers(2, 40), separate=st.booleans())
def test_packing_any_text_keeps_every_token_once_in_order_with_exact_provenance(texts, length, separate):
    tokenizer = bpe_tokenizer()
    documents = [(f"d{i}", text) for i, text in enumerate(texts)]
    if not any(texts):
        with pytest.raises(DataError, match="no text"):
            pack(documents, tokenizer, length=length, separate_documents=separate)
        return
    corpus = pack(documents, tokenizer, length=length, separate_documents=separate)
    assert corpus.tokens_NT.shape[1] == length and (corpus.lengths_N >= 1).all() and (corpus.lengths_N <= length).all()
    if not separate:  # only the last sequence may be short
        assert (corpus.lengths_N[:-1] == length).all()
    ids_of = {}
    for n, pieces in enumerate(corpus.provenance):
        spans = [p["token_span"] for p in pieces]
        assert spans[0][0] == 0 and spans[-1][1] == corpus.lengths_N[n]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # the pieces tile the sequence
        for piece in pieces:
            ids_of.setdefault(piece["doc"], []).extend(corpus.tokens_NT[n, slice(*piece["token_span"])].tolist())
    for doc, text in documents:
        if text:  # each document's tokens, then EOS, exactly once and in order
            assert ids_of[doc] == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            assert tokenizer.decode(ids_of[doc][:-1]) == text
        else:
            assert doc not in ids_of
