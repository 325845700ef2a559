"""The direct backend (`attend/direct.py`): calls that fit one blockwise tile, in plain batched ops.

Checked against both oracles (torch's module and our float64 reference), forward and backward, on
both of its layouts (short rows, S * itemsize < one SIMD register: softmax over an (S, B, H, L) copy;
longer rows: the usual (B, H, L, S)), over masks, GQA, dropout, fully masked rows, float64 gradcheck;
and dispatch: it serves small calls with weights and gives way to blockwise beyond one tile.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import multihead.attend as backends
from multihead import MultiheadAttention
from multihead.attend import blockwise, direct, reference
from multihead.masks import build_mask

from helpers import assert_flash_rule, cotangent, inputs, pair

F64 = torch.float64
# S = 5 takes the short-row layout on every CPU with 32-byte registers or wider, S = 37 the usual
# one; the `layout` fixture forces each layout whatever this CPU has
LENGTHS = pytest.mark.parametrize("k_len", [5, 37])


@pytest.fixture(params=["short_rows", "long_rows"])
def layout(request, monkeypatch):
    """Force the short-row layout (every row shorter than the register) or the usual one."""
    monkeypatch.setattr(direct, "vector_bytes", lambda: 2**30 if request.param == "short_rows" else 0)
    return request.param


MASKS = ["none", "is_causal", "bool2d", "float2d", "causal_float", "kpm_bool", "kpm_float", "both", "bool3d"]


def _masks(kind: str, B: int, H: int, L: int, S: int, g: torch.Generator):
    """(attn_mask, key_padding_mask, is_causal) for a mask kind; every row keeps key 0 visible."""
    attn = kpm = None
    causal = kind == "is_causal"
    if kind in ("bool2d", "both"):
        attn = torch.rand(L, S, generator=g) < 0.3
        attn[:, 0] = False
    elif kind == "float2d":
        attn = torch.randn(L, S, generator=g)
    elif kind == "causal_float":  # recognised as the causal pattern (L == S here)
        attn = torch.zeros(L, S).masked_fill_(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    elif kind == "bool3d":
        attn = torch.rand(B * H, L, S, generator=g) < 0.3
        attn[..., 0] = False
    if kind in ("kpm_bool", "both"):
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[:, 0] = False
    elif kind == "kpm_float":
        kpm = torch.zeros(B, S).masked_fill_(torch.rand(B, S, generator=g) < 0.3, float("-inf"))
        kpm[:, 0] = 0.0
    return attn, kpm, causal


def _run(module, q, k, v, attn, kpm, causal, average=True):
    out, w = module(q, k, v, attn_mask=attn, key_padding_mask=kpm, is_causal=causal, average_attn_weights=average)
    g = torch.Generator().manual_seed(7)
    loss = (out * cotangent(out, g)).sum() + (w * cotangent(w, g)).sum()
    grads = torch.autograd.grad(loss, [q, k, v, *module.parameters()])
    return out, w, grads


@LENGTHS
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_matches_torch_and_the_float64_reference(mask, k_len, batch_first, layout, one_thread):
    """Outputs, weights (averaged and per head) and every gradient: torch's module and ours (forced
    to direct) against the float64 reference, by the flash-attn rule."""
    B, E, H = 3, 16, 4
    L = k_len if mask == "causal_float" else 7
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=batch_first)
    ours.backend = "direct"
    exact = MultiheadAttention.from_torch(copy.deepcopy(theirs).to(F64))
    exact.backend = "reference"
    g = torch.Generator().manual_seed(3)
    attn, kpm, causal = _masks(mask, B, H, L, k_len, g)
    q, k, v = inputs(B, L, k_len, E, E, E, batch_first, torch.float32)
    t_attn = attn
    if causal:  # torch needs the mask itself: is_causal is only a hint there
        t_attn = torch.ones(L, k_len, dtype=torch.bool).triu(1)
    for average in (True, False):
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        args64 = [t.detach().to(F64).requires_grad_() for t in (q, k, v)]
        o_out, o_w, o_g = _run(ours, *args, attn, kpm, causal, average)
        t_out, t_w, t_g = _run(
            theirs, *[t.detach().clone().requires_grad_() for t in args], t_attn, kpm, False, average
        )
        a64 = attn.to(F64) if attn is not None and attn.is_floating_point() else attn
        k64 = kpm.to(F64) if kpm is not None and kpm.is_floating_point() else kpm
        e_out, e_w, e_g = _run(exact, *args64, a64, k64, causal, average)
        assert_flash_rule(o_out, t_out, e_out, f"out {mask}")
        assert_flash_rule(o_w, t_w, e_w, f"weights {mask}")
        for i, (og, tg, eg) in enumerate(zip(o_g, t_g, e_g)):
            assert_flash_rule(og, tg, eg, f"grad {i} {mask}")


@LENGTHS
def test_grouped_query_heads_match_the_reference(k_len, layout):
    """GQA (H = 6 query heads on Hkv = 2 kv heads), with a key padding and a causal mask: attend()
    against the reference backend in float64, forward and backward (torch has no GQA)."""
    B, H, Hkv, L, D = 2, 6, 2, 5, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, Hkv, k_len, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, Hkv, k_len, D, generator=g, dtype=F64, requires_grad=True)
    kpm = torch.rand(B, k_len, generator=g) < 0.3
    kpm[:, 0] = False
    mask = build_mask(
        attn_mask=None,
        key_padding_mask=kpm,
        is_causal=True,
        batch=B,
        heads=H,
        q_len=L,
        k_len=k_len,
        batched=True,
        device=q.device,
    )
    for average in (True, False):
        kw = dict(scale=D**-0.5, dropout_p=0.0, need_weights=True, average_weights=average)
        out, w = direct.attend(q, k, v, mask, **kw)
        ref_out, ref_w = reference.attend(q, k, v, mask, **kw)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(w, ref_w)
        d_out, d_w = torch.randn_like(out), torch.randn_like(w)
        grads = torch.autograd.grad((out * d_out).sum() + (w * d_w).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_w * d_w).sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)


@LENGTHS
def test_dropout_weights_are_the_ones_applied(k_len, layout):
    """With dropout, the per-head weights returned rebuild the output: out = out_proj(W @ V)."""
    B, L, E, H = 2, 6, 16, 4
    D = E // H
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, dropout=0.5)
    m.backend = "direct"
    q = torch.randn(B, L, E)
    kv = torch.randn(B, k_len, E)
    out, w = m(q, kv, kv, average_attn_weights=False)  # w: (B, H, L, S)
    assert (w == 0).any() and (w > 1.0 / k_len).any()  # dropout zeroed some and scaled the rest
    v = F.linear(kv, m.in_proj_weight[2 * E :], m.in_proj_bias[2 * E :]).view(B, k_len, H, D).transpose(1, 2)
    rebuilt = m.out_proj((w @ v).transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(out, rebuilt)
    torch.manual_seed(1)  # and the weights are a fresh draw each call, with the right mean
    w2 = m(q, kv, kv, average_attn_weights=False)[1]
    assert not torch.equal(w, w2)


@LENGTHS
@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_zeros_and_finite_zero_gradients(k_len, need_weights, layout):
    B, L, E, H = 2, 4, 8, 2
    m = MultiheadAttention(E, H)
    m.backend = "direct"
    q = torch.randn(B, L, E, requires_grad=True)
    kv = torch.randn(B, k_len, E, requires_grad=True)
    kpm = torch.zeros(B, k_len, dtype=torch.bool)
    kpm[1] = True  # every row of batch element 1 sees no key
    attn = torch.zeros(L, k_len)
    attn[2] = float("-inf")  # row 2 of every batch element sees no key
    out, w = m(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
    bias = m.out_proj.bias
    torch.testing.assert_close(out[1], bias.expand_as(out[1]))
    torch.testing.assert_close(out[:, 2], bias.expand_as(out[:, 2]))
    if need_weights:
        assert torch.equal(w[1], torch.zeros_like(w[1])) and torch.equal(w[:, 2], torch.zeros_like(w[:, 2]))
        torch.testing.assert_close(w[0, [0, 1, 3]].sum(-1), torch.ones(3))
    (out.sum() + (w.sum() if w is not None else 0)).backward()
    for t in (q, kv, *m.parameters()):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(q.grad[:, 2], torch.zeros_like(q.grad[:, 2]))


@pytest.mark.parametrize("k_len", [3, 9])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(k_len, dropout, layout):
    """gradcheck and gradgradcheck of attend() in float64 with a fully masked row, on both layouts."""
    B, H, L, D = 1, 2, 3, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, k_len, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, k_len, D, generator=g, dtype=F64, requires_grad=True)
    hidden = torch.zeros(L, k_len, dtype=torch.bool)
    hidden[1] = True
    mask = build_mask(
        attn_mask=hidden,
        key_padding_mask=None,
        is_causal=False,
        batch=B,
        heads=H,
        q_len=L,
        k_len=k_len,
        batched=True,
        device=q.device,
    )

    def f(q, k, v):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return direct.attend(q, k, v, mask, scale=0.7, dropout_p=dropout, need_weights=True, average_weights=False)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_dispatch_takes_direct_for_one_tile_calls_with_weights(monkeypatch):
    q = torch.randn(2, 4, 40, 8)
    mask = build_mask(
        attn_mask=None,
        key_padding_mask=None,
        is_causal=False,
        batch=2,
        heads=4,
        q_len=40,
        k_len=40,
        batched=True,
        device=q.device,
    )
    assert backends.choose(q, q, q, mask, need_weights=True) is direct
    assert backends.choose(q, q, q, mask, need_weights=False).name == "sdpa"
    # beyond one tile of the blockwise budget (here made tiny), blockwise takes over
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 4 * 4 * 40 * 4)  # 4 query rows of 4 heads (tiles take >= 16)
    assert blockwise.choose_tiles(2, 4, 40, 40, 4, q.device)[1] < 40
    assert backends.choose(q, q, q, mask, need_weights=True) is blockwise
    reasons = backends.explain(q, q, q, mask, need_weights=True)["direct"]
    assert reasons and "one blockwise tile" in reasons[0]


def test_dispatch_remembers_its_choice_by_what_the_choice_depends_on(monkeypatch):
    """Eager calls walk the table once per shape, dtype, mask structure and setting; a setting the
    backends read (a tile budget, the table itself) changes the answer at once; a forced backend and
    a compiling call are never served from memory."""
    q = torch.randn(2, 4, 40, 8)
    mask = build_mask(
        attn_mask=None, key_padding_mask=None, is_causal=False, batch=2, heads=4, q_len=40, k_len=40,
        batched=True, device=q.device,
    )  # fmt: skip
    monkeypatch.setattr(backends, "_choices", {})
    assert backends.choose(q, q, q, mask, need_weights=True) is direct
    asked = []
    real = direct.not_supported_reasons
    monkeypatch.setattr(direct, "not_supported_reasons", lambda *a, **kw: asked.append(1) or real(*a, **kw))
    assert backends.choose(q, q, q, mask, need_weights=True) is direct and asked == []  # remembered
    assert backends.choose(q.double(), q.double(), q.double(), mask, need_weights=True) is direct and asked == [1]
    assert backends.choose(q, q, q, mask, need_weights=True, backend="direct") is direct  # forced: asked again
    assert asked == [1, 1]
    entries = len(backends._choices)
    assert backends.choose(q, q, q, mask, need_weights=True, remember=False) is direct  # a cache step's call
    assert asked == [1, 1, 1] and len(backends._choices) == entries
    asked.pop()
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 4 * 4 * 40 * 4)  # tiles of 16 rows: no longer one tile
    assert backends.choose(q, q, q, mask, need_weights=True) is blockwise and asked == [1, 1, 1]
    monkeypatch.setattr(backends, "PRIORITY", ("reference",))
    assert backends.choose(q, q, q, mask, need_weights=True) is reference
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends._choice_key(q, q, q, mask, True) is None


def test_an_empty_row_made_by_two_masks_together_is_found():
    """No single mask hides every key of row 0 of batch element 1, the causal band and the padding
    together do: the plain softmax would give NaN there, the safe one zeros (see _may_have_empty_rows)."""
    B, L, E, H = 2, 5, 8, 2
    m = MultiheadAttention(E, H)
    x = torch.randn(B, L, E, requires_grad=True)
    kpm = torch.zeros(B, L)
    kpm[1, 0] = float("-inf")  # key 0 of batch element 1 is padding; its query 0 sees only key 0
    m.backend = "direct"
    out, w = m(x, x, x, key_padding_mask=kpm, is_causal=True, attn_mask=_causal(L))
    m.backend = "reference"
    ref_out, ref_w = m(x, x, x, key_padding_mask=kpm, is_causal=True, attn_mask=_causal(L))
    assert torch.equal(w[1, 0], torch.zeros(L)) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def test_priority_puts_direct_between_sdpa_and_blockwise():
    order = backends.PRIORITY
    assert order.index("sdpa") < order.index("direct") < order.index("blockwise")


@pytest.mark.parametrize(
    ("capability", "expected"), [("AVX512", 64), ("AVX2", 32), ("SVE256", 32), ("DEFAULT", 16), ("NO AVX", 16)]
)
def test_vector_bytes_follows_the_cpu_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    direct.vector_bytes.cache_clear()
    try:
        assert direct.vector_bytes() == expected
    finally:
        direct.vector_bytes.cache_clear()


def test_cached_band_serves_inference_mode_then_autograd(layout, one_thread):
    """The causal band is cached across calls: one built under inference_mode must still serve a
    call that records autograd, and no call may write into it."""
    m = MultiheadAttention(8, 2)
    m.backend = "direct"
    x = torch.randn(2, 5, 8)
    with torch.inference_mode():
        first = m(x, x, x, is_causal=True)[1]
    xg = x.clone().requires_grad_()
    out, w = m(xg, xg, xg, is_causal=True)
    (out.sum() + w.sum()).backward()
    assert torch.isfinite(xg.grad).all()
    torch.testing.assert_close(w, first)
    again = m(x, x, x, is_causal=True)[1]
    torch.testing.assert_close(again, first)
    assert torch.equal(torch.triu(first, 1), torch.zeros_like(first))  # still causal
