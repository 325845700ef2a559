"""torch.export.export with dynamic batch and length, with and without weights, with masks, before and
after run_decompositions(); the exported program matches eager at other shapes and gives zero rows for
fully masked queries."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim, export

from multihead import MultiheadAttention, RotaryEmbedding
from multihead.attend import reference
from multihead.masks import build_mask

E, H = 16, 4
D = E // H
BATCH, LENGTH = Dim("B", min=2, max=64), Dim("L", min=2, max=256)


class Call(nn.Module):
    """module(x, x, x, ...) with the masks as graph inputs."""

    def __init__(self, module: nn.Module, need_weights: bool, **flags) -> None:
        super().__init__()
        self.module, self.need_weights, self.flags = module, need_weights, flags

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        out, weights = self.module(
            x,
            x,
            x,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=self.need_weights,
            **self.flags,
        )
        return (out, weights) if self.need_weights else (out,)


def _inputs(batch: int, length: int, seed: int = 0):
    """x (B, L, E), a bool key padding (B, L) hiding every key of element 0, a float attn_mask (L, L)
    hiding every key from the last query."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, E, generator=g)
    padding = torch.rand(batch, length, generator=g) < 0.3
    padding[0] = True
    attn = torch.randn(length, length, generator=g)
    attn[-1] = float("-inf")
    return x, padding, attn


def _check(program, call: Call, batch: int, length: int):
    x, padding, attn = _inputs(batch, length, seed=length)
    got = program.module()(x, padding, attn)
    want = call(x, padding, attn)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bias = call.module.out_proj.bias
    torch.testing.assert_close(got[0][0], bias.expand(length, E), rtol=0, atol=1e-6)  # element 0: all padding
    torch.testing.assert_close(got[0][:, -1], bias.expand(batch, E), rtol=0, atol=1e-6)  # last row: all hidden
    if call.need_weights:
        assert not got[1][0].any() and not got[1][:, -1].any()


def _no_logsumexp(program) -> None:
    """No node reads the CPU flash op's second output (after decompositions it is not the log-sum-exp)."""
    for node in program.graph.nodes:
        assert "multihead" not in str(node.target), "our custom op is not for exporters"
        if node.op == "call_function" and "flash_attention" in str(node.target):
            for user in node.users:
                assert user.args[1] == 0, f"{user} reads output {user.args[1]} of {node.target}"


CONFIGS = {
    "plain": ({}, {}),
    "gqa_rope": ({"num_kv_heads": 2, "rotary": RotaryEmbedding(D, max_seq_len=256)}, {}),
    "window_causal": ({"window": (3, 0)}, {}),
}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_export_dynamic_batch_and_length(one_thread, config, need_weights):
    module_kw, flags = CONFIGS[config]
    torch.manual_seed(0)
    call = Call(MultiheadAttention(E, H, **module_kw).eval(), need_weights, **flags)
    dynamic = ({0: BATCH, 1: LENGTH}, {0: BATCH, 1: LENGTH}, {0: LENGTH, 1: LENGTH})
    program = export(call, _inputs(3, 9), dynamic_shapes=dynamic)
    _check(program, call, 4, 13)
    decomposed = program.run_decompositions()
    _no_logsumexp(decomposed)
    for batch, length in ((2, 5), (5, 17)):
        _check(decomposed, call, batch, length)


def test_export_per_head_weights_3d_mask(one_thread):
    """average_attn_weights=False and a bool (B*H, L, L) mask (a derived dim)."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H).eval()

    class PerHead(nn.Module):
        def forward(self, x, mask):
            return module(x, x, x, attn_mask=mask, average_attn_weights=False)

    def make(batch, length):
        x = torch.randn(batch, length, E)
        mask = torch.rand(batch * H, length, length) < 0.3
        mask[:, :, 0] = False
        return x, mask

    program = export(
        PerHead(), make(3, 7), dynamic_shapes=({0: BATCH, 1: LENGTH}, {0: H * BATCH, 1: LENGTH, 2: LENGTH})
    )
    program = program.run_decompositions()
    x, mask = make(2, 11)
    got, want = program.module()(x, mask), module(x, x, x, attn_mask=mask, average_attn_weights=False)
    assert got[1].shape == (2, H, 11, 11)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("need_weights", [True, False])
def test_exportable_backend_vs_float64_reference(need_weights):
    """The backend that serves exports, forced in eager, against the float64 oracle: masks, GQA, fully
    masked rows, per-head and averaged weights, forward and backward."""
    from multihead.attend import exportable

    g = torch.Generator().manual_seed(0)
    B, L, S, Hkv = 2, 6, 7, 2
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    padding = torch.rand(B, S, generator=g) < 0.3
    padding[1] = True
    attn = torch.randn(L, S, generator=g, dtype=torch.float64)
    attn[2] = float("-inf")
    mask = build_mask(
        attn_mask=attn,
        key_padding_mask=padding,
        is_causal=False,
        batch=B,
        heads=H,
        q_len=L,
        k_len=S,
        batched=True,
        device=q.device,
    )
    for average in (True, False):
        kw = {"scale": D**-0.5, "dropout_p": 0.0, "need_weights": need_weights, "average_weights": average}
        got = exportable.attend(q, k, v, mask, **kw)
        want = reference.attend(q, k, v, mask, **kw)
        loss_got = got[0].square().sum() + (got[1].square().sum() if need_weights else 0)
        loss_want = want[0].square().sum() + (want[1].square().sum() if need_weights else 0)
        for a, b in zip(torch.autograd.grad(loss_got, (q, k, v)), torch.autograd.grad(loss_want, (q, k, v))):
            torch.testing.assert_close(a, b)
            assert torch.isfinite(a).all()
        torch.testing.assert_close(got[0], want[0])
        if need_weights:
            torch.testing.assert_close(got[1], want[1])
        assert not got[0][1].any() and not got[0][:, :, 2].any()
