"""Hooks: the captured ā and g give the per-sequence gradients autograd would give, layer selection,
masking, and label sampling that depends neither on batch size nor on padding.

Shapes: B sequences, T positions, I in-features (+1 bias column), O out-features, V vocabulary.
Reference for every gradient test (docs/design.md §1): for a tracked layer s_t = W a_t + b,

    DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ  (O × I, ā = (a, 1) with a bias)  ==  ∂L(z_n)/∂(W | b)

where the right side is one `loss.backward()` of sequence n alone, read from `.grad`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import char_sequences, lm_batches, make_gpt2, make_llama, make_mlp
from torch import nn
from transformers.pytorch_utils import Conv1D

import ekfac_influence as ei
from ekfac_influence.factors import sequence_gradients
from ekfac_influence.hooks import Capture, mask_gradient
from ekfac_influence.objectives import IGNORE_INDEX, LabelSampler

EXACT = dict(rtol=0.0, atol=1e-10)
GPT2_LAYERS = (r"mlp\.c_fc", r"mlp\.c_proj", r"attn\.c_attn")


# ----------------------------------------------------------------------------- a hand-built model


class TokenModel(nn.Module):
    """[B, T, I] inputs → [B, T, C] logits; a masked causal running sum mixes positions, so that
    padding would change the result if it leaked. `kind` picks the layer under test in the middle.

    Conv1D (transformers) always has a bias: its forward is `torch.addmm(self.bias, x, W)`, which
    fails with `bias = None`, so there is no bias-free Conv1D case.
    """

    def __init__(self, kind: str, I: int = 5, H: int = 6, C: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(I, H)
        self.middle = {"linear_bias": nn.Linear(H, H), "linear_no_bias": nn.Linear(H, H, bias=False),
                       "conv1d": Conv1D(H, H)}[kind]
        self.head = nn.Linear(H, C, bias=False)
        if kind == "conv1d":
            nn.init.normal_(self.middle.bias, std=0.3)  # Conv1D starts with a zero bias
            nn.init.normal_(self.middle.weight, std=0.3)
        self.double()

    def forward(self, x_BTI: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        h_BTH = torch.tanh(self.inp(x_BTI))
        h_BTH = torch.cumsum(h_BTH * mask_BT[..., None], dim=1) / 3  # causal mixing over real tokens
        return self.head(torch.tanh(self.middle(h_BTH)))


def token_loss(model: TokenModel, x_BTI, y_BT, mask_BT) -> torch.Tensor:
    """L = −Σ_{n,t real} log p(y_{n,t} | x_{n,≤t}), a sum (float64 throughout)."""
    logits_BTC = model(x_BTI, mask_BT)
    return F.cross_entropy(logits_BTC.flatten(0, 1), y_BT.flatten(), reduction="none").mul(mask_BT.flatten()).sum()


def token_case(padding: str, N: int = 4, T: int = 5, I: int = 5, C: int = 4):
    """(x_BTI, y_BT, mask_BT of the batch, [(x, y, mask) of each sequence alone]). Padded batches are
    ragged, sequence n has T − n real tokens, and the pads hold random inputs that must not leak."""
    generator = torch.Generator().manual_seed(1)
    x_NTI = torch.randn(N, T, I, dtype=torch.float64, generator=generator)
    y_NT = torch.randint(0, C, (N, T), generator=generator)
    lengths = [T] * N if padding == "none" else [T - n for n in range(N)]
    alone = [(x_NTI[n : n + 1, :L], y_NT[n : n + 1, :L], torch.ones(1, L, dtype=torch.float64))
             for n, L in enumerate(lengths)]
    if padding == "none":
        return x_NTI, y_NT, torch.ones(N, T, dtype=torch.float64), alone
    width = T + 2
    x = torch.randn(N, width, I, dtype=torch.float64, generator=generator)
    y = torch.randint(0, C, (N, width), generator=generator)
    mask = torch.zeros(N, width, dtype=torch.float64)
    for n, L in enumerate(lengths):
        span = slice(width - L, width) if padding == "left" else slice(0, L)
        x[n, span], y[n, span], mask[n, span] = x_NTI[n, :L], y_NT[n, :L], 1
    return x, y, mask, alone


def hook_sequence_gradients(layers, loss_fn, mask_BT) -> dict[str, torch.Tensor]:
    """{name: DW_BOI} from one forward with the hooks and one backward to the tracked outputs."""
    with Capture(layers) as capture:
        loss = loss_fn()
    grads = capture.output_gradients(loss)
    return {l.name: sequence_gradients(grads[l.name], capture.activations(l, mask_BT)) for l in layers}


def autograd_gradients(model, layers, loss_fn) -> dict[str, torch.Tensor]:
    """{name: ∂loss/∂(W | b)}, O × I, read from `.grad` after one plain backward."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {layer.name: layer.gradient_OI() for layer in layers}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["linear_bias", "linear_no_bias", "conv1d"])
