"""TF-IDF shortlist: which training sequences share the most (rare) tokens with a query?

A document is one training sequence (its token ids); a query is prompt + completion. The top K
sequences by lexical score become the candidates that influence scoring looks at (docs/design.md §1). Two
weightings; C sequences in the index, n_t of them contain token t, c(t, D) counts t in D:

    bm25 (default: the paper's modified BM25, e(t, D) = 1 if t occurs in D else 0)
        IDF(t)      = log((C − n_t + 0.5) / (n_t + 0.5) + 1)
        score(Q, D) = Σ_{i=1..|Q|} IDF(q_i) · (k1 + 1) e(q_i, D) / (k1 + e(q_i, D))
      over the query's tokens with their repeats, as the paper sums over the query's keywords (a
      keyword matters more the more often the query holds it); `query_counts=False` counts each
      distinct query token once (the query as a set). With presence e ∈ {0, 1}
      the BM25 factor is exactly 1 for a present term, so k1 has no effect on any score; it is kept
      (and recorded) so that the formula reads as the paper's.
    tfidf (scikit-learn's TfidfTransformer on raw counts: smooth idf, l2-normalised rows)
        idf(t)      = ln((1 + C) / (1 + n_t)) + 1,   w(t, D) = c(t, D) idf(t) / ‖c(·, D) idf‖₂
        score(Q, D) = Σ_t w(t, Q) w(t, D)        (cosine: the query is weighted as a document, counts and all)

Token ids outside [0, V) in a query are absent terms (they match nothing and, for tfidf, take no
part in the query's norm). Scores are never negative; ties rank the lower sequence index first.

Shapes: N sequences, V vocabulary, Q queries, B queries in one scoring block, K results.

Layout: an inverted index. `indptr` [V+1] and `indices` (sequence ids, ascending within a term)
hold, for each term, the sequences that contain it, and `data` the weight of each (term, sequence)
pair: the N × V document-term weight matrix in CSC form, i.e. its V × N transpose in CSR. A block
of queries (a B × V CSR matrix) times it is one sparse product whose cost is the postings of the
query terms only, not the whole index. On disk (no pickle): one `.npy` file per array and a
`manifest.json` with the sha256 of each; bm25's data (= IDF of the term) is rebuilt at load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from .files import temporary_directory

__all__ = ["ShortlistError", "ShortlistIndex", "bm25_idf", "tfidf_idf"]

FORMAT, FORMAT_VERSION, MANIFEST_FILE = "ekfac_influence.shortlist", 1, "manifest.json"
WEIGHTINGS = ("bm25", "tfidf")
DEFAULT_CHUNK_SIZE = 2048
SEGMENT_PAIRS = 1 << 23  # chunks merge into segments of 32 MiB of tokens or more: freed, they go back to the OS
SCORE_BLOCK_ELEMENTS = 1 << 25  # dense float32 scores of one query block: at most 128 MiB
MAX_TOKEN_ID = 2**31 - 1  # indices are int32


class ShortlistError(ValueError):
    """A shortlist index, corpus or query that cannot be used as asked; the message says how to fix it."""


def bm25_idf(doc_freq_V: np.ndarray, num_sequences: int) -> np.ndarray:
    """IDF(t) = log((C − n_t + 0.5) / (n_t + 0.5) + 1), float64 [V]."""
    n_V = np.asarray(doc_freq_V, dtype=np.float64)
    return np.log((num_sequences - n_V + 0.5) / (n_V + 0.5) + 1.0)


def tfidf_idf(doc_freq_V: np.ndarray, num_sequences: int) -> np.ndarray:
    """scikit-learn's smooth idf(t) = ln((1 + C) / (1 + n_t)) + 1, float64 [V]."""
    return np.log((1.0 + num_sequences) / (1.0 + np.asarray(doc_freq_V, dtype=np.float64))) + 1.0


def _bm25_term_weights(idf_V: np.ndarray, k1: float) -> np.ndarray:
    """The weight of a present term, IDF(t) (k1 + 1) e / (k1 + e) at e = 1, as float32 [V]."""
    presence = 1.0
    return (idf_V * ((k1 + 1.0) * presence / (k1 + presence))).astype(np.float32)


# ----------------------------------------------------------------------------- building


@dataclass
class _Pairs:
    """The distinct (sequence, token) pairs of consecutive sequences, sequence-major."""

    row_nnz: np.ndarray  # [n] int64: distinct tokens of each sequence
    tokens: np.ndarray  # [nnz] int32: each sequence's distinct tokens, ascending, sequences in order
    counts: np.ndarray | None  # [nnz] int32: occurrences of each (tfidf only)


