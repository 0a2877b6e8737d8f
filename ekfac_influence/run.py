"""The stages of a run directory (docs/design.md §4): fit, index, query, export, self-influence, evaluate.

    runs/<name>/
      manifest.json        model fingerprint, tokenizer, tracked layers, package versions, stages done
      config.<stage>.yaml  the resolved config each stage ran with
      corpus/              packed training sequences + provenance (made by the first stage that needs it)
      factors/  index/  queries/<set>/  self_influence/
      evaluation/          evaluation.json, evaluation.html; lds/: the reference and retrained models' measurements

Every stage checks what it needs before any long work, reuses a finished stage that matches its
config (a finished stage is never recomputed unless asked), and refuses to replace a different one
without `overwrite`. Under `accelerate launch` every process runs the stage; the main one writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
import webbrowser
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .audit import self_influence as compute_self_influence
from .audit_report import COSINE_SAMPLE, VALUES_FILE, group_record, sequence_record, write_audit
from .config import ConfigError, to_dict
from .data import (DataError, PackedCorpus, UndecodableText, corpus_source, dataset_documents, load_corpus,
                   locate_corpus_problem, pack_to_disk, training_batches)
from .data import tokenizer_id as tokenizer_hash
from .evaluate import evaluate_lm
from .factors import Factors, check_factors_match
from .files import ensure_space
from .fit import STEP_SECONDS, check_exact_size, fit_factors
from .model import (ModelLoadError, context_length, fingerprint, load_causal_lm, load_tokenizer, model_context,
                    select_layers)
from .objectives import CausalLMObjective
from .plan import FitPlan, plan_fit
from .query import query_influence
from .query_inputs import read_queries
from .report import export_report
from .report_data import read_manifest, read_records
from .results import query_set_directory
from .run_config import RunConfig, save_run_config
from .shortlist import ShortlistError, ShortlistIndex
from .similarity import joint_self_influence, near_duplicate_groups, sketched_cosines
from .storage import PassCheckpoint, StorageError, atomic_write_text, stage_lock
from .storage import read_manifest as read_stage_manifest
from .variants import variants_from_config
from .version import __version__

CORPUS, FACTORS, INDEX, QUERIES = "corpus", "factors", "index", "queries"
SELF_INFLUENCE, EVALUATION = "self_influence", "evaluation"


# ----------------------------------------------------------------------------- shared steps


def load_model(config: RunConfig):
    model, tokenizer = load_causal_lm(config.model.path, dtype=config.model.dtype,
                                      device=str(distributed.device(config.model.device)))
    if config.model.fsdp:
        model = distributed.shard_model(model)
    return model, tokenizer


def prepare_corpus(config: RunConfig, tokenizer, *, overwrite: bool = False, show_progress: bool = True) -> PackedCorpus:
    """The run's packed corpus: reused when packed from the same content, settings and tokenizer, else packed now.

    A corpus is known by its content (data.corpus_source), not by how its path is spelled: a moved
    or copied corpus or run directory is the same. When the source is gone, a packed corpus whose
    settings and tokenizer match is used as it is.
    """
    path = Path(config.run) / CORPUS
    source = None
    if distributed.broadcast_object(path.exists()):  # the main process's answer: it may be packing the corpus meanwhile
        corpus = PackedCorpus.load(path)
        known = corpus.meta.get("source")
        if config.corpus.path and (config.corpus.path == "pydoc:topics" or Path(config.corpus.path).exists()):
            source = corpus_source(config.corpus.path, known)
        differences = _corpus_differences(corpus, config, tokenizer, source)
        if not differences:
            if source is None:
                distributed.print0(f"note: corpus {config.corpus.path or '(none given)'} is not at hand; using the "
                                   f"corpus packed in {path}")
            return corpus
        if not overwrite:
            raise StorageError(f"{path} was packed from another corpus: {'; '.join(differences)}. Pass --overwrite to "
                               f"pack it again (the factors, index and queries of this run then no longer apply) or "
                               f"use another run directory")
    if distributed.is_main():
        if not config.corpus.path:
            raise DataError("no corpus given: set corpus.path (a JSONL, text, parquet or CSV file, or a saved dataset)")
        source = source or corpus_source(config.corpus.path)
        dataset = load_corpus(config.corpus.path, text_column=config.corpus.text_column, split=config.corpus.split)
        if config.corpus.id_column is not None and config.corpus.id_column not in dataset.column_names:
            raise DataError(f"corpus {config.corpus.path} has no id column {config.corpus.id_column!r} (columns: "
                            f"{', '.join(dataset.column_names)}); set corpus.id_column")
        if config.corpus.max_documents is not None:
            dataset = dataset.select(range(min(len(dataset), config.corpus.max_documents)))
        documents = dataset_documents(dataset, text_column=config.corpus.text_column, id_column=config.corpus.id_column)
        distributed.print0(f"packing {len(dataset)} documents of {config.corpus.path} into sequences of "
                           f"{config.corpus.length} tokens")
        try:
            with stage_lock(config.run, CORPUS, command="packing the corpus"):  # fit and index may both pack it
                pack_to_disk(documents, tokenizer, path, length=config.corpus.length, overwrite=True,
                             separate_documents=config.corpus.separate_documents, show_progress=show_progress,
                             total=len(dataset), meta={"corpus": to_dict(config.corpus), "source": source})
        except UndecodableText as error:
            raise DataError(locate_corpus_problem(config.corpus.path) or f"corpus {config.corpus.path}: {error}") from None
        except DataError as error:
            raise DataError(f"corpus {config.corpus.path}: {error}") from None
    distributed.barrier()
    return PackedCorpus.load(path)


def _corpus_differences(corpus: PackedCorpus, config: RunConfig, tokenizer, source: dict | None) -> list[str]:
    """What differs between a packed corpus and the one `config` asks for, in words (path spelling is not a difference)."""
    packed, wanted = dict(corpus.meta.get("corpus") or {}), to_dict(config.corpus)
    found = [f"corpus.{key} = {packed.get(key)!r} (now {value!r})" for key, value in wanted.items()
             if key != "path" and packed.get(key) != value]
    known = corpus.meta.get("source")
    if known is None:  # packed before corpora were known by content: the path as written is all there is
        if packed.get("path") != wanted["path"]:
            found.append(f"corpus.path = {packed.get('path')!r} (now {wanted['path']!r})")
    elif source is not None and source["sha256"] != known.get("sha256"):
        found.append(f"the content of {config.corpus.path} (sha256 {source['sha256'][:12]}, packed from "
                     f"{known.get('sha256', '?')[:12]}: the corpus changed or another one is named)")
    if corpus.tokenizer_id != tokenizer_hash(tokenizer):
        found.append(f"the tokenizer (id {tokenizer_hash(tokenizer)}, packed with {corpus.tokenizer_id})")
    return found


def check_corpus_length(config: RunConfig, context: int | None) -> None:
    """Refuse training sequences longer than the model's context: positions past it were never trained (a rotary
    model scores them without complaint, a learned-position one fails mid-pass)."""
    if context and config.corpus.length > context:
        raise ConfigError(f"corpus.length: {config.corpus.length} tokens is longer than the model's context of "
                          f"{context} (max_position_embeddings of {config.model.path}); set corpus.length to at most "
                          f"{context}")


def training_loader(corpus: PackedCorpus, batch_size: int, num_workers: int):
    return training_batches(corpus, batch_size, num_workers=num_workers)


def corpus_facts(corpus: PackedCorpus) -> dict:
    """What a stage was computed from: the packed corpus's id, its source's content sha256, its size."""
    return {"corpus_id": corpus.corpus_id, "source_sha256": (corpus.meta.get("source") or {}).get("sha256"),
            "num_sequences": len(corpus)}


def record_stage(config: RunConfig, stage: str, facts: dict, *, corpus: PackedCorpus | None = None) -> None:
    """Save the resolved config of `stage` and merge `facts` into the run's manifest (main process only).

    corpus: the packed corpus the stage read, recorded under stages.<stage>.corpus (corpus_facts).
    """
    if not distributed.is_main():
        return
    run = Path(config.run)
    manifest = read_run_manifest(run)
    atomic_write_text(run / f"config.{stage}.yaml", save_run_config(config))
    path = run / "manifest.json"
    manifest.update(facts)
    manifest.setdefault("stages", {})[stage] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "version": __version__,
                                                "torch": torch.__version__}
    if corpus is not None:
        manifest["stages"][stage]["corpus"] = corpus_facts(corpus)
    atomic_write_text(path, json.dumps(manifest, indent=2))


def read_run_manifest(run: Path) -> dict:
    """The run's manifest.json ({"kind": ...} for a new run); a damaged one is named before any work, not after."""
    path = Path(run) / "manifest.json"
    if not path.exists():
        return {"kind": "ekfac_influence.run"}
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StorageError(f"{path} is not valid JSON ({error}); the file is corrupted: restore it, or remove it (the "
                           f"stages' own manifests stay) and rerun") from None
    if not isinstance(manifest, dict):
        raise StorageError(f"{path} is not a run manifest (a JSON object); the file is corrupted: restore or remove it")
    return manifest


