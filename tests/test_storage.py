"""Storage of fitted factors: exact round trips, no silent overwrite, refusal of factors made for
another model or other layers, detection of corruption, and no pickle anywhere (docs/design.md §4).

On disk a factors directory is `factors.safetensors` (tensors `{layer}/{A_II, S_OO, QA_II, QS_OO,
eigA_I, eigS_O, lambda_OI}`, a block-diagonal factor as its blocks `{layer}/QA_II#0`, `#1`, ..., and
`ggn_PP` for the exact strategy) and `manifest.json` (fingerprint,
strategy, layers, resolved config, checksum of the tensors).
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import make_mlp
from torch import nn

import ekfac_influence as ei
from ekfac_influence.config import to_dict
from ekfac_influence.factors import LayerFactors

FACTORS_FILE, MANIFEST_FILE = "factors.safetensors", "manifest.json"
STRATEGIES = ["ekfac", "kfac", "diagonal", "identity", "exact", "lissa"]
SAME_SCORES = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def small_digits(digits):
    """(trained MLP, 300 training digits in 3 batches, 10 query digits): enough to fit every strategy."""
    model, train, queries = digits
    x, y = queries[0]
    return model, train[:3], [(x[:10], y[:10])]


def fit(model, train, strategy: str = "ekfac", **config) -> ei.Factors:
    config.setdefault("factor_dtype", "float64")
    return ei.fit_factors(model, train, ei.ClassificationObjective(), ei.FactorConfig(strategy=strategy, **config),
                          show_progress=False)


def scores(model, factors, queries, train) -> ei.ScoreResult:
    return ei.compute_scores(model, factors, queries, train, ei.ClassificationObjective(),
                             ei.ScoreConfig(compute_dtype="float64", per_layer=True), show_progress=False)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def assert_same_tensor(loaded, original, what: str) -> None:
    assert (loaded is None) == (original is None), what
    if original is not None:
        assert loaded.dtype == original.dtype and loaded.shape == original.shape, what
        assert torch.equal(loaded, original), what


def assert_same_factors(loaded: ei.Factors, original: ei.Factors) -> None:
    """Every field equal, every tensor bit-identical with the same dtype and shape."""
    for field in ("strategy", "fingerprint", "config", "num_sequences", "num_tokens", "lissa_scale", "meta"):
        assert getattr(loaded, field) == getattr(original, field), field
    assert_same_tensor(loaded.ggn_PP, original.ggn_PP, "ggn_PP")
    assert loaded.layer_names == original.layer_names
    for got, want in zip(loaded.layers, original.layers):
        assert (got.name, got.out_dim, got.in_dim, got.damping) == (want.name, want.out_dim, want.in_dim, want.damping)
        for key in LayerFactors.TENSORS:
            assert_same_tensor(getattr(got, key), getattr(want, key), f"{want.name}/{key}")


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("strategy, factor_dtype", [(s, "float64") for s in STRATEGIES] + [("ekfac", "float32")])
def test_saved_factors_load_back_exactly_and_give_the_same_scores(small_digits, tmp_path, strategy, factor_dtype):
    """load(save(F)) == F field by field and bit by bit, so score(q, m) = ∇f_qᵀ P(∇log p(z_m)) is unchanged
    (to float64 rounding). lissa is included for its `lissa_scale` field."""
    model, train, queries = small_digits
    factors = fit(model, train, strategy, factor_dtype=factor_dtype, layers=("0", "2"))
    factors.meta = {"note": "round trip", "nested": {"list": [1, 2.5, None]}}
    factors.save(tmp_path / "factors")

    loaded = ei.Factors.load(tmp_path / "factors", model=model)

    assert_same_factors(loaded, factors)
    if strategy == "lissa":
        return  # its scores cost an iterative solve per query; the stored fields are what matters
    expected, found = scores(model, factors, queries, train), scores(model, loaded, queries, train)
    assert expected.scores.abs().max() > 0
    # Same values, other memory layout: eigh returns column-major eigenvectors, safetensors stores them
    # row-major, and matmuls then sum in another order (≈1e-13 here).
    torch.testing.assert_close(found.scores, expected.scores, **SAME_SCORES)
    for name in factors.layer_names:
        torch.testing.assert_close(found.per_layer[name], expected.per_layer[name], **SAME_SCORES)


# ----------------------------------------------------------------------------- overwriting


def test_saving_over_existing_factors_needs_overwrite_and_then_replaces_them(small_digits, tmp_path):
    """Without overwrite=True the old directory stays byte for byte; with it, the new factors replace it."""
    model, train, _ = small_digits
    path = tmp_path / "factors"
    old, new = fit(model, train, "ekfac"), fit(model, train, "diagonal")
    old.save(path)
    before = snapshot(path)

    with pytest.raises(ei.StorageError, match="overwrite"):
        new.save(path)
    assert snapshot(path) == before
    assert_same_factors(ei.Factors.load(path), old)

    new.save(path, overwrite=True)
    assert snapshot(path) != before
    assert_same_factors(ei.Factors.load(path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors"]  # no temporary or backup left behind


def test_a_failed_overwrite_leaves_the_old_factors_intact(small_digits, tmp_path, monkeypatch):
    """Writes go to a temporary directory renamed into place: a crash mid-write changes nothing."""
    import ekfac_influence.storage as storage

    model, train, _ = small_digits
    path = tmp_path / "factors"
    fit(model, train, "ekfac").save(path)
    before = snapshot(path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fit(model, train, "diagonal").save(path, overwrite=True)
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors"]


# ----------------------------------------------------------------------------- mismatches


def another_model(model: nn.Module, batch, how: str) -> nn.Module:
    """The digits MLP's architecture with other weights: a fresh initialisation, or one Adam step."""
    if how == "other initialisation":
        torch.manual_seed(123)
        return make_mlp().eval()
    other = copy.deepcopy(model)
    optimizer = torch.optim.Adam(other.parameters(), lr=1e-3)
    nn.functional.cross_entropy(other(batch[0]), batch[1]).backward()
    optimizer.step()
    return other.eval()