def _merge(parts: list[_Pairs]) -> _Pairs:
    counts = np.concatenate([p.counts for p in parts]) if parts[0].counts is not None else None
    return _Pairs(np.concatenate([p.row_nnz for p in parts]), np.concatenate([p.tokens for p in parts]), counts)


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _token_array(sequence, where: str) -> np.ndarray:
    tokens = np.asarray(sequence)
    if tokens.ndim != 1:
        raise ShortlistError(f"{where} must be a 1-D sequence of token ids, got an array of shape {tokens.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ShortlistError(f"{where} holds {tokens.dtype} values; token ids must be integers")
    return tokens


def _distinct_tokens(flat: np.ndarray, lengths_n: np.ndarray, want_counts: bool) -> _Pairs:
    """Each sequence's distinct tokens (and their counts) from the chunk's concatenated tokens."""
    n, total = lengths_n.size, flat.size
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths_n)  # [total] sequence of each token
    width = int(lengths_n.max(initial=0))
    if n * width <= 2 * total + 4096:  # little padding: sort each row of an [n, width] block
        if n * width == total:
            block_nW = flat.astype(np.int32).reshape(n, width)
        else:
            block_nW = np.full((n, width), -1, dtype=np.int32)  # -1 pads sort first, then are dropped
            position = np.arange(total) - np.repeat(np.cumsum(lengths_n) - lengths_n, lengths_n)
            block_nW[rows, position] = flat
        block_nW.sort(axis=1)
        ordered = block_nW[block_nW >= 0] if n * width != total else block_nW.reshape(-1)
    else:  # a few very long sequences: one sort of (sequence, token) keys
        keys = (rows << 32) | flat.astype(np.int64)
        keys.sort()
        ordered = (keys & 0xFFFFFFFF).astype(np.int32)
    first = np.ones(total, dtype=bool)  # first occurrence of a (sequence, token) pair
    if total:
        first[1:] = (ordered[1:] != ordered[:-1]) | (rows[1:] != rows[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, total)).astype(np.int32) if want_counts else None
    return _Pairs(np.bincount(rows[starts], minlength=n), ordered[starts], counts)


def _read_chunk(sequences: list, first_index: int, vocab_size: int | None, want_counts: bool) -> _Pairs:
    arrays = [_token_array(seq, f"sequence {first_index + i}") for i, seq in enumerate(sequences)]
    lengths_n = np.array([a.size for a in arrays], dtype=np.int64)
    nonempty = [a for a in arrays if a.size]
    flat = np.concatenate(nonempty, dtype=np.int64, casting="unsafe") if nonempty else np.zeros(0, np.int64)
    limit = MAX_TOKEN_ID if vocab_size is None else vocab_size - 1
    bad = np.flatnonzero((flat < 0) | (flat > limit))
    if bad.size:
        seq = first_index + int(np.searchsorted(np.cumsum(lengths_n), bad[0], side="right"))
        hint = "" if vocab_size is None else f" (vocab_size={vocab_size}); set vocab_size to the tokenizer's"
        raise ShortlistError(f"sequence {seq} holds token id {int(flat[bad[0]])}, outside [0, {limit}]{hint}")
    return _distinct_tokens(flat, lengths_n, want_counts)


def _read_corpus(token_sequences: Iterable, chunk_size: int, vocab_size: int | None, want_counts: bool,
                 show_progress: bool) -> tuple[list[_Pairs], np.ndarray]:
    """Stream the corpus chunk by chunk: the distinct tokens of every sequence, in segments, and n_t.

    Chunks are merged into segments of about SEGMENT_PAIRS pairs as they come: large allocations
    go straight back to the OS when freed, where thousands of small ones would leave the heap
    fragmented and the memory held.
    """
    total = len(token_sequences) if hasattr(token_sequences, "__len__") else None
    segments, pending, doc_freq, seen = [], [], np.zeros(0, dtype=np.int64), 0
    iterator = iter(token_sequences)
    with tqdm(total=total, unit="seq", desc="shortlist index", disable=not show_progress) as bar:
        while sequences := list(itertools.islice(iterator, chunk_size)):
            chunk = _read_chunk(sequences, seen, vocab_size, want_counts)
            chunk_freq = np.bincount(chunk.tokens, minlength=doc_freq.size)
            chunk_freq[: doc_freq.size] += doc_freq
            doc_freq, seen = chunk_freq, seen + len(sequences)
            pending.append(chunk)
            if sum(p.tokens.size for p in pending) >= SEGMENT_PAIRS:
                segments.append(_merge(pending))
                pending = []
            bar.update(len(sequences))
    if pending:
        segments.append(_merge(pending))
    return segments, doc_freq