def check_writable(path) -> None:
    """Fail now, not after hours of work, when the run directory cannot be written (creates nothing)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(path))
    with tempfile.TemporaryFile(dir=existing):
        pass


def note_factors_corpus(factors: Factors, corpus: PackedCorpus, config: RunConfig) -> None:
    """Say so when the factors were fitted on another corpus than the one scored (legal: G from a sample).

    delta_logp then divides by the sequences scored (query.train_size when set), not those fitted on.
    """
    fitted = factors.meta.get("corpus") or {}
    same = (fitted.get("corpus_id") == corpus.corpus_id if fitted.get("corpus_id")
            else factors.num_sequences == len(corpus))  # factors of a run before they recorded their corpus
    if not same:
        n = config.query.train_size or len(corpus)
        distributed.print0(f"note: the factors were fitted on {factors.num_sequences} sequences of another corpus "
                           f"(id {fitted.get('corpus_id', 'not recorded')}); scoring the {len(corpus)} sequences of "
                           f"{Path(config.run) / CORPUS} (id {corpus.corpus_id}) with them; "
                           f"delta_logp = score / {n}" + ("" if config.query.train_size else
                                                        " (set query.train_size to the training set's size)"))


def require(path: Path, what: str, command: str) -> None:
    if not path.exists():
        raise StorageError(f"{path} does not exist: {what} first (ekfac-influence {command}, with this run's config)")


def one_writer(stage: str):
    """Run the decorated stage holding the run directory's lock for `stage` (storage.stage_lock), on the main process.

    A second writer of the same stage in the same run directory is refused in one line naming the
    holder; readers (export, show) take no lock. `query` locks its query set (query.<name>).
    """
    def wrap(function):
        @functools.wraps(function)
        def locked(config: RunConfig, *args, **kwargs):
            if not distributed.is_main():
                return function(config, *args, **kwargs)
            name = f"{stage}.{config.queries.name}" if stage == "query" else stage
            with stage_lock(config.run, name, command=f"ekfac-influence {stage.replace('_', '-')}"):
                return function(config, *args, **kwargs)
        return locked
    return wrap


# ----------------------------------------------------------------------------- stages


@one_writer("fit")
def fit(config: RunConfig, *, overwrite: bool = False, show_progress: bool = True) -> Factors:
    """Pack the corpus (once) and fit the curvature factors of the model's tracked layers."""
    check_writable(config.run)
    read_run_manifest(Path(config.run))  # a damaged manifest is found now, not after the work
    model, tokenizer = load_model(config)
    layers = select_layers(model, config.factors.layers)  # a pattern that matches nothing fails here, before work
    check_exact_size(layers, config.factors)
    check_corpus_length(config, context_length(model, default=0))
    corpus = prepare_corpus(config, tokenizer, overwrite=overwrite, show_progress=show_progress)
    path = Path(config.run) / FACTORS
    if path.exists() and not overwrite:
        existing = Factors.load(path, shard=(distributed.rank(), distributed.world()))
        differences = _differences(existing, model, layers, config, corpus)
        if not differences:
            distributed.print0(f"{path}: factors already fitted with this model and config; nothing to do "
                               f"(--overwrite refits)")
            return existing
        raise StorageError(f"{path} holds factors fitted for {'; '.join(differences)}; pass --overwrite to replace "
                           f"them or use another run directory")
    distributed.print0(f"fitting {config.factors.strategy} factors of {len(layers)} layers on {len(corpus)} sequences")
    started = time.time()
    key = {"fingerprint": fingerprint(model, layers), "factors": to_dict(config.factors), "corpus_id": corpus.corpus_id,
           "batch_size": config.fit.batch_size}
    checkpoint = PassCheckpoint(Path(config.run) / "factors.partial", key, every_batches=config.fit.checkpoint_batches,
                                every_seconds=config.fit.checkpoint_seconds)
    factors = fit_factors(model, training_loader(corpus, config.fit.batch_size, config.fit.num_workers),
                          CausalLMObjective(), config.factors, show_progress=show_progress, checkpoint=checkpoint)
    factors.meta = dict(factors.meta, corpus=corpus_facts(corpus),  # what the factors were fitted on, and how long
                        seconds={step: round(value, 3) for step, value in STEP_SECONDS.items()})
    if factors.owners is not None or distributed.is_main():  # sharded: every process writes its shard
        tensors = [t for layer in factors.layers for t in layer.tensors().values()] + [factors.ggn_PP]
        ensure_space(path.parent, sum(t.numel() * t.element_size() for t in tensors if t is not None), "writing the factors")
        factors.save(path, overwrite=overwrite)
    distributed.barrier()
    if distributed.is_main():
        checkpoint.clear()
    record_stage(config, "fit", {"fingerprint": factors.fingerprint, "tokenizer_id": corpus.tokenizer_id,
                                 "corpus_id": corpus.corpus_id, "layers": factors.layer_names,
                                 "num_sequences": len(corpus)}, corpus=corpus)
    distributed.print0(f"factors written to {path} ({time.time() - started:.0f} s)")
    return factors


