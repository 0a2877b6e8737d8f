"""Corpora as token ids: reading, packing and provenance (queries: `query_inputs`).

Shapes: N sequences, T positions (the packed length).

A corpus is read with `datasets` (JSONL, text, parquet, CSV, or a `save_to_disk` directory), each
document tokenized on its own and followed by EOS, the documents concatenated and cut into sequences
of `length` tokens, as causal LMs are pretrained. The last, shorter sequence is kept and padded.
Every sequence keeps its provenance: the pieces of documents it holds, each with the document id,
the dataset row, the token span inside the sequence and the character span inside the document.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .model import HUB_ID, cached_hub_snapshot, hub_cache_directory
from .storage import sha256_file, staged_directory

READ_CHUNK_BYTES = 1 << 24  # provenance.jsonl is scanned for line starts this many bytes at a time
FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet", ".csv": "csv"}
TOKENS_FILE, LENGTHS_FILE, PROVENANCE_FILE, MANIFEST_FILE = "tokens.bin", "lengths.bin", "provenance.jsonl", "manifest.json"
OFFSETS_FILE = "provenance.offsets"  # int64 byte offset of each provenance line, read as a memory map


class DataError(ValueError):
    """A corpus or query that cannot be used; the message says what, where, and how to fix it."""


# ----------------------------------------------------------------------------- corpus


def load_corpus(path, *, text_column: str = "text", split: str = "train"):
    """A `datasets.Dataset` from a file, a directory of files of one format, or a saved dataset.

    `pydoc:topics` is Python's own documentation (79 topics, columns topic and text), always at hand.
    """
    import datasets

    if str(path) == "pydoc:topics":
        from pydoc_data.topics import topics

        names = sorted(topics)
        return datasets.Dataset.from_dict({"topic": names, "text": [topics[name] for name in names]})
    hub = cached_dataset(path)
    if hub is not None:  # a Hugging Face dataset id in the local cache: its files, splits named as the Hub names them
        try:
            dataset = datasets.load_dataset(hub, split=split)
        except ValueError as error:
            raise DataError(f"dataset {path} (cached at {hub}): {str(error).splitlines()[0]}") from None
        return _checked(dataset, path, text_column)
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus {path} does not exist: not a local path, nor a Hugging Face dataset id in the local "
                        f"cache ({hub_cache_directory()})")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"saved dataset {path} has splits {list(dataset)}, not {split!r}; set the split")
            dataset = dataset[split]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in FORMATS) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path} holds no corpus file ({', '.join(FORMATS)})")
        empty = [p for p in files if p.stat().st_size == 0]
        if empty:
            raise DataError(f"corpus {empty[0]} is empty")
        kinds = {FORMATS.get(p.suffix) for p in files}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"corpus files must share one of the formats {', '.join(FORMATS)}; got "
                            f"{', '.join(sorted({p.suffix or '(no suffix)' for p in files}))}")
        kind = kinds.pop()
        try:
            with _quiet_logger("datasets"):  # its own error lines would come before ours
                dataset = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
        except Exception as error:  # noqa: BLE001 - a file datasets cannot read: find the line, or say what it said
            problem = _locate_problem(files, kind)
            cause = error.__cause__ or error.__context__ or error
            raise DataError(problem or f"cannot read corpus {path} as {kind}: "
                                       f"{' '.join(str(cause).split())[:300]}") from None
    return _checked(dataset, path, text_column)


def _checked(dataset, path, text_column: str):
    if text_column not in dataset.column_names:
        raise DataError(f"corpus {path} has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); "
                        f"set the text column")
    if len(dataset) == 0:
        raise DataError(f"corpus {path} is empty")
    return dataset


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)  # its modules' loggers inherit its level
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _locate_problem(files: list[Path], kind: str) -> str | None:
    """The first line of the corpus files that cannot be read as `kind`, in words (file, line, byte offset).

    Run only after datasets failed, so a good corpus is read once; streams line by line (no file in memory).
    """
    for file in files:
        if kind == "parquet":
            continue
        rows, offset = 0, 0
        with open(file, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    return (f"corpus {file}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                            f"{offset + error.start}); save the file as UTF-8")
                offset += len(raw)
                if not line.strip():
                    continue
                rows += 1
                if kind == "json":
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as error:
                        return f"corpus {file}:{number}: not valid JSON ({error.msg}); each line must be one JSON object"
        if kind == "csv" and rows <= 1:
            return f"corpus {file} has a header but no rows" if rows else f"corpus {file} is empty"
    return None


def cached_dataset(path) -> str | None:
    """The local snapshot of `path` when it names a Hugging Face dataset in the cache (and no local path), else None."""
    if not isinstance(path, str) or Path(path).exists() or not HUB_ID.fullmatch(path):
        return None
    return cached_hub_snapshot(path, "dataset")


def corpus_source(path, known: dict | None = None) -> dict:
    """What a corpus path holds, by content: {"sha256", "files"}, however the path is spelled.

    sha256 is over every file's name (relative to the corpus directory) and bytes, so a copied or
    moved corpus is the same corpus and an edited one is not. `files` lists each file's resolved
    path, size and modification time: when they equal those of `known` (an earlier result), its
    sha256 is reused instead of reading a large corpus again. `pydoc:topics` is hashed by its text.
    """
    if str(path) == "pydoc:topics":
        from pydoc_data.topics import topics

        return {"sha256": hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest(), "files": []}
    root = Path(cached_dataset(path) or path)
    if not root.exists():
        raise DataError(f"corpus {path} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if known and known.get("files") == stats and known.get("sha256"):
        return {"sha256": known["sha256"], "files": stats}
    digest = hashlib.sha256()
    for file in files:
        digest.update((file.relative_to(root).as_posix() if root.is_dir() else "").encode() + b"\0")
        digest.update(sha256_file(file).encode())
    return {"sha256": digest.hexdigest(), "files": stats}


@dataclass
class PackedCorpus:
    """Fixed-length training sequences and where each came from.

    tokens_NT: int32 token ids (a read-only memory map once saved); lengths_N: real tokens per
    sequence (the rest is padding); provenance[n]: the document pieces of sequence n.
    """

    tokens_NT: np.ndarray
    lengths_N: np.ndarray
    provenance: list[list[dict]]
    pad_token_id: int
    tokenizer_id: str
    corpus_id: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens_NT)

    @property
    def length(self) -> int:
        return self.tokens_NT.shape[1]

    def sequences(self) -> Iterator[np.ndarray]:
        """Each sequence's real tokens (for the shortlist index)."""
        for row, n in zip(self.tokens_NT, self.lengths_N):
            yield row[:n]

    def save(self, path, *, overwrite: bool = False) -> None:
        """tokens.bin (raw int32, N × T), provenance.jsonl, manifest.json with checksums; atomic."""
        with staged_directory(path, overwrite=overwrite, error=DataError) as tmp:
            np.ascontiguousarray(self.tokens_NT, dtype=np.int32).tofile(tmp / TOKENS_FILE)
            np.asarray(self.lengths_N, dtype=np.int32).tofile(tmp / LENGTHS_FILE)
            with open(tmp / PROVENANCE_FILE, "wb") as handle, open(tmp / OFFSETS_FILE, "wb") as offsets:
                for n, pieces in enumerate(self.provenance):
                    _write_provenance(handle, offsets, n, int(self.lengths_N[n]), pieces)
            self.corpus_id = _write_manifest(tmp, len(self), self.length, self.pad_token_id, self.tokenizer_id, self.meta)

    @classmethod
    def load(cls, path, *, tokenizer_id: str | None = None) -> "PackedCorpus":
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.exists():
            raise DataError(f"{path} is not a packed corpus (no {MANIFEST_FILE}); pack the corpus first")
        manifest = json.loads(manifest_path.read_text())
        for name, expected in manifest["checksums"].items():
            if not (path / name).exists() or sha256_file(path / name) != expected:
                raise DataError(f"{path / name} is missing or does not match its checksum; the corpus is corrupted, "
                                f"pack it again")
        if tokenizer_id is not None and tokenizer_id != manifest["tokenizer_id"]:
            raise DataError(f"corpus {path} was tokenized by another tokenizer ({manifest['tokenizer_id']}, this one "
                            f"is {tokenizer_id}); pack it again with this model's tokenizer")
        N, T = manifest["num_sequences"], manifest["length"]
        tokens = np.memmap(path / TOKENS_FILE, dtype=np.int32, mode="r", shape=(N, T))
        lengths = np.memmap(path / LENGTHS_FILE, dtype=np.int32, mode="r", shape=(N,))
        offsets = path / OFFSETS_FILE if OFFSETS_FILE in manifest["checksums"] else None  # older corpora: scanned
        return cls(tokens, lengths, ProvenanceFile(path / PROVENANCE_FILE, N, offsets), manifest["pad_token_id"],
                   manifest["tokenizer_id"], manifest["corpus_id"], manifest.get("meta", {}))