def _tfidf_weights(pairs: _Pairs, idf_V: np.ndarray) -> np.ndarray:
    """w(t, D) = c(t, D) idf(t) / ‖c(·, D) idf‖₂ for each pair, float32 [nnz] (float64 inside, as sklearn)."""
    rows = np.repeat(np.arange(pairs.row_nnz.size), pairs.row_nnz)
    weight = pairs.counts * idf_V[pairs.tokens]
    norm_n = np.sqrt(np.bincount(rows, weights=weight * weight, minlength=pairs.row_nnz.size))
    return (weight / norm_n[rows]).astype(np.float32)


def _term_major(segments: list[_Pairs], doc_freq_V: np.ndarray, idf_V: np.ndarray | None):
    """Sequence-major segments → term-major (indptr [V+1], sequence ids ascending per term, tfidf data).

    Each segment is transposed on its own (scipy's linear-time counting sort) and its postings are
    placed after those of the segments before it; a segment is freed once placed (`segments` is
    emptied), so the peak holds the segments and the index, not a second copy of either.
    """
    vocab, nnz = doc_freq_V.size, int(doc_freq_V.sum())
    num_sequences = sum(p.row_nnz.size for p in segments)
    index_dtype = np.int32 if max(nnz, num_sequences, vocab) <= MAX_TOKEN_ID else np.int64
    indptr = np.zeros(vocab + 1, dtype=index_dtype)
    np.cumsum(doc_freq_V, out=indptr[1:])
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=np.float32) if idf_V is not None else None
    next_slot_V, first_sequence = indptr[:-1].copy(), 0
    while segments:
        part = segments.pop(0)
        part_indptr = np.zeros(part.row_nnz.size + 1, dtype=index_dtype)
        np.cumsum(part.row_nnz, out=part_indptr[1:])
        weights = _tfidf_weights(part, idf_V) if idf_V is not None else np.ones(part.tokens.size, dtype=bool)
        local = sp.csr_array((weights, part.tokens.astype(index_dtype, copy=False), part_indptr),
                             shape=(part.row_nnz.size, vocab)).tocsc()
        del weights
        count_V = np.diff(local.indptr).astype(index_dtype)
        slot = np.repeat(next_slot_V - local.indptr[:-1].astype(index_dtype), count_V)
        slot += np.arange(local.nnz, dtype=index_dtype)  # where each of the segment's pairs goes
        indices[slot] = local.indices + index_dtype(first_sequence)
        if data is not None:
            data[slot] = local.data
        next_slot_V += count_V
        first_sequence += part.row_nnz.size
    return indptr, indices, data


# ----------------------------------------------------------------------------- the index