def fit_dry_run(config: RunConfig, *, world: int | None = None, device_memory: float | None = None) -> FitPlan:
    """Print the bytes per process a kfac/ekfac fit of this config would hold (docs/scaling.md), fitting nothing.

    The model is built from its config on the meta device: no weights are read, so any size plans
    on any machine. world: the number of processes (default: this launch's).
    """
    world = distributed.world() if world is None else world
    model = meta_model(config.model.path, config.model.dtype)
    layers = select_layers(model, config.factors.layers)
    plan = plan_fit(model, layers, config.factors, world, model_dtype=config.model.dtype,
                    batch_size=config.fit.batch_size, length=config.corpus.length, fsdp=config.model.fsdp)
    distributed.print0(f"dry run: {config.factors.strategy} factors of {config.model.path}, "
                       f"accumulate {config.factors.accumulate_dtype}, stored {config.factors.factor_dtype}, "
                       f"batches of {config.fit.batch_size} × {config.corpus.length} tokens, model {config.model.dtype}"
                       f"{' (FSDP)' if config.model.fsdp else ''}")
    distributed.print0(plan.table(device_memory))
    return plan


def meta_model(path: str, dtype: str = "float32") -> torch.nn.Module:
    """The causal LM of `path` (a save_pretrained directory or a cached Hub id) built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the model's config.json at {path!r} for a dry run ({error})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))


def _differences(existing: Factors, model, layers, config: RunConfig, corpus: PackedCorpus) -> list[str]:
    """What differs between stored factors and the ones this config would fit, in words."""
    found = []
    if existing.layer_names != [l.name for l in layers]:
        found.append(f"layers {existing.layer_names[:3]}{'...' if len(existing.layer_names) > 3 else ''}, not the "
                     f"{len(layers)} layers asked for")
    elif existing.fingerprint != fingerprint(model, layers):
        found.append(f"another model (fingerprint {existing.fingerprint}, this one is {fingerprint(model, layers)})")
    old, new = to_dict(existing.config), to_dict(config.factors)
    changed = [f"factors.{key} = {old.get(key)!r} (now {value!r})" for key, value in new.items() if old.get(key) != value]
    found += changed
    if existing.num_sequences != len(corpus):
        found.append(f"{existing.num_sequences} training sequences (the corpus now has {len(corpus)})")
    return found


@one_writer("index")
def index(config: RunConfig, *, overwrite: bool = False, show_progress: bool = True):
    """Build the shortlist index over the run's packed corpus (packing it first if needed)."""
    check_writable(config.run)
    read_run_manifest(Path(config.run))  # a damaged manifest is found now, not after the work
    tokenizer = load_tokenizer(config.model.path)
    check_corpus_length(config, model_context(config.model.path))
    corpus = prepare_corpus(config, tokenizer, overwrite=overwrite, show_progress=show_progress)
    path = Path(config.run) / INDEX
    if distributed.broadcast_object(path.exists()) and not overwrite:  # the main process may be building it meanwhile
        try:
            existing = ShortlistIndex.load(path, tokenizer_id=corpus.tokenizer_id, corpus_id=corpus.corpus_id)
        except ShortlistError as error:
            raise StorageError(f"{error} (or pass --overwrite)") from None
        if existing.weighting == config.index.weighting:
            distributed.print0(f"{path}: index already built for this corpus; nothing to do (--overwrite rebuilds)")
            return existing
        raise StorageError(f"{path} holds a {existing.weighting} index; pass --overwrite to rebuild it as {config.index.weighting}")
    built = None
    if distributed.is_main():
        started = time.time()
        built = ShortlistIndex.build(corpus.sequences(), weighting=config.index.weighting, k1=config.index.k1,
                                     chunk_size=config.index.chunk_size, vocab_size=len(tokenizer),
                                     tokenizer_id=corpus.tokenizer_id, corpus_id=corpus.corpus_id,
                                     show_progress=show_progress)
        built.save(path, overwrite=overwrite)
        print(f"index of {len(corpus)} sequences written to {path} ({time.time() - started:.1f} s)")
    distributed.barrier()
    record_stage(config, "index", {"tokenizer_id": corpus.tokenizer_id, "corpus_id": corpus.corpus_id}, corpus=corpus)
    return built if built is not None else ShortlistIndex.load(path)