def test_per_sequence_gradients_from_hooks_equal_an_autograd_loop(kind, padding):
    """DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ from one batched pass == ∂L(z_n)/∂W from a backward of z_n alone."""
    model = TokenModel(kind)
    layers = ei.select_layers(model, (r"^middle$", r"^inp$"))
    middle = layers[[l.name for l in layers].index("middle")]
    assert middle.has_bias == (kind != "linear_no_bias") and middle.transposed == (kind == "conv1d")
    x, y, mask, sequences = token_case(padding)

    DW = hook_sequence_gradients(layers, lambda: token_loss(model, x, y, mask), mask)

    for n, one in enumerate(sequences):
        expected = autograd_gradients(model, layers, lambda: token_loss(model, *one))
        for layer in layers:
            assert DW[layer.name].shape[1:] == (layer.out_features, layer.in_dim)
            torch.testing.assert_close(DW[layer.name][n], expected[layer.name], **EXACT)


# ----------------------------------------------------------------------------- tiny transformers


def tiny_lm(family: str) -> tuple[nn.Module, list]:
    """(float64 model, tracked layers), on SDPA attention whatever conftest picks: Llama's eager
    attention takes the softmax in float32 (transformers), which costs float64 exactness and turns the
    fully masked rows of left padding into NaN; GPT-2's eager attention lets those rows attend to every
    position, so a loss term on a pad position would reach the real tokens' gradients."""
    model = make_gpt2() if family == "gpt2" else make_llama()
    model.set_attn_implementation("sdpa")
    return model, ei.select_layers(model, GPT2_LAYERS if family == "gpt2" else None)


def causal_lm_case(padding: str) -> tuple[dict, list[dict]]:
    """(a batch of 3 sequences, each sequence alone as a batch of one without padding). Padded
    batches are ragged: lengths 10, 7, 5 padded to 12 (pad id 0, attention_mask 0, label −100)."""
    tokens_NT = char_sequences(3, 10)
    if padding == "none":
        return lm_batches(tokens_NT, 3)[0], [lm_batches(tokens_NT[n : n + 1], 1)[0] for n in range(3)]
    rows = [lm_batches(tokens_NT[n : n + 1, :length], 1, pad_to=12, left=padding == "left")[0]
            for n, length in enumerate((10, 7, 5))]
    batch = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
    return batch, [lm_batches(tokens_NT[n : n + 1, :length], 1)[0] for n, length in enumerate((10, 7, 5))]


