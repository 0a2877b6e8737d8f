"""Bad input never costs a user their run: one table of mistakes, each tested end to end through `main`.

Every case prepares the tiny project of test_cli (a model directory, corpus.jsonl, queries.jsonl,
run.yaml), in the state the case needs (nothing run yet, factors fitted, index built, queries answered
and exported: built once per module and copied per case), applies its breakage, snapshots the whole
project directory (every path and every file's bytes), runs `ekfac_influence.cli.main(argv)` in
process, and asserts:

- the exit status (2 for a user's mistake; 130 for an interruption);
- stderr is exactly one line, "ekfac-influence <command>: error: ...", matching the case's pattern
  (what went wrong, where, and how to fix it), with no traceback;
- the project directory, run directory included, is unchanged: no file added, removed or modified,
  no partial stage directory left behind, and a run directory that did not exist still does not
  (a case that may leave something names it in `may_create`, with the reason).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
import torch

from ekfac_influence.cli import main

RUN = "runs/tiny"  # the run directory of make_project's run.yaml
LONG_PROMPT = " ".join(["assert"] * 500)  # far beyond the tiny model's context of 64 positions


# ----------------------------------------------------------------------------- the project, in four states


def _save_model(path: Path, tokenizer, *, vocab_size: int | None = None, seed: int = 0) -> None:
    """A tiny Llama like make_project's (same config and seed unless told), saved with `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _make_base(root: Path) -> None:
    """make_project's files plus the other models and files some mistakes need."""
    from transformers import AutoModelForCausalLM

    from conftest import bpe_tokenizer
    from test_cli import make_project

    make_project(root)
    tokenizer = bpe_tokenizer()
    _save_model(root / "model_other", tokenizer, seed=1)  # same architecture and tokenizer, other weights
    _save_model(root / "model_small_vocab", tokenizer, vocab_size=100)  # 300-token tokenizer, 100-row embedding
    _save_model(root / "model_other_tokenizer", bpe_tokenizer(300, 20))  # make_project's weights, another tokenizer
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(root / "model_nan")
    tokenizer.save_pretrained(root / "model_nan")
    (root / "notes.txt").write_text("a plain file, not a directory\n")


def _run_main(root: Path, argv: list[str]) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(argv) == 0, f"preparing {argv} failed"
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """{state: directory}: project (nothing run), fitted, indexed (fit + index), queried (+ query + export)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars ignore --quiet (see the report)
    datasets.disable_progress_bars()
    base = tmp_path_factory.mktemp("validation")
    made = {"project": base / "project"}
    made["project"].mkdir()
    _make_base(made["project"])
    previous = "project"
    for state, stages in (("fitted", ["fit"]), ("indexed", ["index"]), ("queried", ["query", "export"])):
        made[state] = base / state
        shutil.copytree(made[previous], made[state], symlinks=True)
        for stage in stages:
            _run_main(made[state], [stage, "--config", "run.yaml", "--quiet"])
        previous = state
    yield made
    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()


# ----------------------------------------------------------------------------- breakages (run in the project)


def write(name: str, text: str):
    def setup(root: Path, monkeypatch) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return setup


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def append_to_config(text: str):
    def setup(root: Path, monkeypatch) -> None:
        with open(root / "run.yaml", "a") as handle:
            handle.write(text)
    return setup


def model_copy_without(*patterns: str):
    def setup(root: Path, monkeypatch) -> None:
        shutil.copytree(root / "model", root / "model_broken")
        for pattern in patterns:
            for path in (root / "model_broken").glob(pattern):
                path.unlink()
    return setup


def mixed_corpus_directory(root: Path, monkeypatch) -> None:
    (root / "corpus_dir").mkdir()
    (root / "corpus_dir" / "a.jsonl").write_text(jsonl({"name": "a", "text": "Some text."}))
    (root / "corpus_dir" / "b.csv").write_text("name,text\nb,More text.\n")


def saved_dataset_dict(root: Path, monkeypatch) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"name": ["a"], "text": ["Some text."]})}) \
        .save_to_disk(str(root / "saved"))


def flip_factor_bytes(root: Path, monkeypatch) -> None:
    path = root / RUN / "factors" / "factors.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def nan_in_factors(root: Path, monkeypatch) -> None:
    """A NaN in one layer's eigenvalues, with a valid checksum: only a finiteness check can catch it."""
    from safetensors.torch import load_file, save_file

    from ekfac_influence.storage import sha256_file

    directory = root / RUN / "factors"
    tensors = load_file(str(directory / "factors.safetensors"))
    key = "model.layers.1.mlp.up_proj/lambda_OI"  # the corrected eigenvalues, which precondition every query
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = float("nan")
    save_file(tensors, str(directory / "factors.safetensors"))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["checksums"]["factors.safetensors"] = sha256_file(directory / "factors.safetensors")
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def index_of_another_corpus(root: Path, monkeypatch) -> None:
    """Replace the run's index by one built over the same documents packed into 16-token sequences."""
    assert main(["index", "--config", "run.yaml", "--quiet", "--run", "runs/other", "--corpus.length", "16"]) == 0
    shutil.rmtree(root / RUN / "index")
    shutil.move(root / "runs/other/index", root / RUN / "index")
    shutil.rmtree(root / "runs/other")