@one_writer("query")
def query(config: RunConfig, queries: list | None = None, *, overwrite: bool = False, show_progress: bool = True,
          report: bool = False):
    """Answer the queries (a list, or config.queries.file) and keep the results in <run>/queries/<name>/.

    report: write the review report too (export's formats), as the CLI does for a --prompt question.
    """
    run = Path(config.run)
    check_writable(run)
    read_run_manifest(run)  # a damaged manifest is found now, not after the work
    require(run / FACTORS, "fit the factors", "fit")
    if queries is None:
        if not config.queries.file:
            raise DataError("no query given: set queries.file (JSONL of prompt/completion) or pass --prompt")
        queries = read_queries(config.queries.file)
    out = run / QUERIES / config.queries.name
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already holds results; pass --overwrite or choose another --queries.name")
    index_ = None
    if config.query.candidates == "shortlist":
        require(run / INDEX, "build the shortlist index", "index")
    model, tokenizer = load_model(config)
    require(run / CORPUS, "pack the corpus", "fit")
    corpus = PackedCorpus.load(run / CORPUS, tokenizer_id=tokenizer_hash(tokenizer))
    factors = Factors.load(run / FACTORS, shard=_query_shard(run / FACTORS, config))
    if config.query.candidates == "shortlist":
        index_ = ShortlistIndex.load(run / INDEX, tokenizer_id=corpus.tokenizer_id, corpus_id=corpus.corpus_id)
    note_factors_corpus(factors, corpus, config)
    distributed.print0(f"answering {len(queries)} queries over {len(corpus)} training sequences "
                       f"({config.query.candidates}{', k=' + str(config.query.shortlist_k) if index_ else ''})")
    audited = _audit_values(run, factors, corpus) if config.query.normalize != "none" else None
    results = query_influence(model, tokenizer, factors, corpus, queries, config.query, index=index_, out=out,
                              overwrite=overwrite, show_progress=show_progress, self_influence_N=audited)
    record_stage(config, "query", {}, corpus=corpus)
    if distributed.is_main():
        print_summary(results.records)
        print(f"results in {out}/ (topk.jsonl, scores.f32)")
    if report:
        export(config, overwrite=overwrite)
    elif distributed.is_main():
        print(f"report: ekfac-influence export --config {run / 'config.query.yaml'}")
    return results