@pytest.mark.parametrize("family, padding", [
    ("gpt2", "none"), ("gpt2", "right"), ("gpt2", "left"), ("llama", "none"), ("llama", "right"), ("llama", "left"),
])
def test_the_loss_of_a_padded_batch_is_the_sum_of_the_losses_of_its_sequences_alone(family, padding):
    """L(batch) = Σ_n L(z_n), L(z) = −Σ_{t≥1} log p(z_t | z_<t): padding adds no term. The tolerance
    is float32's because the objective takes the cross-entropy in float32 even for a float64 model."""
    model, _ = tiny_lm(family)
    batch, sequences = causal_lm_case(padding)
    objective = ei.CausalLMObjective()
    with torch.no_grad():
        batch_loss = objective.train_loss(model, batch, sample_labels=False).double()
        alone = sum(objective.train_loss(model, one, sample_labels=False).double() for one in sequences)
    torch.testing.assert_close(batch_loss, alone, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family, padding", [
    ("gpt2", "none"), ("gpt2", "right"), ("gpt2", "left"), ("llama", "none"), ("llama", "right"), ("llama", "left"),
])
def test_per_sequence_gradients_of_a_causal_lm_equal_the_gradient_of_each_sequence_alone(family, padding):
    """DW_n from a padded batch == ∂L(z_n)/∂W of z_n alone (batch of one, no padding), with
    L(z) = −Σ_t log p(z_t | z_<t) the CausalLMObjective's real-label loss; GPT-2's Conv1D included."""
    model, layers = tiny_lm(family)
    assert {l.transposed for l in layers} == ({True} if family == "gpt2" else {False})
    batch, sequences = causal_lm_case(padding)
    objective = ei.CausalLMObjective()

    DW = hook_sequence_gradients(layers, lambda: objective.train_loss(model, batch, sample_labels=False),
                                 batch["attention_mask"])

    for n, alone in enumerate(sequences):
        expected = autograd_gradients(model, layers, lambda: objective.train_loss(model, alone, sample_labels=False))
        for layer in layers:
            torch.testing.assert_close(DW[layer.name][n], expected[layer.name], **EXACT)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mlp"])
