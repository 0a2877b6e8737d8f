"""Peak memory of the passes over the training set: one batch's activations and gradients at a time.

A pass that keeps the batch it has worked while the next one runs forward and backward holds two
batches' captures at its peak (on SmolLM2 at batches of 4 × 256 tokens, over a GiB each).
"""

from __future__ import annotations

import weakref

import pytest

import ekfac_influence as ei
from conftest import char_sequences, lm_batches
from ekfac_influence import audit, passes


@pytest.mark.parametrize("stage", ["fit kfac", "fit ekfac", "fit diagonal", "self-influence"])
def test_a_worked_batch_is_freed_before_the_next_one_is_captured(trained_llama, stage, monkeypatch):
    """When the next batch's forward starts, no earlier batch's capture is alive (self-influence with each batch
    worked alone: GROUP_BYTES 0)."""
    train, objective = lm_batches(char_sequences(12, 16), 4), ei.CausalLMObjective()
    strategy = stage.split()[-1] if stage.startswith("fit") else "kfac"
    factors = ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(strategy=strategy), show_progress=False)
    monkeypatch.setattr(audit, "GROUP_BYTES", 0)
    original, captured, alive = passes._forward_backward, [], []

    def watched(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in captured))
        item = original(*args, **kwargs)
        captured.append(weakref.ref(item))
        return item

    monkeypatch.setattr(passes, "_forward_backward", watched)
    if stage.startswith("fit"):
        ei.fit_factors(trained_llama, train, objective, ei.FactorConfig(strategy=strategy), show_progress=False)
    else:
        ei.self_influence(trained_llama, factors, train, objective, show_progress=False)
    assert len(captured) >= 3 and alive == [0] * len(captured)