def disk_full_writing_factors(root: Path, monkeypatch) -> None:
    """Writing factors.safetensors of the new stage raises ENOSPC as a real write does (errno, message, no file
    name); the fit's checkpoints, written by the same function, still fit on the disk."""
    import ekfac_influence.storage as storage

    real = storage.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).name == "factors.safetensors":
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(storage, "save_file", save_file)


def disk_full_allocating_scores(root: Path, monkeypatch) -> None:
    """The scores file's blocks cannot be allocated (as posix_fallocate fails on a full disk), though the free
    space looked sufficient a moment before (another writer took it)."""
    def posix_fallocate(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", posix_fallocate)


def disk_too_small(free: int):
    """The file system reports `free` bytes free: a big write must be refused before it starts."""
    def setup(root: Path, monkeypatch) -> None:
        real = shutil.disk_usage

        def disk_usage(path):
            return real(path)._replace(free=free)
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return setup


def read_only_run_directory(root: Path, monkeypatch) -> None:
    """The run directory refuses every new entry, rename and removal, as a read-only mount does. (The tests run as
    root, where chmod stops nothing, so the file system calls refuse instead; reading still works.)"""
    import builtins
    import io

    run = str((root / RUN).resolve())

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        full = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))
        return full.startswith(run + os.sep)

    def refuse(path):
        raise PermissionError(13, "Permission denied", os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real):
        def call(path, *args, **kwargs):
            if inside(path) or (args and isinstance(args[0], (str, bytes, os.PathLike)) and inside(args[0])):
                refuse(path)
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def write_bytes(name: str, data: bytes):
    def setup(root: Path, monkeypatch) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return setup


def append_bytes_to_config(data: bytes):
    def setup(root: Path, monkeypatch) -> None:
        with open(root / "run.yaml", "ab") as handle:
            handle.write(data)
    return setup


def truncated_safetensors(root: Path, monkeypatch) -> None:
    """The model's weights cut short, as an interrupted copy leaves them."""
    shutil.copytree(root / "model", root / "model_broken")
    path = root / "model_broken" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def gguf_cut_to(keep: Callable[[int], int]):
    """The tiny model as a GGUF file (tiny.gguf), then cut to keep(size) bytes."""
    def setup(root: Path, monkeypatch) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from test_references import write_llama_gguf

        model = AutoModelForCausalLM.from_pretrained(root / "model")
        write_llama_gguf(model, AutoTokenizer.from_pretrained(root / "model"), root / "tiny.gguf")
        data = (root / "tiny.gguf").read_bytes()
        (root / "tiny.gguf").write_bytes(data[: keep(len(data))])
    return setup


def corrupt_run_manifest(root: Path, monkeypatch) -> None:
    path = root / RUN / "manifest.json"
    path.write_text(path.read_text()[:40])