def test_output_gradients_of_a_float64_model_are_those_of_a_float64_cross_entropy(family):
    """g_t = ∂L/∂s_t with L = −Σ_t log softmax(z_t)[y_t] evaluated in float64 for a float64 model."""
    if family == "mlp":
        model = make_mlp()
        layers = ei.select_layers(model)
        generator = torch.Generator().manual_seed(0)
        x, y = torch.rand(8, 64, dtype=torch.float64, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        package_loss = lambda: ei.ClassificationObjective().train_loss(model, (x, y), sample_labels=False)  # noqa: E731
        reference_loss = lambda: F.cross_entropy(model(x), y, reduction="sum")  # noqa: E731
    else:
        model, layers = tiny_lm(family)
        batch = lm_batches(char_sequences(2, 10), 2)[0]
        package_loss = lambda: ei.CausalLMObjective().train_loss(model, batch, sample_labels=False)  # noqa: E731

        def reference_loss():
            logits_BTV = model(input_ids=batch["input_ids"]).logits[:, :-1]
            return F.cross_entropy(logits_BTV.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")

    def output_gradients(loss_fn):
        with Capture(layers) as capture:
            loss = loss_fn()
        return loss, capture.output_gradients(loss)

    (loss, g), (loss_ref, g_ref) = output_gradients(package_loss), output_gradients(reference_loss)
    assert loss_ref.dtype == torch.float64
    for layer in layers:
        torch.testing.assert_close(g[layer.name], g_ref[layer.name], **EXACT)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- no weight gradients


@pytest.mark.parametrize("family", ["gpt2", "llama", "token_model"])
def test_hooks_need_no_parameter_gradients_and_compute_none(family):
    """g = ∂L/∂s needs no ∂L/∂W: frozen parameters give the same g and DW, and with trainable
    parameters `output_gradients` leaves every `param.grad` None."""
    if family == "token_model":  # the first tracked layer reads the raw input: its output is a leaf
        model = TokenModel("conv1d")
        layers = ei.select_layers(model, (r"^inp$", r"^middle$"))
        generator = torch.Generator().manual_seed(3)
        x, y = torch.randn(3, 6, 5, dtype=torch.float64, generator=generator), torch.randint(0, 4, (3, 6), generator=generator)
        mask = torch.ones(3, 6, dtype=torch.float64)
        mask[0, 4:] = 0
        loss_fn = lambda: token_loss(model, x, y, mask)  # noqa: E731
    else:
        model, layers = tiny_lm(family)
        batch = lm_batches(char_sequences(3, 10), 3, pad_to=12)[0]
        mask = batch["attention_mask"]
        loss_fn = lambda: ei.CausalLMObjective().train_loss(model, batch, sample_labels=False)  # noqa: E731

    def capture():
        with Capture(layers) as cap:
            loss = loss_fn()
        grads = cap.output_gradients(loss)
        return grads, {l.name: sequence_gradients(grads[l.name], cap.activations(l, mask)) for l in layers}

    g_trainable, DW_trainable = capture()
    assert all(param.grad is None for param in model.parameters())
    assert any(g.abs().max() > 0 for g in g_trainable.values())

    model.requires_grad_(False)
    g_frozen, DW_frozen = capture()
    assert all(param.grad is None for param in model.parameters())
    for layer in layers:
        torch.testing.assert_close(g_frozen[layer.name], g_trainable[layer.name], **EXACT)
        torch.testing.assert_close(DW_frozen[layer.name], DW_trainable[layer.name], **EXACT)


# ----------------------------------------------------------------------------- layer selection


@pytest.mark.parametrize("family, expected", [
    ("llama", [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]),
    ("gpt2", [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]),
    ("mlp", ["0", "2"]),
])
def test_default_layer_selection_is_the_mlp_linears_or_every_linear_without_blocks(family, expected):
    """Default = the MLP linears of every block (the paper's choice); a plain MLP tracks every Linear."""
    model = {"llama": make_llama, "gpt2": make_gpt2, "mlp": make_mlp}[family]()
    layers = ei.select_layers(model)
    assert [l.name for l in layers] == expected
    modules = dict(model.named_modules())
    for layer in layers:
        assert layer.module is modules[layer.name]
        weight = layer.module.weight
        assert tuple(weight.shape) == ((layer.in_features, layer.out_features) if layer.transposed
                                       else (layer.out_features, layer.in_features))


@pytest.mark.parametrize("patterns", [(r"mlp\.nonexistent",), (r"mlp\.c_fc", r"attn\.q_proj")])
def test_a_layer_pattern_that_matches_nothing_raises_and_names_the_pattern(patterns):
    """Every pattern must match a Linear/Conv1D; the error names the one that did not."""
    with pytest.raises(ei.LayerSelectionError) as error:
        ei.select_layers(make_gpt2(), patterns)
    assert repr(patterns[-1]) in str(error.value)  # quoted as a Python literal: backslashes doubled


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("left", [False, True])
def test_masked_positions_contribute_nothing(left):
    """ā_t = 0 and g_t = 0 where the token mask is 0, so pads add nothing to A, S or DW."""
    model, layers = tiny_lm("gpt2")
    batch = lm_batches(char_sequences(3, 8), 3, pad_to=12, left=left)[0]
    mask_BT = batch["attention_mask"]
    pads = mask_BT == 0
    with Capture(layers) as capture:
        loss = ei.CausalLMObjective().train_loss(model, batch, sample_labels=False)
    grads = capture.output_gradients(loss)
    for layer in layers:
        raw_BTI = capture.activations(layer)
        a_BTI = capture.activations(layer, mask_BT)
        assert raw_BTI[pads].abs().max() > 0  # the pad embeddings do reach the layer...
        assert torch.equal(a_BTI[pads], torch.zeros_like(a_BTI[pads]))  # ...and are masked out
        torch.testing.assert_close(a_BTI[~pads], raw_BTI[~pads], rtol=0, atol=0)
        assert a_BTI.shape[-1] == layer.in_dim
        torch.testing.assert_close(a_BTI[~pads][:, -1], torch.ones_like(a_BTI[~pads][:, -1]), rtol=0, atol=0)
        g_BTO = mask_gradient(grads[layer.name], mask_BT)
        assert torch.equal(g_BTO[pads], torch.zeros_like(g_BTO[pads]))
        assert g_BTO[~pads].abs().max() > 0
        noisy_BTO = mask_gradient(torch.randn_like(g_BTO), mask_BT)
        assert torch.equal(noisy_BTO[pads], torch.zeros_like(noisy_BTO[pads]))


# ----------------------------------------------------------------------------- label sampling


def sampling_case(N: int = 4, T: int = 7, V: int = 11):
    """Per-sequence logits [N, T, V] and lengths; sequence n has T − n real tokens."""
    logits_NTV = torch.randn(N, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    return logits_NTV, [T - n for n in range(N)]


def place(logits_NTV, lengths, rows, width, left):
    """A batch of the given sequences, each one's real tokens first (right pads) or last (left pads)."""
    V = logits_NTV.shape[-1]
    logits = torch.randn(len(rows), width, V, dtype=torch.float64)  # pads: arbitrary logits
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, n in enumerate(rows):
        start = width - lengths[n] if left else 0
        logits[b, start : start + lengths[n]] = logits_NTV[n, : lengths[n]]
        valid[b, start : start + lengths[n]] = True
    return logits, valid


@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("left", [False, True])
def test_sampled_labels_depend_neither_on_batch_size_nor_on_padding(batch_size, left):
    """y_{n,k} (sequence n, k-th real token) depends only on (seed, n, k, logits of that token)."""
    logits_NTV, lengths = sampling_case()
    N, T, _ = logits_NTV.shape
    reference = []  # every sequence alone, unpadded
    for n in range(N):
        logits, valid = place(logits_NTV, lengths, [n], lengths[n], left=False)
        reference.append(LabelSampler(seed=3, first_index=n).sample(logits, valid)[0])

    for first in range(0, N, batch_size):
        rows = list(range(first, min(N, first + batch_size)))
        logits, valid = place(logits_NTV, lengths, rows, T + 2, left)
        labels_BT = LabelSampler(seed=3, first_index=first).sample(logits, valid)
        for b, n in enumerate(rows):
            assert torch.equal(labels_BT[b][valid[b]], reference[n])
            assert (labels_BT[b][~valid[b]] == IGNORE_INDEX).all()


def test_different_seeds_and_sequences_draw_different_labels():
    """Streams keyed to (seed, sequence index) are unrelated: labels differ on most tokens."""
    logits = torch.zeros(1, 400, 50, dtype=torch.float64)  # uniform: two streams agree with p = 1/50
    valid = torch.ones(1, 400, dtype=torch.bool)
    base = LabelSampler(seed=0, first_index=0).sample(logits, valid)
    for other in (LabelSampler(seed=1, first_index=0), LabelSampler(seed=0, first_index=1)):
        agreement = (other.sample(logits, valid) == base).double().mean().item()
        assert agreement < 0.1
    assert torch.equal(LabelSampler(seed=0, first_index=0).sample(logits, valid), base)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sampled_label_frequencies_match_the_softmax(temperature):
    """y ~ softmax(z): Pearson's χ² = Σ_v (count_v − M p_v)² / (M p_v) stays below its 99.99% quantile."""
    from scipy.stats import chi2

    V, M = 6, 20_000
    z_V = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.2, -0.4], dtype=torch.float64) / temperature
    p_V = torch.softmax(z_V, 0)
    B, T = 40, M // 40  # many sequences, many tokens each: both keys of the stream vary
    labels_BT = LabelSampler(seed=11, first_index=100).sample(z_V.expand(B, T, V), torch.ones(B, T, dtype=torch.bool))
    counts_V = torch.bincount(labels_BT.flatten(), minlength=V).double()
    statistic = ((counts_V - M * p_V) ** 2 / (M * p_V)).sum().item()
    assert statistic < chi2.ppf(0.9999, V - 1)
    torch.testing.assert_close(counts_V / M, p_V, rtol=0, atol=0.015)
