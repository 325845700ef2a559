"""TorchScript: torch.jit.trace works and the traced module matches eager at other shapes (the trace is
shape-generic: sizes are recorded, not baked in); torch.jit.script fails with our error, which points
to torch.compile / torch.export / torch.jit.trace.

Not shape-generic: a trace with a `kv_cache` (the cache's Python-side length is baked in)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from multihead import MultiheadAttention, RotaryEmbedding

E, H = 16, 4
D = E // H

CASES = {
    "weights": ({}, {}),
    "no_weights": ({}, {"need_weights": False}),
    "gqa_weights": ({"num_kv_heads": 2}, {}),
    "gqa_no_weights": ({"num_kv_heads": 2}, {"need_weights": False}),
    "causal_per_head_weights": ({}, {"is_causal": True, "average_attn_weights": False}),
    "rope_window_no_weights": ({"rotary": RotaryEmbedding(D, max_seq_len=64), "window": 3}, {"need_weights": False}),
    "rope_window_weights": ({"rotary": RotaryEmbedding(D, max_seq_len=64), "window": (2, 1)}, {}),
}


class Call(nn.Module):
    def __init__(self, module: nn.Module, **kw) -> None:
        super().__init__()
        self.module, self.kw = module, kw

    def forward(self, x, key_padding_mask):
        out, weights = self.module(x, x, x, key_padding_mask=key_padding_mask, **self.kw)
        return (out,) if weights is None else (out, weights)


def _inputs(batch: int, length: int):
    g = torch.Generator().manual_seed(batch * 100 + length)
    padding = torch.rand(batch, length, generator=g) < 0.3
    padding[0] = True  # element 0 sees no key: zero attention
    return torch.randn(batch, length, E, generator=g), padding


@pytest.mark.parametrize("case", list(CASES))
def test_trace_is_shape_generic(one_thread, case):
    module_kw, call_kw = CASES[case]
    torch.manual_seed(0)
    call = Call(MultiheadAttention(E, H, **module_kw).eval(), **call_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(call, _inputs(2, 9), check_trace=False)
    for batch, length in ((2, 9), (3, 14), (2, 5)):
        inputs = _inputs(batch, length)
        got, want = traced(*inputs), call(*inputs)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        bias = call.module.out_proj.bias
        torch.testing.assert_close(got[0][0], bias.expand(length, E), rtol=0, atol=1e-6)


def test_trace_backward(one_thread):
    """The traced module is differentiable (training with weights)."""
    torch.manual_seed(0)
    call = Call(MultiheadAttention(E, H, num_kv_heads=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(call, _inputs(2, 6), check_trace=False)
    x, padding = _inputs(3, 8)
    grads = []
    for fn in (traced, call):
        xi = x.clone().requires_grad_()
        out, weights = fn(xi, padding)
        grads.append(torch.autograd.grad(out.square().sum() + weights.square().sum(), [xi, *call.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trace_keeps_a_causal_pattern_mask_an_input(one_thread):
    """A user mask equal to the causal pattern at trace time stays a mask input of the trace (eager
    turns it into the causal flag; a trace must not bake that in)."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H).eval()

    class Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, x, mask):
            return self.module(x, x, x, attn_mask=mask)

    call = Call()
    x = torch.randn(2, 6, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(call, (x, torch.ones(6, 6, dtype=torch.bool).triu(1)), check_trace=False)
    other = torch.rand(6, 6) < 0.3
    for a, b in zip(traced(x, other), call(x, other)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("nested", [False, True])
def test_script_fails_with_our_error(nested):
    module = MultiheadAttention(E, H)
    target = nn.Sequential(nn.Identity(), module) if nested else module
    with pytest.raises(TypeError, match="torch.jit.script") as info:
        torch.jit.script(target)
    for hint in ("torch.compile", "torch.export.export", "torch.jit.trace"):
        assert hint in str(info.value)