def _audit_values(run: Path, factors: Factors, corpus: PackedCorpus) -> np.ndarray | None:
    """s(n) of every sequence from the run's self-influence audit, when it was made of these factors and this corpus
    (the normalised ranking then rescores the scan's best normalised candidates); None, with a note, otherwise."""
    audit = run / SELF_INFLUENCE
    manifest = read_stage_manifest(audit) if (audit / "manifest.json").exists() else {}
    same = (manifest.get("fingerprint") == factors.fingerprint and manifest.get("corpus_id") == corpus.corpus_id
            and manifest.get("num_sequences") == len(corpus))  # with a tolerance too: s(n) only chooses the pool
    if not same:
        why = "none" if not manifest else "it is of other factors or another corpus"
        distributed.print0(f"note: normalised rankings rescore the scan's best raw candidates; a self-influence audit "
                           f"of this run ({audit}: {why}) would let them rescore the best normalised ones "
                           f"(ekfac-influence self-influence)")
        return None
    distributed.print0(f"normalised rankings: the scan keeps the best normalised candidates, by s(n) from {audit}")
    return np.fromfile(audit / VALUES_FILE, dtype=np.float32).astype(np.float64)


def _query_shard(path: Path, config: RunConfig) -> tuple[int, int] | None:
    """(rank, world) to load only this process's layers, when the factors were fitted sharded (or the
    config asks for it) and the query needs no other layer's factors (no refinement, no normalisation)."""
    sharded = read_stage_manifest(path).get("config", {}).get("shard", "none") == "auto" or config.factors.shard == "auto"
    whole = config.query.refine_steps > 0 or config.query.normalize != "none"
    return (distributed.rank(), distributed.world()) if sharded and not whole else None