class ProvenanceFile(Sequence):
    """provenance.jsonl read on demand, each line found by its byte offset (a memory map of OFFSETS_FILE).

    A corpus of 10 million sequences would take gigabytes as Python lists of dicts; the query stage
    needs the provenance of its few dozen top sequences. A corpus packed before the offsets file
    existed has its offsets found by one scan and held in memory (8 bytes per sequence).
    """

    def __init__(self, path: Path, count: int, offsets: Path | None = None):
        self.path = Path(path)
        if offsets is not None:
            self.offsets = np.memmap(offsets, dtype=np.int64, mode="r", shape=(count,))
            return
        starts = [np.zeros(1, dtype=np.int64)]
        with open(self.path, "rb") as handle:
            offset = 0
            for chunk in iter(lambda: handle.read(READ_CHUNK_BYTES), b""):
                starts.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + (offset + 1))
                offset += len(chunk)
        self.offsets = np.concatenate(starts)[:count]
        if len(self.offsets) != count:
            raise DataError(f"{self.path} has {len(self.offsets)} lines for {count} sequences; pack the corpus again")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [self[i] for i in range(*n.indices(len(self)))]
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[n]))
            return json.loads(handle.readline())["pieces"]


def tokenizer_id(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return digest.hexdigest()[:16]


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def pack(documents: Iterable[tuple[str, str]], tokenizer, *, length: int = 512, add_eos: bool = True,
         separate_documents: bool = False, show_progress: bool = False, total: int | None = None) -> PackedCorpus:
    """Concatenate the documents (each followed by EOS) and cut the stream into `length`-token sequences.

    documents: (document id, text) pairs. Empty documents are skipped (their id appears nowhere).
    With `separate_documents`, every document starts a new sequence (its last one padded).
    Held in memory; `pack_to_disk` streams a corpus of any size to a directory instead.
    """
    rows, lengths, provenance = [], [], []
    for ids, real, pieces in _packed_rows(documents, tokenizer, length, add_eos, separate_documents, show_progress, total):
        rows.append(np.asarray(ids, dtype=np.int32)), lengths.append(real), provenance.append(pieces)
    tokens_NT = np.stack(rows)
    return PackedCorpus(tokens_NT, np.asarray(lengths, dtype=np.int64), provenance, pad_token_id(tokenizer),
                        tokenizer_id(tokenizer), corpus_hash(hashlib.sha256(tokens_NT.tobytes()).hexdigest(), *tokens_NT.shape))


def corpus_hash(tokens_sha256: str, num_sequences: int, length: int) -> str:
    """The corpus id: its tokens and its shape (the same token stream cut at another length is another corpus)."""
    return hashlib.sha256(f"{tokens_sha256}:{num_sequences}x{length}".encode()).hexdigest()[:16]


def pack_to_disk(documents: Iterable[tuple[str, str]], tokenizer, path, *, length: int = 512, add_eos: bool = True,
                 separate_documents: bool = False, overwrite: bool = False, show_progress: bool = False,
                 total: int | None = None, meta: dict | None = None) -> PackedCorpus:
    """`pack`, written row by row into the corpus directory `path` (atomic); memory stays one row."""
    with staged_directory(path, overwrite=overwrite, error=DataError) as tmp:
        count = 0
        with open(tmp / TOKENS_FILE, "wb") as tokens, open(tmp / LENGTHS_FILE, "wb") as lengths, \
                open(tmp / PROVENANCE_FILE, "wb") as prov, open(tmp / OFFSETS_FILE, "wb") as offsets:
            for ids, real, pieces in _packed_rows(documents, tokenizer, length, add_eos, separate_documents,
                                                  show_progress, total):
                tokens.write(np.asarray(ids, dtype=np.int32).tobytes())
                lengths.write(np.int32(real).tobytes())
                _write_provenance(prov, offsets, count, real, pieces)
                count += 1
        _write_manifest(tmp, count, length, pad_token_id(tokenizer), tokenizer_id(tokenizer), meta or {})
    return PackedCorpus.load(path)


def _write_provenance(lines, offsets, n: int, length: int, pieces: list[dict]) -> None:
    """One provenance line (binary file), its byte offset appended to the offsets file."""
    offsets.write(np.int64(lines.tell()).tobytes())
    lines.write((json.dumps({"sequence": n, "length": length, "pieces": pieces}) + "\n").encode())


def _write_manifest(directory: Path, count: int, length: int, pad_id: int, tokenizer_hash: str, meta: dict) -> str:
    names = (TOKENS_FILE, LENGTHS_FILE, PROVENANCE_FILE, OFFSETS_FILE)
    checksums = {name: sha256_file(directory / name) for name in names}
    corpus_id = corpus_hash(checksums[TOKENS_FILE], count, length)
    manifest = {"kind": "ekfac_influence.corpus", "num_sequences": count, "length": length, "pad_token_id": pad_id,
                "tokenizer_id": tokenizer_hash, "corpus_id": corpus_id, "checksums": checksums, "meta": meta}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return corpus_id


def _packed_rows(documents, tokenizer, length: int, add_eos: bool, separate: bool, show_progress: bool,
                 total: int | None):
    """Yield (ids of one full-length row, its number of real tokens, its document pieces)."""
    if length < 2:
        raise DataError(f"sequence length must be at least 2 tokens, got {length}")
    eos = tokenizer.eos_token_id if add_eos else None
    buffer: list[int] = []
    pieces: list[dict] = []  # pieces of the sequence being filled
    produced = False
    for row, (doc_id, text) in enumerate(tqdm(documents, desc="packing", total=total, disable=not show_progress)):
        if not text:
            continue
        ids, offsets = _encode_document(tokenizer, text)
        if eos is not None:
            ids, offsets = ids + [eos], offsets + [(len(text), len(text))]
        start = 0
        while start < len(ids):
            take = min(length - len(buffer), len(ids) - start)
            span = offsets[start : start + take]
            pieces.append({"doc": doc_id, "row": row, "token_span": [len(buffer), len(buffer) + take],
                           "char_span": [int(span[0][0]), int(span[-1][1])]})
            buffer.extend(ids[start : start + take])
            start += take
            if len(buffer) == length:
                yield buffer, length, pieces
                buffer, pieces, produced = [], [], True
        if separate and buffer:
            yield buffer + [pad_token_id(tokenizer)] * (length - len(buffer)), len(buffer), pieces
            buffer, pieces, produced = [], [], True
    if buffer:
        yield buffer + [pad_token_id(tokenizer)] * (length - len(buffer)), len(buffer), pieces
    elif not produced:
        raise DataError("the corpus has no text: every document is empty")


def dataset_documents(dataset, *, text_column: str = "text", id_column: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) per row of a `datasets.Dataset`; the id is `id_column`'s value or the row number."""
    if id_column is not None and id_column not in dataset.column_names:
        raise DataError(f"corpus has no id column {id_column!r} (columns: {', '.join(dataset.column_names)})")
    records = iter(dataset)
    for row in itertools.count():
        try:
            record = next(records)
        except StopIteration:
            return
        except UnicodeDecodeError:  # Arrow keeps a JSON string's bytes as they were; decoding them fails only here
            raise UndecodableText(f"document {row} holds bytes that are not UTF-8; save the corpus as UTF-8") from None
        text = record[text_column]
        yield (str(record[id_column]) if id_column else str(row)), ("" if text is None else str(text))


class UndecodableText(DataError):
    """A corpus document's bytes are not UTF-8 (found while reading it; `locate_corpus_problem` says where)."""


def locate_corpus_problem(path) -> str | None:
    """The first line of a corpus file (JSONL, text, CSV) that cannot be read, in words; None if none is found."""
    root = Path(path)
    if not root.exists():  # pydoc:topics, a Hugging Face id
        return None
    files = sorted(p for p in root.iterdir() if p.suffix in FORMATS) if root.is_dir() else [root]
    kinds = {FORMATS.get(p.suffix) for p in files}
    return _locate_problem(files, kinds.pop()) if len(kinds) == 1 and None not in kinds else None


def _encode_document(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids with each token's character span; spans are estimated when the tokenizer is slow."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    ids = tokenizer(text)["input_ids"]
    return list(ids), [(0, len(text))] * len(ids)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a packed corpus as batches for a `DataLoader`: input_ids, attention_mask, sequence index."""

    def __init__(self, corpus: PackedCorpus, indices: Iterable[int] | None = None):
        self.corpus = corpus
        self.indices = np.arange(len(corpus)) if indices is None else np.asarray(list(indices), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        n = int(self.indices[i])
        ids = torch.from_numpy(np.array(self.corpus.tokens_NT[n], dtype=np.int64))
        mask = (torch.arange(len(ids)) < int(self.corpus.lengths_N[n])).long()
        return {"input_ids": ids, "attention_mask": mask, "sequence": torch.tensor(n)}


def training_batches(corpus: PackedCorpus, batch_size: int = 8, *, indices: Iterable[int] | None = None,
                     num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The packed corpus as `train_batches` for fit_factors, compute_scores and self_influence.

    A re-iterable DataLoader of {"input_ids" [B, T], "attention_mask" [B, T], "sequence" [B]} in
    corpus order (or the order of `indices`), which CausalLMObjective reads: the loss is over real
    tokens only. This is how the run directory's stages feed the engine:

        corpus = PackedCorpus.load("runs/mine/corpus")
        factors = fit_factors(model, training_batches(corpus, 8), CausalLMObjective(), FactorConfig())
        result = compute_scores(model, factors, query_batches(tokenizer, [("prompt", " completion")]),
                                training_batches(corpus, 8), CausalLMObjective(), ScoreConfig())
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    return torch.utils.data.DataLoader(PackedDataset(corpus, indices), batch_size=batch_size, num_workers=num_workers,
                                       shuffle=False)