class ShortlistIndex:
    """A BM25 / TF-IDF index over training sequences; see the module docstring for the scores.

    Build it with `ShortlistIndex.build(token_sequences)`, keep it with `save(path)` / `load(path)`,
    and ask it with `search(query, k)` or `search_batch(queries, k)`.
    """

    def __init__(self, *, weighting: str, k1: float | None, num_sequences: int, vocab_size: int,
                 indptr: np.ndarray, indices: np.ndarray, idf: np.ndarray, data: np.ndarray | None = None,
                 tokenizer_id: str | None = None, corpus_id: str | None = None):
        """data: tfidf's weight of each (term, sequence) pair; bm25 keeps one weight per term instead."""
        self.weighting, self.k1 = weighting, k1
        self.num_sequences, self.vocab_size = int(num_sequences), int(vocab_size)
        self.indptr, self.indices, self.idf = indptr, indices, idf
        self._pair_weights = data
        self.term_weights = _bm25_term_weights(idf, k1) if weighting == "bm25" else None
        self.tokenizer_id, self.corpus_id = tokenizer_id, corpus_id

    @classmethod
    def build(cls, token_sequences: Iterable[Sequence[int]], *, weighting: str = "bm25", k1: float = 1.5,
              chunk_size: int = DEFAULT_CHUNK_SIZE, vocab_size: int | None = None, tokenizer_id: str | None = None,
              corpus_id: str | None = None, show_progress: bool = False) -> ShortlistIndex:
        """Index `token_sequences` (any iterable of token-id sequences, read once): row i = the i-th.

        The corpus is read `chunk_size` sequences at a time. Memory at the peak: the distinct
        (sequence, token) pairs twice over (sequence-major as read, term-major as stored), about
        8 bytes per pair for bm25 and 16 for tfidf (the counts and weights too), plus one chunk's
        working set and one segment's transposition (a few hundred MB at most); never an N × V
        matrix. `vocab_size` defaults to the largest token id + 1; pass the tokenizer's, so that
        rarer query ids are absent terms too. `tokenizer_id` / `corpus_id` are recorded for `load`.
        """
        if weighting not in WEIGHTINGS:
            raise ShortlistError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not (isinstance(k1, (int, float)) and math.isfinite(k1) and k1 >= 0):
            raise ShortlistError(f"k1 must be a finite number >= 0, got {k1!r}")
        if not _is_positive_int(chunk_size):
            raise ShortlistError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if vocab_size is not None and not (_is_positive_int(vocab_size) and vocab_size <= MAX_TOKEN_ID + 1):
            raise ShortlistError(f"vocab_size must be a positive integer up to 2**31, got {vocab_size!r}")
        chunk_size, vocab_size = int(chunk_size), None if vocab_size is None else int(vocab_size)
        for name, value in (("tokenizer_id", tokenizer_id), ("corpus_id", corpus_id)):
            if value is not None and not isinstance(value, str):
                raise ShortlistError(f"{name} must be a string or None, got {type(value).__name__}")
        tfidf = weighting == "tfidf"
        segments, doc_freq = _read_corpus(token_sequences, chunk_size, vocab_size, tfidf, show_progress)
        num_sequences = sum(p.row_nnz.size for p in segments)
        if num_sequences == 0:
            raise ShortlistError("the corpus holds no sequences: there is nothing to index")
        vocab = vocab_size if vocab_size is not None else doc_freq.size
        doc_freq = np.pad(doc_freq, (0, vocab - doc_freq.size))
        idf = (tfidf_idf if tfidf else bm25_idf)(doc_freq, num_sequences)
        indptr, indices, data = _term_major(segments, doc_freq, idf if tfidf else None)
        return cls(weighting=weighting, k1=None if tfidf else float(k1), num_sequences=num_sequences,
                   vocab_size=vocab, indptr=indptr, indices=indices, data=data, idf=idf,
                   tokenizer_id=tokenizer_id, corpus_id=corpus_id)

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (f"ShortlistIndex(weighting={self.weighting!r}, num_sequences={self.num_sequences}, "
                f"vocab_size={self.vocab_size}, nnz={self.nnz}, tokenizer_id={self.tokenizer_id!r})")

    @property
    def nnz(self) -> int:
        """Distinct (sequence, token) pairs."""
        return int(self.indices.size)

    @property
    def doc_freq(self) -> np.ndarray:
        """n_t: how many sequences contain each token, int [V]."""
        return np.diff(self.indptr)

    @property
    def data(self) -> np.ndarray:
        """Each (term, sequence) pair's weight, float32 [nnz] (bm25: its term's, expanded on request)."""
        if self._pair_weights is not None:
            return self._pair_weights
        return np.repeat(self.term_weights, self.doc_freq)

    @property
    def weights(self) -> sp.csc_array:
        """The N × V document-term weight matrix (shares the index's arrays)."""
        return sp.csc_array((self.data, self.indices, self.indptr), shape=(self.num_sequences, self.vocab_size))

    # ------------------------------------------------------------------------- search

    def search(self, query_token_ids: Sequence[int], k: int, *, query_counts: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k sequences for one query: (ids int64 [min(k, N)], scores float32), best first."""
        if _token_array(query_token_ids, "the query").size == 0:
            raise ShortlistError("the query is empty: it needs at least one token id (prompt + completion)")
        ids_QK, scores_QK = self.search_batch([query_token_ids], k, query_counts=query_counts)
        return ids_QK[0], scores_QK[0]

    def search_batch(self, queries: Iterable[Sequence[int]], k: int, *,
                     query_counts: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k sequences for each query: (ids int64 [Q, min(k, N)], scores float32), best first.

        Scores of a block of queries come from one sparse product, queries [B, V] @ index [V, N];
        a block is as many queries as 2^25 dense scores allow (128 MiB: 33 queries at N = 1M).
        A query token repeated c times counts c times (bm25 with query_counts, the paper's form, and
        tfidf), or once (bm25 without).
        """
        if not _is_positive_int(k):
            raise ShortlistError(f"k must be a positive integer, got {k!r}")
        queries_QV = self._query_matrix(queries, query_counts)
        num_queries, top = queries_QV.shape[0], min(int(k), self.num_sequences)
        ids_QK = np.empty((num_queries, top), dtype=np.int64)
        scores_QK = np.empty((num_queries, top), dtype=np.float32)
        block = max(1, SCORE_BLOCK_ELEMENTS // self.num_sequences)
        for start in range(0, num_queries, block):
            scores_BN = self._scores(queries_QV[start:start + block])
            for b, scores_N in enumerate(scores_BN):
                ids_QK[start + b] = _top_k(scores_N, top)
                scores_QK[start + b] = scores_N[ids_QK[start + b]]
        return ids_QK, scores_QK

    def _scores(self, queries_BV: sp.csr_array) -> np.ndarray:
        """Dense [B, N] float32 scores, Σ over each query's terms of its weight × each posting's weight.

        One term at a time through the (memory-mapped) postings: nothing sized by the corpus is held
        but the scores themselves; terms in ascending order, as the sparse product adds them.
        """
        scores_BN = np.zeros((queries_BV.shape[0], self.num_sequences), dtype=np.float32)
        for b in range(queries_BV.shape[0]):
            row = slice(queries_BV.indptr[b], queries_BV.indptr[b + 1])
            for term, weight in zip(queries_BV.indices[row], queries_BV.data[row]):
                start, end = self.indptr[term], self.indptr[term + 1]
                if self._pair_weights is None:
                    scores_BN[b, self.indices[start:end]] += weight * self.term_weights[term]
                else:
                    scores_BN[b, self.indices[start:end]] += weight * self._pair_weights[start:end]
        return scores_BN

    def _query_matrix(self, queries: Iterable[Sequence[int]], query_counts: bool = True) -> sp.csr_array:
        """Queries as a [Q, V] float32 CSR matrix of term weights (see the module docstring)."""
        terms, weights, row_nnz = [], [], []
        for q, query in enumerate(queries):
            tokens = _token_array(query, f"query {q}")
            if tokens.size == 0:
                raise ShortlistError(f"query {q} is empty: it needs at least one token id (prompt + completion)")
            tokens = tokens[(tokens >= 0) & (tokens < self.vocab_size)]  # other ids are absent terms
            term, count = np.unique(tokens.astype(np.int64), return_counts=True)
            if self.weighting == "bm25":
                weight = count if query_counts else np.ones(term.size)  # IDF sits in the index's data
            else:
                weight = count * self.idf[term]
                weight = weight / np.sqrt(np.sum(weight * weight)) if term.size else weight
            terms.append(term)
            weights.append(weight.astype(np.float32))
            row_nnz.append(term.size)
        index_dtype = self.indptr.dtype
        indptr = np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)]).astype(index_dtype)
        terms = np.concatenate(terms).astype(index_dtype) if terms else np.zeros(0, index_dtype)
        weights = np.concatenate(weights) if weights else np.zeros(0, np.float32)
        return sp.csr_array((weights, terms, indptr), shape=(len(row_nnz), self.vocab_size))

    # ------------------------------------------------------------------------- storage

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write the index to directory `path` atomically (a temporary sibling, then a rename)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ShortlistError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        arrays = {"indptr": self.indptr, "indices": self.indices, "idf": self.idf}
        if self.weighting == "tfidf":
            arrays["data"] = self.data
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_directory(path.parent, path.name)
        try:
            checksums = {}
            for name, array in arrays.items():
                with open(tmp / f"{name}.npy", "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
                checksums[f"{name}.npy"] = _sha256(tmp / f"{name}.npy")
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "weighting": self.weighting,
                        "k1": self.k1, "num_sequences": self.num_sequences, "vocab_size": self.vocab_size,
                        "nnz": self.nnz, "tokenizer_id": self.tokenizer_id, "corpus_id": self.corpus_id,
                        "checksums": checksums}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            if path.exists():
                backup = path.with_name(f".{path.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(path, backup)
                os.replace(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path, *, tokenizer_id: str | None = None, corpus_id: str | None = None) -> ShortlistIndex:
        """Read an index saved by `save`, verifying every file's sha256 and the index's structure.

        A `tokenizer_id` / `corpus_id` given here must equal the one recorded at build time (exact
        string comparison; an index built without one matches no given id).
        """
        path = Path(path)
        manifest = _read_manifest(path)
        for name, asked, what in (("tokenizer_id", tokenizer_id, "tokenizer"), ("corpus_id", corpus_id, "corpus")):
            if asked is not None and manifest.get(name) != asked:
                raise ShortlistError(
                    f"the shortlist index at {path} was built for {what} {manifest.get(name)!r}, not {asked!r}: "
                    f"its token ids and sequence numbers would not match. Rebuild it for this {what} with the "
                    f"index command (ekfac-influence index ... --overwrite, or "
                    f"ShortlistIndex.build(...).save(path, overwrite=True)), or point to the index built for it")
        expected = ["indptr.npy", "indices.npy", "idf.npy"] + (["data.npy"] if manifest["weighting"] == "tfidf" else [])
        arrays = {name[:-4]: _read_array(path, name, manifest["checksums"]) for name in expected}
        num_sequences, vocab, nnz = manifest["num_sequences"], manifest["vocab_size"], manifest["nnz"]
        _check_structure(path, arrays, num_sequences, vocab, nnz)
        return cls(weighting=manifest["weighting"], k1=manifest["k1"], num_sequences=num_sequences, vocab_size=vocab,
                   tokenizer_id=manifest.get("tokenizer_id"), corpus_id=manifest.get("corpus_id"), **arrays)


def _top_k(scores_N: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; equal scores rank the lower index first."""
    n = scores_N.size
    if k < n:
        kth = np.partition(scores_N, n - k)[n - k]  # the k-th largest value
        above = np.flatnonzero(scores_N > kth)
        candidates = np.concatenate([above, np.flatnonzero(scores_N == kth)[: k - above.size]])
    else:
        candidates = np.arange(n)
    return candidates[np.lexsort((candidates, -scores_N[candidates]))]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ShortlistError(f"{manifest_path} is missing: {path} is not a finished shortlist index; build it "
                             f"with the index command (ekfac-influence index) or ShortlistIndex.build(...).save(path)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShortlistError(f"{manifest_path} cannot be read ({err}); rebuild the index") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShortlistError(f"{manifest_path} does not describe a shortlist index (format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShortlistError(f"{manifest_path} has format version {manifest.get('format_version')!r}; this "
                             f"ekfac_influence reads version {FORMAT_VERSION}: rebuild the index")
    missing = {"weighting", "k1", "num_sequences", "vocab_size", "nnz", "checksums"} - set(manifest)
    if missing or manifest["weighting"] not in WEIGHTINGS:
        raise ShortlistError(f"{manifest_path} is incomplete or invalid (missing {sorted(missing)}); rebuild the index")
    return manifest


def _read_array(path: Path, name: str, checksums: dict) -> np.ndarray:
    file = path / name
    if not file.is_file() or name not in checksums:
        raise ShortlistError(f"{file} is missing (or absent from the manifest); the index is incomplete: rebuild it")
    if _sha256(file) != checksums[name]:
        raise ShortlistError(f"{file} is corrupted or truncated: its sha256 differs from the one in "
                             f"{path / MANIFEST_FILE}; rebuild the index")
    try:
        return np.load(file, allow_pickle=False, mmap_mode="r")  # pages read as searched, not N-sized in memory
    except (OSError, ValueError) as err:
        raise ShortlistError(f"{file} cannot be read as an array ({err}); rebuild the index") from err


def _check_structure(path: Path, arrays: dict, num_sequences: int, vocab: int, nnz: int) -> None:
    """Cheap checks that the arrays form a V × N index (guards the sparse kernels against bad input)."""
    indptr, indices, idf, data = arrays["indptr"], arrays["indices"], arrays["idf"], arrays.get("data")
    ok = all(_is_positive_int(v) or v == 0 for v in (num_sequences, vocab, nnz)) and num_sequences > 0
    ok = ok and indptr.shape == (vocab + 1,) and indptr.dtype.kind == "i" and indices.dtype == indptr.dtype
    ok = ok and indices.shape == (nnz,) and idf.shape == (vocab,) and idf.dtype == np.float64
    ok = ok and (data is None or (data.shape == (nnz,) and data.dtype == np.float32))  # bm25: rebuilt from idf
    ok = ok and indptr[0] == 0 and indptr[-1] == nnz and not np.any(np.diff(indptr) < 0)
    ok = ok and (nnz == 0 or (indices.min() >= 0 and indices.max() < num_sequences))
    if not ok:
        raise ShortlistError(f"the arrays in {path} do not form the index its manifest describes; rebuild it")


# ----------------------------------------------------------------------------- recall audit
