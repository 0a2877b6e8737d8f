"""Queries as token ids: the prompt/completion pairs a user asks about, read, checked, encoded and batched.

Shapes: Q queries, R query rows (a contrastive query has two). The prompt and the completion are tokenized
apart, so the boundary between them is exact (no token merges across it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import DataError, pad_token_id
from .files import NotTextError, read_utf8


@dataclass(frozen=True)
class Query:
    """A prompt and the completion whose log-probability is explained.

    completion None = the model's own greedy completion is generated and used. With `contrast`,
    the measurement is log p(completion | prompt) − log p(contrast | prompt).
    """

    prompt: str
    completion: str | None = None
    contrast: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "completion", "contrast"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):  # JSON's {"prompt": 42}: no text to condition on
                raise DataError(f"query {self.id or ''}: the {name} must be text (a string), got {value!r}; quote it")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DataError(f"query {self.id or ''}: the prompt is empty; give the text the model is conditioned on")
        for name in ("completion", "contrast"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value == ""):
                raise DataError(f"query {self.id or ''}: the {name} is empty; give text, or omit it"
                                + (" to use the model's greedy completion" if name == "completion" else ""))
        if self.contrast is not None and self.contrast == self.completion:  # f = log p(c) - log p(c) = 0, every score 0
            raise DataError(f"query {self.id or ''}: the contrast is the completion ({self.contrast!r}); the measurement "
                            f"would be 0 and every score with it: give another contrast, or omit it")


def read_queries(path) -> list[Query]:
    """Queries from a JSONL file of {"prompt", "completion", optional "contrast" and "id"}."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"query file {path} does not exist")
    if not path.is_file():
        raise DataError(f"query file {path} is not a file; set queries.file to a JSONL file")
    queries = []
    try:
        text = read_utf8(path, "query file")
    except NotTextError as error:
        raise DataError(str(error)) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"{path}:{number}: each line must be an object with a \"prompt\" (and usually a \"completion\")")
        unknown = set(record) - {"prompt", "completion", "contrast", "id"}
        if unknown:
            raise DataError(f"{path}:{number}: unknown key(s) {', '.join(sorted(unknown))}; "
                            "allowed: prompt, completion, contrast, id")
        query_id = str(record.get("id", f"q{len(queries)}"))
        try:
            queries.append(Query(record["prompt"], record.get("completion"), record.get("contrast"), query_id))
        except DataError as error:
            raise DataError(f"{path}:{number}: {error}") from None
    if not queries:
        raise DataError(f"query file {path} holds no query")
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: query ids repeat ({sorted({i for i in ids if ids.count(i) > 1})[:5]}); ids must be unique")
    return queries


@dataclass(frozen=True)
class EncodedQuery:
    """Token ids with the exact prompt/completion boundary (tokenized apart: no merge across it)."""

    query: Query
    prompt_ids: list[int]
    completion_ids: list[int]
    contrast_ids: list[int] | None = None

    def rows(self) -> list[tuple[list[int], list[int]]]:
        out = [(self.prompt_ids, self.completion_ids)]
        if self.contrast_ids is not None:
            out.append((self.prompt_ids, self.contrast_ids))
        return out


def encode_query(tokenizer, query: Query, *, max_length: int) -> EncodedQuery:
    """Prompt with the tokenizer's special tokens (e.g. BOS); completion without any."""
    if query.completion is None:
        raise DataError(f"query {query.id}: no completion; generate one first (query stage does it)")
    prompt_ids = list(tokenizer(query.prompt)["input_ids"])
    completion_ids = list(tokenizer(query.completion, add_special_tokens=False)["input_ids"])
    contrast_ids = None
    if query.contrast is not None:
        contrast_ids = list(tokenizer(query.contrast, add_special_tokens=False)["input_ids"])
    for name, ids in (("completion", completion_ids), ("contrast", contrast_ids)):
        if ids is not None and not ids:
            raise DataError(f"query {query.id}: the {name} encodes to no token")
        if ids is not None and len(prompt_ids) + len(ids) > max_length:
            raise DataError(f"query {query.id}: prompt + {name} is {len(prompt_ids) + len(ids)} tokens, longer than the "
                            f"model's context of {max_length}; shorten the prompt")
    return EncodedQuery(query, prompt_ids, completion_ids, contrast_ids)


def query_rows(encoded: list[EncodedQuery]) -> tuple[list[tuple[list[int], list[int]]], torch.Tensor]:
    """All rows to differentiate, and the matrix M_QR with ∇f_q = Σ_r M_qr ∇log p(row r): +1, or −1 for a contrast."""
    rows, signs = [], []
    for q, item in enumerate(encoded):
        for sign, row in zip((1.0, -1.0), item.rows()):
            rows.append(row)
            signs.append((q, len(rows) - 1, sign))
    M_QR = torch.zeros(len(encoded), len(rows), dtype=torch.float64)
    for q, r, sign in signs:
        M_QR[q, r] = sign
    return rows, M_QR


def collate_query_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded batch; labels = the completion tokens, −100 on the prompt and the padding."""
    width = max(len(p) + len(c) for p, c in rows)
    ids, mask, labels = [], [], []
    for p, c in rows:
        pad = width - len(p) - len(c)
        ids.append(p + c + [pad_id] * pad)
        mask.append([1] * (len(p) + len(c)) + [0] * pad)
        labels.append([-100] * len(p) + c + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def query_batches(tokenizer, queries, *, batch_size: int = 8, max_length: int = 2048) -> list[dict]:
    """`query_batches` for compute_scores from (prompt, completion) pairs, dicts or Query objects.

    Each query is one row: f = log p(completion | prompt), labels −100 on the prompt. A contrast
    (f = log p(c) − log p(c′)) needs two rows per query: use query_influence for it.
    """
    rows = []
    for index, value in enumerate(queries):
        if isinstance(value, dict):
            value = Query(value.get("prompt"), value.get("completion"), value.get("contrast"), value.get("id"))
        elif isinstance(value, (tuple, list)):
            value = Query(*value)
        if not isinstance(value, Query):
            raise DataError(f"query {index}: expected a (prompt, completion) pair, a dict or a Query, got {value!r}")
        if value.contrast is not None:
            raise DataError(f"query {value.id or index}: a contrast needs two rows per query; use query_influence")
        rows.extend(encode_query(tokenizer, value, max_length=max_length).rows())
    if not rows:
        raise DataError("no query given")
    return [collate_query_rows(rows[i : i + batch_size], pad_token_id(tokenizer)) for i in range(0, len(rows), batch_size)]