def export(config: RunConfig, *, overwrite: bool = False) -> dict:
    """Write the review report (JSONL, CSV, self-contained HTML) of a query set."""
    source = Path(config.run) / QUERIES / config.queries.name
    require(source, "answer queries", "query")
    check_writable(source)
    written = {}
    if distributed.is_main():
        written = export_report(source, formats=config.export.formats, top=config.export.top, overwrite=overwrite)
        for kind, path in written.items():
            print(f"{kind}: {path}")
    return written


@one_writer("self_influence")
def self_influence(config: RunConfig, *, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Audit the corpus: s(n) of every training sequence, its extremes and near-duplicate groups, in <run>/self_influence/."""
    run, section = Path(config.run), config.self_influence
    check_writable(run)
    read_run_manifest(run)  # a damaged manifest is found now, not after the work
    require(run / FACTORS, "fit the factors", "fit")
    out = run / SELF_INFLUENCE
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already holds a self-influence audit; pass --overwrite to compute it again")
    model, tokenizer = load_model(config)
    factors = Factors.load(run / FACTORS)
    check_factors_match(factors, model)  # FactorMismatchError before any pass
    check_corpus_length(config, context_length(model, default=0))
    corpus = prepare_corpus(config, tokenizer, show_progress=show_progress)
    top = min(section.top, len(corpus))
    every_one_shown = 2 * top >= len(corpus)  # the highest and lowest are the whole corpus: per-token values in one pass
    key = {"fingerprint": factors.fingerprint, "strategy": factors.strategy, "corpus_id": corpus.corpus_id,
           "batch_size": section.batch_size, "compute_dtype": section.compute_dtype, "tolerance": section.tolerance,
           **({"per_token": True} if every_one_shown else {})}  # a pass of the two-pass form resumes as before
    checkpoint = PassCheckpoint(run / f".{SELF_INFLUENCE}.partial", key, every_batches=section.checkpoint_batches,
                                every_seconds=section.checkpoint_seconds)
    distributed.print0(f"self-influence of {len(corpus)} training sequences ({factors.strategy})")
    started, objective = time.time(), CausalLMObjective()
    result = compute_self_influence(model, factors, training_loader(corpus, section.batch_size, section.num_workers),
                                    objective, dataclasses.replace(section, per_token=every_one_shown),
                                    show_progress=show_progress, checkpoint=checkpoint)
    seconds = {"pass": time.time() - started}
    values_N = result.values.double().numpy()
    order = np.argsort(-values_N, kind="stable")
    groups, joint = [], []
    if result.sketch is not None:  # the strongest joint pull first: s(G) of the group taken as one
        scored = sorted(((joint_self_influence(result.sketch, values_N, members), members)
                         for members in near_duplicate_groups(result.sketch, section.duplicate_threshold)),
                        key=lambda pair: -pair[0])
        joint, groups = [value for value, _ in scored], [members for _, members in scored]
    shown = list(dict.fromkeys([*order[:top].tolist(), *order[::-1][:top].tolist()]))
    if every_one_shown:
        detail, row_of = result, {n: n for n in shown}
    else:
        detail = compute_self_influence(model, factors, _subset_loader(corpus, shown, section.batch_size), objective,
                                        dataclasses.replace(section, per_token=True), show_progress=False)
        row_of = {n: i for i, n in enumerate(shown)}
        seconds["extremes per token"] = time.time() - started - seconds["pass"]
    if distributed.is_main():
        group_of = {n: g for g, members in enumerate(groups) for n in members}

        def record(kind: str, rank: int, n: int) -> dict:
            i = row_of[n]
            return sequence_record(kind, rank, n, float(values_N[n]), corpus, tokenizer,
                                   per_layer={k: float(v[i]) for k, v in detail.per_layer.items()},
                                   per_token=detail.per_token[i, : int(corpus.lengths_N[n])].tolist(), group=group_of.get(n))

        def lowest_cosine(members: list[int]) -> float:
            return float(sketched_cosines(result.sketch, members[:COSINE_SAMPLE]).min())  # a sample of a huge group

        records = [record("highest", r + 1, int(n)) for r, n in enumerate(order[:top])]
        records += [record("lowest", r + 1, int(n)) for r, n in enumerate(order[::-1][:top])]
        records += [group_record(g, members, values_N, lowest_cosine(members), joint[g], corpus, tokenizer)
                    for g, members in enumerate(groups)]
        manifest = {"kind": "ekfac_influence.self_influence", "version": __version__, "num_sequences": len(corpus),
                    "fingerprint": factors.fingerprint, "strategy": factors.strategy, "corpus_id": corpus.corpus_id,
                    "tokenizer_id": corpus.tokenizer_id, "layers": factors.layer_names,
                    "duplicate_threshold": section.duplicate_threshold, "duplicate_sketch": section.duplicate_sketch,
                    "num_duplicate_groups": len(groups), "config": to_dict(section),
                    "tolerance": section.tolerance, "max_relative_error": result.max_relative_error(),
                    "seconds": {step: round(value, 3) for step, value in seconds.items()}}
        write_audit(out, values_N, records, manifest, overwrite=overwrite)
        checkpoint.clear()
    distributed.barrier()
    record_stage(config, "self_influence", {})
    distributed.print0(f"self-influence of {len(corpus)} sequences, {len(groups)} near-duplicate groups, written to "
                       f"{out} ({time.time() - started:.0f} s)")
    return out


def _subset_loader(corpus: PackedCorpus, ids, batch_size: int):
    return training_batches(corpus, batch_size, indices=ids)


@one_writer("evaluate")
def evaluate(config: RunConfig, *, overwrite: bool = False, show_progress: bool = True) -> dict:
    """LDS against retrained models and planted-fact recall, per variant; the table in <run>/evaluation/.

    Retrained subsets are kept as they finish, so a rerun resumes, and adding a variant retrains
    nothing; `overwrite` measures everything again.
    """
    if distributed.world() > 1:
        raise ConfigError("evaluate runs on one process: run it without accelerate launch / torchrun")
    check_writable(config.run)
    read_run_manifest(Path(config.run))  # a damaged manifest is found now, not after the work
    variants = variants_from_config(config.evaluate.variants, config.factors)
    queries = read_queries(config.queries.file) if config.queries.file else []
    model, tokenizer = load_model(config)
    select_layers(model, config.factors.layers)  # a pattern that matches nothing fails here, before any training
    check_corpus_length(config, context_length(model, default=0))
    corpus = prepare_corpus(config, tokenizer, overwrite=overwrite, show_progress=show_progress)
    print(f"evaluating {', '.join(v.name for v in variants)} on {len(corpus)} sequences: "
          f"{' and '.join(config.evaluate.measurements)}")
    results = evaluate_lm(model, tokenizer, corpus, queries, variants, config.evaluate,
                          out=Path(config.run) / EVALUATION, overwrite=overwrite, show_progress=show_progress)
    record_stage(config, "evaluate", {})
    return results


def show(config: RunConfig, names: list[str] | None = None, *, open_report: bool = False, shown: int = 3) -> list[Path]:
    """Print finished query sets (all of the run's when `names` is None) and optionally open their reports.

    Nothing is recomputed and no model is loaded; a missing report.html is written from topk.jsonl
    (as `export` would) when it is to be opened.
    """
    run = Path(config.run)
    if names is None:
        names = sorted(p.name for p in (run / QUERIES).glob("*") if (p / "topk.jsonl").is_file())
        if not names:
            query_set_directory(run, config.queries.name)  # the error that says what the run holds
    shown_dirs = []
    for name in names:
        out = query_set_directory(run, name)
        manifest = read_manifest(out)
        print(f"== {out}: {manifest.get('num_queries', '?')} queries, {manifest.get('strategy', '?')} factors, "
              f"{manifest.get('num_sequences', '?')} training sequences")
        print_summary(read_records(out), shown=shown)
        report = out / "report.html"
        if open_report:
            if not report.exists():
                export_report(out, formats=("html",))
            opened = webbrowser.open(report.resolve().as_uri())
            print(f"report: {report}" + ("" if opened else " (no browser found here: open this file in one)"))
        else:
            print(f"report: {report}" if report.exists() else
                  f"report: ekfac-influence show {run} --queries.name {name} --open   (writes {report})")
        shown_dirs.append(out)
    return shown_dirs


def print_summary(records: list[dict], shown: int = 3) -> None:
    for record in records:
        tag = " (the model's greedy completion)" if record.get("generated") else ""
        contrast = f" rather than {record['contrast']!r}" if record.get("contrast") else ""
        print(f"\n[{record.get('id')}] {record['prompt']!r} -> {record['completion']!r}{contrast}{tag}  "
              f"log p = {record.get('logp', float('nan')):.2f}, {record.get('num_candidates', '?')} candidates")
        for hit in record["top_positive"][:shown]:
            docs = ", ".join(dict.fromkeys(str(p.get("doc")) for p in hit.get("provenance") or []))
            flag = "  [spurious]" if hit.get("spurious") else ""
            print(f"  +{hit['rank']} score {hit['score']:+.3e}  delta_logp {hit['delta_logp']:+.2e}  [{docs}]{flag}  "
                  f"{' '.join(hit['text'].split())[:60]}")
    print()