def interrupt_the_fit(root: Path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("ekfac_influence.run.fit_factors", interrupted)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # command first; "--config run.yaml --quiet" follow it unless `config` is False
    message: str  # regular expression searched in the one stderr line
    state: str = "project"  # project, fitted, indexed or queried
    setup: Callable | None = None  # (project directory, monkeypatch): the breakage, run in the project directory
    code: int = 2
    prefix: str = "error:"  # the line starts with "ekfac-influence <command>: <prefix>"
    config: bool = True
    may_create: tuple[str, ...] = ()  # paths (and everything under them) the failed command may leave
    why: str = ""  # ... and why that is right

    def full_argv(self) -> list[str]:
        command, *rest = self.argv
        return [command, *(["--config", "run.yaml"] if self.config else []), "--quiet", *rest]


CASES = [
    # --- the config file and the options
    Case("config_file_missing", ("fit", "--config", "nope.yaml"), r"config file nope\.yaml does not exist",
         config=False),
    Case("config_invalid_yaml", ("fit",), r"run\.yaml.*not valid YAML.*line \d+",
         setup=append_to_config("model:\n  path: [model\n")),
    Case("config_not_a_mapping", ("fit",), r"run\.yaml.*expected a mapping of sections",
         setup=write("run.yaml", "- fit\n")),
    Case("config_section_not_a_mapping", ("fit",), r"section 'factors' must be a mapping",
         setup=append_to_config("factors: ekfac\n")),
    Case("config_unknown_section", ("fit",), r"unknown section 'qeury' \(did you mean query\?\)",
         setup=append_to_config("qeury:\n  rank: 3\n")),
    Case("config_unknown_key", ("fit",), r"unknown key factors\.dampnig \(did you mean factors\.damping\?\)",
         setup=append_to_config("factors:\n  dampnig: 0.1\n")),
    Case("option_unknown_key", ("fit", "--factors.dampnig", "0.1"),
         r"--factors\.dampnig.*did you mean --factors\.damping\?"),
    Case("option_completion_without_prompt", ("query", "--completion", " x"),
         r"--completion and --contrast need --prompt", state="fitted"),
    Case("query_rank_zero", ("query", "--query.rank", "0"), r"query\.rank: must be a positive integer or None, got 0"),
    Case("query_rank_not_a_number", ("query", "--query.rank", "many"), r"query\.rank.*'many'.*integer"),
    Case("query_candidates_unknown", ("query", "--query.candidates", "bm25"),
         r"--query\.candidates: invalid choice: 'bm25'.*shortlist"),
    Case("fit_batch_size_fraction", ("fit", "--fit.batch_size", "2.5"), r"fit\.batch_size.*2\.5.*integer"),
    Case("damping_zero", ("fit", "--factors.damping", "0"), r"factors\.damping: must be > 0, got 0"),
    Case("damping_negative", ("fit", "--factors.damping", "-0.5"), r"factors\.damping: must be > 0, got -0\.5"),
    Case("damping_not_a_number", ("fit", "--factors.damping", "small"), r"factors\.damping.*'small'.*number"),
    Case("damping_factor_negative", ("fit", "--factors.damping_factor", "-1"),
         r"factors\.damping_factor: must be > 0, got -1"),
    Case("strategy_unknown", ("fit", "--factors.strategy", "ekfca"),
         r"--factors\.strategy: invalid choice: 'ekfca'.*ekfac"),
    Case("corpus_length_one", ("fit", "--corpus.length", "1"), r"corpus\.length: must be at least 2, got 1"),
    Case("export_format_unknown", ("export", "--export.formats", "[pdf]"),
         r"export\.formats: \['pdf'\] not among jsonl, csv, html"),
    Case("queries_name_with_slash", ("query", "--queries.name", "a/b"),
         r"queries\.name: 'a/b' is not a usable directory name"),
    Case("model_dtype_int8", ("fit", "--model.dtype", "int8"), r"--model\.dtype: invalid choice: 'int8'.*float32"),
    Case("model_device_unknown", ("fit", "--model.device", "banana"), r"model\.device.*'banana'.*(cpu|cuda)"),
    Case("run_empty", ("fit", "--run", ""), r"run: must be a directory path"),
    Case("run_under_a_file", ("fit", "--run", "notes.txt/run"),
         r"(?=.*notes\.txt/run)(?=.*[Nn]ot a directory)(?=.*--run)"),
    Case("config_duplicate_section", ("fit",),
         r"config file run\.yaml: key 'query' appears twice \(lines \d+ and \d+\).*merge them",
         setup=append_to_config("query:\n  rank: 3\n")),
    Case("config_duplicate_key", ("fit",), r"config file run\.yaml: key 'damping' appears twice \(lines 3 and 4\)",
         setup=write("run.yaml", "run: runs/tiny\nfactors:\n  damping: 0.1\n  damping: 0.2\n")),
    Case("config_not_utf8", ("fit",), r"config file run\.yaml is not UTF-8 text: byte 0xff at offset \d+ \(line \d+\)",
         setup=append_bytes_to_config(b"# caf\xff\n")),
    Case("config_is_a_directory", ("fit", "--config", "confdir"), r"config file confdir is not a file", config=False,
         setup=lambda root, monkeypatch: (root / "confdir").mkdir()),
    Case("damping_infinite", ("fit", "--factors.damping", ".inf"), r"factors\.damping: must be a finite number, got inf"),
    Case("damping_nan_in_config", ("fit",), r"run\.yaml: factors\.damping: must be a finite number, got nan",
         setup=append_to_config("factors:\n  damping: .nan\n")),
    Case("damping_factor_infinite", ("fit", "--factors.damping_factor", ".inf"),
         r"factors\.damping_factor: must be a finite number, got inf"),
    Case("corpus_length_beyond_context", ("fit", "--corpus.length", "128"),
         r"corpus\.length: 128 tokens is longer than the model's context of 64 .*at most 64"),
    Case("index_corpus_length_beyond_context", ("index", "--corpus.length", "65"),
         r"corpus\.length: 65 tokens is longer than the model's context of 64"),
    # --- the model and its tokenizer
    Case("model_missing", ("fit", "--model.path", "no_model"),
         r"model no_model does not exist: not a local path, nor a Hugging Face id in the local cache"),
    Case("model_is_a_plain_file", ("fit", "--model.path", "notes.txt"), r"model notes\.txt is a file but not \.gguf"),
    Case("model_without_config", ("fit", "--model.path", "model_broken"), r"model_broken has no config\.json",
         setup=model_copy_without("config.json")),
    Case("model_without_weights", ("fit", "--model.path", "model_broken"),
         r"cannot load a causal LM from model_broken.*(safetensors|weights)",
         setup=model_copy_without("*.safetensors")),
    Case("model_without_tokenizer", ("fit", "--model.path", "model_broken"), r"model_broken.*tokenizer",
         setup=model_copy_without("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt")),
    Case("model_safetensors_truncated", ("fit", "--model.path", "model_broken"),
         r"model file model_broken/model\.safetensors is truncated or corrupted: its header announces \d+ bytes, the "
         r"file holds \d+", setup=truncated_safetensors),
    Case("gguf_header_cut", ("fit", "--model.path", "tiny.gguf"), r"model file tiny\.gguf is truncated or corrupted",
         setup=gguf_cut_to(lambda size: 210)),
    Case("gguf_truncated", ("fit", "--model.path", "tiny.gguf"), r"model file tiny\.gguf is truncated or corrupted",
         setup=gguf_cut_to(lambda size: size - 5000)),
    Case("gguf_wrong_magic", ("fit", "--model.path", "fake.gguf"), r"fake\.gguf is not a GGUF file",
         setup=write("fake.gguf", "not a model\n")),
    Case("tokenizer_larger_than_embedding", ("fit", "--model.path", "model_small_vocab"),
         r"tokenizer at model_small_vocab has 300 tokens but the model's embedding has 100"),
    Case("layer_pattern_matches_nothing", ("fit", "--factors.layers", "[nothing_here]"),
         r"layer pattern 'nothing_here' matches no Linear/Conv1D module; names look like: model\.layers"),
    Case("layer_pattern_not_a_regex", ("fit", "--factors.layers", "['mlp.(gate']"),
         r"factors\.layers.*'mlp\.\(gate'.*regular expression"),
    Case("exact_strategy_too_large", ("fit", "--factors.strategy", "exact", "--factors.max_exact_params", "10"),
         r"exceeds max_exact_params=10"),
    Case("non_finite_weight", ("fit", "--model.path", "model_nan"),
         r"(?=.*(NaN|non-finite))(?=.*model\.layers\.0\.mlp\.down_proj)(?=.*(batch 0|weight))",
         may_create=(f"{RUN}/corpus",), why="the packed corpus is a finished, reusable stage of the run"),
    # --- the corpus
    Case("corpus_missing", ("fit", "--corpus.path", "no_corpus.jsonl"), r"corpus no_corpus\.jsonl does not exist"),
    Case("corpus_without_text_column", ("fit", "--corpus.path", "bodies.jsonl"),
         r"corpus bodies\.jsonl has no column 'text' \(columns: .*body.*\)",
         setup=write("bodies.jsonl", jsonl({"name": "a", "body": "Some text."}))),
    Case("corpus_without_id_column", ("fit", "--corpus.id_column", "title"),
         r"no id column 'title' \(columns: .*name.*text"),
    Case("corpus_empty_file", ("fit", "--corpus.path", "empty.jsonl"), r"corpus empty\.jsonl is empty",
         setup=write("empty.jsonl", "")),
    Case("corpus_all_texts_empty", ("fit", "--corpus.path", "blank.jsonl"),
         r"blank\.jsonl.*no text.*every document is empty",
         setup=write("blank.jsonl", jsonl({"name": "a", "text": ""}, {"name": "b", "text": ""}))),
    Case("corpus_directory_of_mixed_formats", ("fit", "--corpus.path", "corpus_dir"),
         r"corpus files must share one of the formats .*; got \.csv, \.jsonl", setup=mixed_corpus_directory),
    Case("corpus_saved_without_the_split", ("fit", "--corpus.path", "saved", "--corpus.split", "test"),
         r"saved dataset saved has splits \['train'\], not 'test'", setup=saved_dataset_dict),
    Case("corpus_jsonl_line_not_json", ("fit", "--corpus.path", "bad.jsonl"),
         r"corpus bad\.jsonl:2: not valid JSON",
         setup=write("bad.jsonl", jsonl({"name": "a", "text": "Some text."}, '{"name": "b", "text": "cut', 
                                        {"name": "c", "text": "More."}))),
    Case("corpus_csv_header_only", ("fit", "--corpus.path", "head.csv"), r"corpus head\.csv has a header but no rows",
         setup=write("head.csv", "name,text\n")),
    Case("corpus_text_not_utf8", ("fit", "--corpus.path", "latin.txt", "--corpus.id_column", "null"),
         r"corpus latin\.txt:2: not UTF-8 text \(byte 0xe9 at offset 19\)",
         setup=write_bytes("latin.txt", b"Some plain text\ncaf\xe9 au lait\n")),
    Case("corpus_jsonl_not_utf8", ("fit", "--corpus.path", "latin.jsonl"),
         r"corpus latin\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset \d+\)",
         setup=write_bytes("latin.jsonl", b'{"name": "a", "text": "Some text."}\n{"name": "b", "text": "caf\xe9"}\n')),
    # --- queries
    Case("query_file_missing", ("query", "--queries.file", "nope.jsonl"), r"query file nope\.jsonl does not exist",
         state="fitted"),
    Case("query_file_is_a_directory", ("query", "--queries.file", "qdir"),
         r"qdir.*(is a directory|not a file).*queries\.file", state="fitted",
         setup=lambda root, monkeypatch: (root / "qdir").mkdir()),
    Case("query_file_empty", ("query",), r"query file queries\.jsonl holds no query", state="fitted",
         setup=write("queries.jsonl", "\n\n")),
    Case("query_malformed_json", ("query",), r"queries\.jsonl:2: not valid JSON", state="fitted",
         setup=write("queries.jsonl", jsonl({"prompt": "a", "completion": " b"}, '{"prompt": "c", "completion": '))),
    Case("query_without_prompt", ("query",), r"queries\.jsonl:1: each line must be an object with a \"prompt\"",
         state="fitted", setup=write("queries.jsonl", jsonl({"completion": " b"}))),
    Case("query_unknown_key", ("query",), r"queries\.jsonl:1: unknown key\(s\) answer; allowed: prompt, completion",
         state="fitted", setup=write("queries.jsonl", jsonl({"prompt": "a", "answer": " b"}))),
    Case("query_empty_prompt", ("query",), r"queries\.jsonl:1: .*the prompt is empty", state="fitted",
         setup=write("queries.jsonl", jsonl({"prompt": "  ", "completion": " b"}))),
    Case("query_empty_completion", ("query",), r"queries\.jsonl:1: .*the completion is empty", state="fitted",
         setup=write("queries.jsonl", jsonl({"prompt": "a", "completion": ""}))),
    Case("query_duplicate_ids", ("query",), r"queries\.jsonl: query ids repeat \(\['same'\]\)", state="fitted",
         setup=write("queries.jsonl", jsonl({"id": "same", "prompt": "a", "completion": " b"},
                                            {"id": "same", "prompt": "c", "completion": " d"}))),
    Case("query_prompt_a_number", ("query",), r"queries\.jsonl:1: .*the prompt must be text \(a string\), got 42",
         state="fitted", setup=write("queries.jsonl", jsonl({"prompt": 42, "completion": " b"}))),
    Case("query_contrast_is_the_completion", ("query",), r"queries\.jsonl:1: .*the contrast is the completion",
         state="fitted", setup=write("queries.jsonl", jsonl({"prompt": "a", "completion": " b", "contrast": " b"}))),
    Case("option_contrast_is_the_completion", ("query", "--prompt", "a", "--completion", " b", "--contrast", " b"),
         r"the contrast is the completion \(' b'\)", state="fitted"),
    Case("query_file_not_utf8", ("query",), r"query file queries\.jsonl is not UTF-8 text: byte 0xe9 at offset \d+",
         state="fitted", setup=write_bytes("queries.jsonl", b'{"prompt": "a", "completion": "caf\xe9"}\n')),
    Case("option_empty_prompt", ("query", "--prompt", "", "--completion", " x"), r"the prompt is empty",
         state="fitted"),
    Case("option_empty_completion", ("query", "--prompt", "The assert statement", "--completion", ""),
         r"the completion is empty", state="fitted"),
    Case("query_longer_than_context", ("query", "--prompt", LONG_PROMPT, "--completion", " x"),
         r"prompt \+ completion is \d+ tokens, longer than the model's context of 64", state="indexed"),
    Case("query_prompt_fills_context", ("query", "--prompt", LONG_PROMPT),
         r"the prompt is \d+ tokens, the model's context is 64; no room for a completion", state="indexed"),
    # --- stages out of order, and results of other runs
    Case("query_before_fit", ("query",), rf"{RUN}/factors does not exist: fit the factors first \(ekfac-influence fit"),
    Case("shortlist_before_index", ("query",), rf"{RUN}/index does not exist: build the shortlist index first",
         state="fitted"),
    Case("export_before_query", ("export",), rf"{RUN}/queries/first does not exist: answer queries first",
         state="fitted"),
    Case("query_set_exists", ("query",),
         rf"{RUN}/queries/first already holds results; pass --overwrite or choose another --queries\.name",
         state="queried"),
    Case("report_exists", ("export",), r"report\.jsonl.*already exists.*--overwrite", state="queried"),
    Case("refit_with_another_model", ("fit", "--model.path", "model_other"),
         rf"{RUN}/factors holds factors fitted for another model.*--overwrite", state="fitted"),
    Case("refit_with_other_layers", ("fit", "--factors.layers", "[down_proj]"), rf"{RUN}/factors.*layers.*--overwrite",
         state="fitted"),
    Case("refit_with_another_tokenizer", ("fit", "--model.path", "model_other_tokenizer"),
         rf"{RUN}/corpus was packed from another corpus: the tokenizer \(id [0-9a-f]+, packed with [0-9a-f]+\)\. "
         r"Pass --overwrite", state="fitted"),
    Case("refit_with_another_corpus_length", ("fit", "--corpus.length", "16"),
         rf"{RUN}/corpus was packed from another corpus: corpus\.length = \d+ \(now 16\)\. Pass --overwrite", state="fitted"),
    Case("query_with_another_model", ("query", "--model.path", "model_other", "--queries.name", "second"),
         r"factors were fitted for another model \(fingerprint [0-9a-f]+, this model's is [0-9a-f]+\)",
         state="queried"),
    Case("query_with_another_tokenizer", ("query", "--model.path", "model_other_tokenizer", "--queries.name", "second"),
         rf"corpus {RUN}/corpus was tokenized by another tokenizer", state="queried"),
    Case("factors_file_corrupted", ("query", "--queries.name", "second"),
         r"factors\.safetensors does not match the checksum.*corrupted.*ekfac-influence fit.*--overwrite",
         state="queried", setup=flip_factor_bytes),
    Case("factors_non_finite", ("query", "--queries.name", "second"),
         r"(?=.*(NaN|non-finite))(?=.*model\.layers\.1\.mlp\.up_proj)(?=.*fit)", state="queried",
         setup=nan_in_factors),
    Case("index_of_another_corpus", ("query", "--queries.name", "second"),
         rf"{RUN}/index.*(another corpus|built for corpus).*(ekfac-influence index|--overwrite)", state="queried",
         setup=index_of_another_corpus),
    Case("run_manifest_corrupted", ("query", "--queries.name", "second"),
         rf"{RUN}/manifest\.json is not valid JSON.*corrupted", state="queried", setup=corrupt_run_manifest),
    # --- the disk, and an interruption
    Case("disk_full_writing_factors", ("fit", "--overwrite", "--factors.strategy", "kfac"),
         rf"No space left on device.*{RUN}.*free", state="fitted", setup=disk_full_writing_factors,
         may_create=(f"{RUN}/factors.partial",), why="the fit's checkpoint is kept on purpose: the rerun resumes it"),
    Case("disk_full_writing_scores", ("query", "--queries.name", "second"),
         rf"No space left on device: the scores file of 2 queries × \d+ sequences needs [\d.]+ \w+, [\d.]+ \w+ free "
         rf"\({RUN}/queries/\.second\.partial/scores\.f32\); free some space",
         state="queried", setup=disk_full_allocating_scores, may_create=(f"{RUN}/queries/.second.partial",),
         why="the partial query set is kept on purpose: the rerun after freeing space resumes it"),
    Case("disk_too_small_for_scores", ("query", "--queries.name", "second"),
         rf"No space left on device: the scores file of 2 queries × \d+ sequences needs [\d.]+ \w+, 100 B free "
         rf"\({RUN}/queries\); free some space", state="queried", setup=disk_too_small(100)),
    Case("disk_too_small_for_factors", ("fit", "--overwrite", "--factors.strategy", "kfac"),
         rf"No space left on device: writing the factors needs [\d.]+ KiB, 100 B free \({RUN}\)", state="fitted",
         setup=disk_too_small(100), may_create=(f"{RUN}/factors.partial",),
         why="the fit's checkpoint is kept on purpose: the rerun resumes it"),
    Case("read_only_run_directory", ("fit", "--overwrite", "--factors.strategy", "kfac"),
         rf"Permission denied.*{RUN}.*writable", state="fitted", setup=read_only_run_directory),
    Case("interrupted_fit", ("fit", "--overwrite", "--factors.strategy", "kfac"),
         r"interrupted; finished stages are kept, rerun to go on", state="fitted", setup=interrupt_the_fit, code=130,
         prefix="interrupted"),
]


# ----------------------------------------------------------------------------- the test


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden ones included): a file's bytes, None for a directory."""
    return {str(p.relative_to(root)): (None if p.is_dir() and not p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def changes(before: dict, after: dict, allowed: tuple[str, ...]) -> list[str]:
    def excused(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") or a.startswith(path + "/") for a in allowed)

    added = [p for p in after if p not in before and not excused(p)]
    removed = [p for p in before if p not in after]
    modified = [p for p in before if p in after and before[p] != after[p]]
    return [f"{what}: {', '.join(paths[:8])}" for what, paths in (("added", added), ("removed", removed),
                                                                   ("modified", modified)) if paths]


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)
    assert all(case.why for case in CASES if case.may_create), "a case that may leave files says why"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, states, tmp_path, monkeypatch, capsys):
    root = tmp_path / "project"
    shutil.copytree(states[case.state], root, symlinks=True)
    monkeypatch.chdir(root)
    if case.setup is not None:
        case.setup(root, monkeypatch)
    before = snapshot(root)
    capsys.readouterr()

    try:
        code = main(case.full_argv())
        raised = None
    except SystemExit as exit_:  # argparse's own errors
        code, raised = exit_.code, None
    except BaseException:  # noqa: BLE001 - any other exception reaches the user as a traceback
        code, raised = None, traceback.format_exc()
    err = capsys.readouterr().err

    problems = []
    if raised is not None:
        problems.append("main raised (the user sees a traceback):\n" + "\n".join(raised.strip().splitlines()[-6:]))
    elif code != case.code:
        problems.append(f"exit status {code!r}, expected {case.code}")
    lines = err.strip().splitlines()
    command = case.argv[0]
    start = f"ekfac-influence {command}: {case.prefix}"
    if raised is None:
        if len(lines) != 1:
            problems.append(f"stderr has {len(lines)} lines, expected one:\n{err.strip()[-1500:]}")
        elif not lines[0].startswith(start):
            problems.append(f"stderr does not start with {start!r}: {lines[0][:500]!r}")
        if lines and not re.search(case.message, " ".join(lines)):
            problems.append(f"stderr does not match {case.message!r}: {err.strip()[-800:]!r}")
        if "Traceback" in err:
            problems.append("stderr holds a traceback")
    problems += changes(before, snapshot(root), case.may_create)
    if problems:
        pytest.fail(f"[{case.id}] {' '.join(case.full_argv())[:200]}\n" + "\n".join(problems), pytrace=False)


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    from ekfac_influence.run_config import load_run_config, save_run_config

    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "corpus.jsonl").write_text('{"text": "a"}\n')
    (project / "configs").mkdir()
    (project / "configs" / "run.yaml").write_text("run: ../runs/x\nmodel: {path: ../model}\ncorpus: {path: ../corpus.jsonl}\n"
                                                  "queries: {file: org/not-here.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    config = load_run_config("project/configs/run.yaml", [("corpus.length", "16")])
    assert config.run == "project/runs/x" and config.model.path == "project/model"
    assert config.corpus.path == "project/corpus.jsonl" and config.corpus.length == 16
    assert config.queries.file == "org/not-here.jsonl"  # not there: taken as written (a path from here, or an id)
    # on the command line, paths are relative to the working directory
    assert load_run_config("project/configs/run.yaml", [("run", "elsewhere")]).run == "elsewhere"
    # the copy a stage saves in the run directory: run is ".", paths outside it absolute, inside it relative
    (project / "runs" / "x" / "data").mkdir(parents=True)
    (project / "runs" / "x" / "data" / "q.jsonl").write_text("{}\n")
    saved = project / "runs" / "x" / "config.fit.yaml"
    saved.write_text(save_run_config(load_run_config("project/configs/run.yaml",
                                                     [("queries.file", "project/runs/x/data/q.jsonl")])))
    values = yaml.safe_load(saved.read_text())
    assert values["run"] == "." and values["model"]["path"] == str((project / "model").resolve())
    assert values["queries"]["file"] == "data/q.jsonl"
    again = load_run_config("project/runs/x/config.fit.yaml")
    assert again.run == "project/runs/x" and again.queries.file == "project/runs/x/data/q.jsonl"
    assert again.model.path == str((project / "model").resolve())


def test_a_config_path_that_is_a_directory_is_refused_in_one_line(tmp_path):
    from ekfac_influence.config import ConfigError
    from ekfac_influence.run_config import load_run_config

    with pytest.raises(ConfigError, match="is not a file"):
        load_run_config(str(tmp_path))
