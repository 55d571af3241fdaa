"""Checks that a failed operation left a model exactly as it was (shared by the adapter-file tests)."""

from __future__ import annotations

import torch

import peftkit


def snapshot(model):
    """Module types, a copy of every tensor, and the requires_grad flags."""
    return ([type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    """The model matches `snapshot`'s record bit for bit and carries no adapter."""
    types, state, grads = before
    assert [type(m).__name__ for m in model.modules()] == types
    assert not peftkit.has_adapter(model)
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