@pytest.mark.parametrize("how", ["other initialisation", "one training step"])
def test_factors_of_another_model_are_refused(small_digits, tmp_path, how):
    """Same architecture, other weights: load(model=...) and compute_scores raise FactorMismatchError."""
    model, train, queries = small_digits
    factors = fit(model, train, "ekfac")
    factors.save(tmp_path / "factors")
    other = another_model(model, train[0], how)

    with pytest.raises(ei.FactorMismatchError, match="another model"):
        ei.Factors.load(tmp_path / "factors", model=other)
    with pytest.raises(ei.FactorMismatchError, match="another model"):
        scores(other, factors, queries, train)
    ei.Factors.load(tmp_path / "factors", model=model)  # the model they were fitted for is accepted


@pytest.mark.parametrize("change, message", [
    ("layer 0 removed", r"layers this model does not have: 0$"),
    ("layer 0 wider", r"layer 0 is 30 × 65 here but 24 × 65 in the factors"),
    ("layer 0 without bias", r"layer 0 is 24 × 64 here but 24 × 65 in the factors"),
], ids=["layer 0 removed", "layer 0 wider", "layer 0 without bias"])
def test_factors_of_other_layers_are_refused_naming_the_layer(small_digits, tmp_path, change, message):
    """Factors fitted for layer "0" do not fit a model whose layer 0 is missing or has another O × I."""
    model, train, queries = small_digits
    factors = fit(model, train, "ekfac", layers=("0",))
    factors.save(tmp_path / "factors")
    first = {"layer 0 removed": nn.Identity(), "layer 0 wider": nn.Linear(64, 30),
             "layer 0 without bias": nn.Linear(64, 24, bias=False)}[change]
    width = 30 if change == "layer 0 wider" else 24
    changed = nn.Sequential(first, nn.Tanh(), nn.Linear(64 if change == "layer 0 removed" else width, 10)).double()

    with pytest.raises(ei.FactorMismatchError, match=message):
        ei.Factors.load(tmp_path / "factors", model=changed)
    with pytest.raises(ei.FactorMismatchError, match=message):
        scores(changed, factors, queries, train)


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("where", ["header", "middle", "last byte", "truncated"])
def test_a_corrupted_tensor_file_is_refused(small_digits, tmp_path, where):
    """Any changed byte of factors.safetensors breaks its checksum in the manifest: StorageError."""
    model, train, _ = small_digits
    fit(model, train, "ekfac").save(tmp_path / "factors")
    tensor_path = tmp_path / "factors" / FACTORS_FILE
    data = bytearray(tensor_path.read_bytes())
    if where == "truncated":
        data = data[: len(data) // 2]
    else:
        index = {"header": 20, "middle": len(data) // 2, "last byte": len(data) - 1}[where]
        data[index] ^= 0xFF
    tensor_path.write_bytes(bytes(data))

    with pytest.raises(ei.StorageError, match="corrupted"):
        ei.Factors.load(tmp_path / "factors")


@pytest.mark.parametrize("damage", ["manifest missing", "manifest not JSON", "tensors missing", "not a directory"])
def test_a_damaged_factors_directory_is_refused(small_digits, tmp_path, damage):
    """A missing or unreadable manifest, or missing tensors, raise StorageError (not KeyError/JSON errors)."""
    model, train, _ = small_digits
    path = tmp_path / "factors"
    fit(model, train, "ekfac").save(path)
    if damage == "manifest missing":
        (path / MANIFEST_FILE).unlink()
    elif damage == "manifest not JSON":
        (path / MANIFEST_FILE).write_text('{"kind": "ekfac_influence.factors", ')
    elif damage == "tensors missing":
        (path / FACTORS_FILE).unlink()
    else:
        path = tmp_path / "nothing here"

    with pytest.raises(ei.StorageError):
        ei.Factors.load(path)


# ----------------------------------------------------------------------------- no pickle


@pytest.mark.parametrize("strategy", ["ekfac", "exact"])
def test_factors_are_stored_as_safetensors_and_json_without_pickle(small_digits, tmp_path, monkeypatch, strategy):
    """The directory holds factors.safetensors and manifest.json only; loading never unpickles."""
    from safetensors import safe_open

    model, train, _ = small_digits
    factors = fit(model, train, strategy)
    path = tmp_path / "factors"
    factors.save(path)

    assert sorted(p.name for p in path.iterdir()) == [FACTORS_FILE, MANIFEST_FILE]
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "ekfac_influence.factors"
    assert manifest["fingerprint"] == factors.fingerprint == ei.fingerprint(model, ei.select_layers(model))
    assert manifest["strategy"] == strategy
    assert [(l["name"], l["out_dim"], l["in_dim"]) for l in manifest["layers"]] == [("0", 24, 65), ("2", 10, 25)]
    assert manifest["config"] == json.loads(json.dumps(to_dict(factors.config)))
    assert manifest["config"]["strategy"] == strategy
    assert set(manifest["checksums"]) == {FACTORS_FILE}

    with safe_open(str(path / FACTORS_FILE), framework="pt") as handle:
        keys = set(handle.keys())
    expected = {f"{l.name}/{k}" for l in factors.layers for k in l.tensors()} | ({"ggn_PP"} if strategy == "exact" else set())
    assert keys == expected

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while loading factors")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, no_pickle)
    assert_same_factors(ei.Factors.load(path, model=model), factors)


def test_a_fit_with_block_diagonal_factors_resumes_from_its_saved_blocks(tmp_path, monkeypatch, capsys):
    """The covariance pass's result and the correction pass's partial sums are saved as blocks and resumed."""
    from conftest import char_sequences, lm_batches, make_llama

    import ekfac_influence as ei
    from ekfac_influence import fit as fitting
    from ekfac_influence.factors import BlockDiagonal
    from ekfac_influence.storage import PassCheckpoint

    model = make_llama().double()
    train = lm_batches(char_sequences(12, 16), 4)
    objective, config = ei.CausalLMObjective(), ei.FactorConfig(factor_dtype="float64", blocks=2)
    reference = ei.fit_factors(model, train, objective, config, show_progress=False)
    checkpoint = PassCheckpoint(tmp_path, {"run": 1}, every_batches=1)
    correct = fitting.correct_eigenvalues

    def interrupted(model, layers, fitted, batches, *args, **kwargs):  # dies on the second batch
        return correct(model, layers, fitted, [batches[0], None], *args, **kwargs)

    monkeypatch.setattr(fitting, "correct_eigenvalues", interrupted)
    with pytest.raises(Exception):
        ei.fit_factors(model, train, objective, config, show_progress=False, checkpoint=checkpoint)
    monkeypatch.setattr(fitting, "correct_eigenvalues", correct)
    assert (tmp_path / "covariances.done.json").exists() and (tmp_path / "correction.rank0.json").exists()
    capsys.readouterr()
    resumed = ei.fit_factors(model, train, objective, config, show_progress=False, checkpoint=checkpoint)
    assert "resuming the correction pass at batch 1" in capsys.readouterr().out
    for a, b in zip(reference.layers, resumed.layers):
        assert isinstance(b.QA_II, BlockDiagonal) and isinstance(b.S_OO, BlockDiagonal)
        torch.testing.assert_close(b.lambda_OI, a.lambda_OI, rtol=1e-12, atol=0)
        torch.testing.assert_close(b.S_OO.dense(), a.S_OO.dense(), rtol=1e-12, atol=0)


def test_a_checkpoint_killed_between_its_tensor_file_and_its_json_still_loads_the_previous_save(tmp_path, monkeypatch):
    """The JSON names its tensor file; the previous file goes only after the JSON points elsewhere."""
    from ekfac_influence import storage
    from ekfac_influence.storage import PassCheckpoint

    checkpoint = PassCheckpoint(tmp_path, {"run": 1}, every_batches=1)
    checkpoint.save("scan", {"x": torch.ones(3)}, {"next_batch": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the new tensor file, before its JSON

    monkeypatch.setattr(storage, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save("scan", {"x": torch.full((3,), 2.0)}, {"next_batch": 2})
    monkeypatch.undo()
    tensors, meta = PassCheckpoint(tmp_path, {"run": 1}).load("scan")
    assert meta["next_batch"] == 1 and tensors["x"].tolist() == [1.0, 1.0, 1.0]
    checkpoint.save("scan", {"x": torch.full((3,), 3.0)}, {"next_batch": 3})
    tensors, meta = PassCheckpoint(tmp_path, {"run": 1}).load("scan")
    assert meta["next_batch"] == 3 and tensors["x"].tolist() == [3.0, 3.0, 3.0]
    assert len(list(tmp_path.glob("scan.rank0.*.safetensors"))) == 1  # older saves cleaned up


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    previous = __import__("os").umask(request.param)
    yield request.param
    __import__("os").umask(previous)


def test_everything_written_through_a_temporary_name_gets_the_users_umask(umask, tmp_path, small_digits):
    """mkstemp/mkdtemp would leave 0600 files and 0700 directories: unreadable to the group on a cluster."""
    from ekfac_influence.report import export_report
    from ekfac_influence.storage import atomic_write_text

    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    atomic_write_text(tmp_path / "a" / "note.txt", "x")
    model, train, _ = small_digits
    fit(model, train[:1], "diagonal").save(tmp_path / "factors")
    index = ei.ShortlistIndex.build([[1, 2, 3], [2, 3, 4]], vocab_size=8)
    index.save(tmp_path / "index")
    query_dir = tmp_path / "queries"
    query_dir.mkdir()
    (query_dir / "topk.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c", "top_positive": [],
                                                      "top_negative": []}) + "\n")
    export_report(query_dir, formats=("jsonl", "csv"))
    files = [tmp_path / "a" / "note.txt", *(tmp_path / "factors").iterdir(), *(tmp_path / "index").iterdir(),
             query_dir / "report.jsonl", query_dir / "report.csv"]
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == \
        {str(p.relative_to(tmp_path)): oct(file_mode) for p in files}
    for directory in (tmp_path / "a", tmp_path / "factors", tmp_path / "index"):
        assert oct(directory.stat().st_mode & 0o777) == oct(dir_mode), directory
