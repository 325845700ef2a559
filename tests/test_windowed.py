"""The windowed backend (`attend/windowed.py`) against the float64 reference.

Two levels: the backend call itself (q, k, v and an `AttentionMask`, every mask part, forced chunk
sizes so both the batched body and the per-chunk edges run), and the module
(`MultiheadAttention(window=...)` with `backend="windowed"`) against a float64 copy on the reference
backend, forward and backward. Pass rule (flash-attn): error against float64 at most twice the error
of the float32 reference backend, plus a small absolute floor.

Notation: B batch, H heads, Hkv key/value heads, L query length, S key length, D head dim.
"""

from __future__ import annotations

import copy

import pytest
import torch

import multihead.attend as A
from multihead import MultiheadAttention
from multihead.attend import reference, windowed
from multihead.masks import AttentionMask

from helpers import assert_flash_rule


@pytest.fixture(autouse=True, scope="module")
def _registered_one_thread():
    """The backend in the dispatch table (first), and one thread: tiny sizes, pool overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(A.BACKENDS, "windowed", windowed)
        if "windowed" not in A.PRIORITY:
            mp.setattr(A, "PRIORITY", ("windowed", *A.PRIORITY))
        yield
    torch.set_num_threads(threads)


def run(backend, q, k, v, mask, grad, dropout_p=0.0, **kw):
    """out and grads of q, k, v for sum(out * grad)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, weights = backend.attend(
        q, k, v, mask, scale=q.shape[-1] ** -0.5, dropout_p=dropout_p, need_weights=False, average_weights=True, **kw
    )
    assert weights is None
    (out * grad).sum().backward()
    return out, q.grad, k.grad, v.grad


def mask_for(B, H, L, S, *, causal=False, offset=0, window=None, padding=None, dense=None, dense_heads=False, g=None):
    """An AttentionMask with optional key padding / dense parts ("bool" or "float") in float64."""
    key_padding = None
    if padding == "bool":
        key_padding = torch.rand(B, S, generator=g) < 0.3
    elif padding == "float":
        key_padding = torch.randn(B, S, generator=g, dtype=torch.float64)
    shape = (B, H, L, S) if dense_heads else (1, 1, L, S)
    dense_part = None
    if dense == "bool":
        dense_part = torch.rand(shape, generator=g) < 0.25
    elif dense == "float":
        dense_part = torch.randn(shape, generator=g, dtype=torch.float64)
    return AttentionMask(B, H, L, S, causal, offset, window, key_padding, dense_part)


def low(mask: AttentionMask) -> AttentionMask:
    """The same mask with float parts in float32."""
    parts = {}
    for name in ("key_padding", "dense"):
        t = getattr(mask, name)
        parts[name] = t.float() if t is not None and t.is_floating_point() else t
    return AttentionMask(mask.batch, mask.heads, mask.q_len, mask.k_len, mask.causal, mask.offset, mask.window, **parts)


# (B, H, Hkv, L, S, causal, offset, window, padding, dense, dense_heads)
CASES = {
    "causal_w": (2, 4, 4, 97, 97, True, 0, (11, 0), None, None, False),
    "w0_no_causal_flag": (1, 4, 4, 97, 97, False, 0, (11, 0), None, None, False),
    "symmetric": (2, 4, 4, 97, 97, False, 0, (6, 6), None, None, False),
    "asymmetric": (1, 4, 2, 90, 90, False, 0, (2, 9), None, None, False),
    "diagonal_only": (1, 2, 2, 50, 50, False, 0, (0, 0), None, None, False),
    "right_unbounded": (2, 4, 4, 70, 70, False, 0, (5, None), "bool", None, False),
    "causal_clips_right": (1, 4, 4, 80, 80, True, 0, (7, 4), None, None, False),
    "bottom_right_offset": (2, 4, 2, 61, 90, True, 29, (12, 0), None, None, False),
    "cross_offset_window": (2, 4, 4, 64, 120, False, 20, (9, 5), "float", None, False),
    "negative_offset_empty_rows": (1, 4, 4, 90, 70, True, -25, (6, 0), None, None, False),
    "offset_past_keys": (1, 2, 2, 90, 60, False, 10, (3, 3), None, None, False),
    "padding_bool": (2, 4, 4, 97, 97, True, 0, (13, 0), "bool", None, False),
    "padding_float": (2, 4, 4, 97, 97, False, 0, (8, 8), "float", None, False),
    "dense_bool": (2, 4, 4, 97, 97, True, 0, (13, 0), None, "bool", False),
    "dense_float_per_head": (2, 4, 2, 97, 110, False, 5, (8, 3), "bool", "float", True),
    "dense_bool_per_head_gqa": (1, 6, 2, 97, 97, True, 0, (10, 0), "float", "bool", True),
    "gqa": (2, 6, 3, 97, 97, True, 0, (17, 0), None, None, False),
}


@pytest.mark.parametrize("chunk", [None, 7, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_attend_matches_float64_reference(case, chunk):
    B, H, Hkv, L, S, causal, offset, window, padding, dense, dense_heads = CASES[case]
    g = torch.Generator().manual_seed(list(CASES).index(case))
    D = 8
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    grad = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    mask = mask_for(B, H, L, S, causal=causal, offset=offset, window=window, padding=padding, dense=dense,
                    dense_heads=dense_heads, g=g)  # fmt: skip
    exact = run(reference, q, k, v, mask, grad)
    f32 = [t.float() for t in (q, k, v)]
    theirs = run(reference, *f32, low(mask), grad.float())
    ours = run(windowed, *f32, low(mask), grad.float(), chunk=chunk)
    for name, o, t, x in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert torch.isfinite(o).all(), name
        assert_flash_rule(o, t, x, f"{case} chunk={chunk} {name}", atol=1e-6)


def test_cases_cover_body_and_edges():
    """The cases above run both paths: a batched body of >= 2 chunks, and per-chunk edges."""
    for case in ("causal_w", "symmetric", "cross_offset_window", "dense_float_per_head", "gqa"):
        B, H, _, L, S, causal, offset, window, *_ = CASES[case]
        mask = AttentionMask(B, H, L, S, causal, offset, window)
        for size in (7, 16):
            lo, hi = windowed._body(mask, size)
            assert hi - lo >= 2, (case, size, lo, hi)
            if case != "cross_offset_window":  # there the body is every chunk
                assert lo > 0 or hi * size < L, (case, size, lo, hi)
    mask = AttentionMask(1, 1, 70, 70, window=(5, None))
    assert windowed._body(mask, 16) == (0, 0)  # an unbounded right reach: edges only


def test_no_grad_output_equals_autograd_output():
    """The preallocated output (no autograd) and the concatenated one (autograd) are the same."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 100, 8, generator=g) for _ in range(3))
    mask = AttentionMask(2, 4, 100, 100, causal=True, window=(9, 0), key_padding=torch.rand(2, 100, generator=g) < 0.2)
    kw = dict(scale=0.3, dropout_p=0.0, need_weights=False, average_weights=True, chunk=16)
    with torch.no_grad():
        plain = windowed.attend(q, k, v, mask, **kw)[0]
    tracked = windowed.attend(q.requires_grad_(), k, v, mask, **kw)[0]
    assert tracked.requires_grad
    assert torch.equal(plain, tracked.detach())


def test_band_cached_under_inference_mode_serves_autograd_later():
    """Band masks are cached across calls; one first built under inference_mode must still be
    usable (saved for backward) by a later call that records autograd."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 75, 8, generator=g) for _ in range(3))
    mask = AttentionMask(1, 2, 75, 75, causal=True, window=(13, 0))  # a geometry no other test uses
    kw = dict(scale=8**-0.5, dropout_p=0.0, need_weights=False, average_weights=True, chunk=11)
    with torch.inference_mode():
        first = windowed.attend(q, k, v, mask, **kw)[0]
    out, dq, _, _ = run(windowed, q, k, v, mask, torch.ones_like(q), chunk=11)
    assert torch.equal(first, out.detach()) and torch.isfinite(dq).all()


def test_fully_masked_rows_give_zeros_and_zero_grads():
    """Rows with no visible key: a chunk with no key in reach (negative offset), and rows whose
    whole window is padding. Output rows are exactly zero, their q grads too, all grads finite."""
    B, H, L, S, D = 2, 2, 64, 64, 8
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 30:50] = True  # batch 1: rows 30 + 4 ... 49 see only padding through a (4, 0) window
    mask = AttentionMask(B, H, L, S, causal=True, offset=-20, window=(4, 0), key_padding=padding)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    out, dq, dk, dv = run(windowed, q, k, v, mask, torch.ones(B, H, L, D), chunk=8)
    empty = torch.ones(B, L, dtype=torch.bool)  # row i sees keys i - 24 ... i - 20
    for b in range(B):
        for i in range(L):
            empty[b, i] = padding[b, max(0, i - 24) : max(0, i - 19)].all()
    assert empty[:, :20].all() and empty[1, 54:].all() and not empty[0, 20:].any()
    rows = empty[:, None, :, None].expand_as(out)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert (out[~rows] != 0).any()
    exact = run(reference, *(t.double() for t in (q, k, v)), mask, torch.ones(B, H, L, D, dtype=torch.float64))
    torch.testing.assert_close(out.double(), exact[0], atol=1e-5, rtol=1e-5)


def test_dropout_is_unbiased_and_differentiable():
    """With dropout the output is random, finite, differentiable, and its mean over draws is the
    output without dropout (inverted dropout keeps the expectation)."""
    torch.manual_seed(0)
    B, H, L, D = 1, 2, 80, 8
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    mask = AttentionMask(B, H, L, L, causal=True, window=(9, 0))
    kw = dict(scale=D**-0.5, need_weights=False, average_weights=True, chunk=16)
    with torch.no_grad():
        plain = windowed.attend(q, k, v, mask, dropout_p=0.0, **kw)[0]
        draws = torch.stack([windowed.attend(q, k, v, mask, dropout_p=0.3, **kw)[0] for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean(0) - plain).abs().mean() < 0.05 * plain.abs().mean()
    out, dq, dk, dv = run(windowed, q, k, v, mask, torch.ones(B, H, L, D), dropout_p=0.3, chunk=16)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv)) and dq.abs().sum() > 0


# ---- through the module ------------------------------------------------------------------------
def randomized(module: MultiheadAttention, seed: int = 0) -> MultiheadAttention:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return module


MODULE_CASES = {
    # window, num_kv_heads, is_causal, L, S, key padding, attn_mask kind
    "int_window_causal": (24, None, True, 200, 200, False, None),
    "w0_tuple_not_causal": ((24, 0), 2, False, 200, 200, False, None),
    "symmetric": ((10, 10), None, False, 150, 150, True, None),
    "causal_clips_right": ((16, 8), 2, True, 150, 150, False, None),
    "cross_attention": ((12, 4), 2, False, 150, 170, True, None),
    "bool_attn_mask": ((20, 0), None, False, 170, 170, False, "bool"),
    "float_attn_mask_gqa": ((14, 14), 2, False, 150, 150, True, "float3d"),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_matches_float64_reference(case):
    window, kv_heads, is_causal, L, S, with_padding, attn_kind = MODULE_CASES[case]
    E, H, B = 16, 4, 2
    ours = randomized(MultiheadAttention(E, H, window=window, num_kv_heads=kv_heads))
    exact = copy.deepcopy(ours).double()
    exact.backend = "reference"
    theirs = copy.deepcopy(ours)
    theirs.backend = "reference"
    ours.backend = "windowed"

    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    kv = x if L == S else torch.randn(B, S, E, generator=g, dtype=torch.float64)
    kw = {"need_weights": False, "is_causal": is_causal}
    if with_padding:
        kw["key_padding_mask"] = torch.rand(B, S, generator=g) < 0.2
    if attn_kind == "bool":
        kw["attn_mask"] = torch.rand(L, S, generator=g) < 0.2
    elif attn_kind == "float3d":
        kw["attn_mask"] = torch.randn(B * H, L, S, generator=g, dtype=torch.float64)
    grad = torch.randn(B, L, E, generator=g, dtype=torch.float64)

    def forward_backward(module, dtype):
        q = x.detach().to(dtype).requires_grad_()
        k = q if kv is x else kv.detach().to(dtype).requires_grad_()
        args = {n: (a.to(dtype) if a.is_floating_point() else a) if torch.is_tensor(a) else a for n, a in kw.items()}
        out, w = module(q, k, k, **args)
        assert w is None
        (out * grad.to(dtype)).sum().backward()
        grads = {"d_query": q.grad} | ({} if k is q else {"d_key": k.grad})
        return out, grads | {n: p.grad for n, p in module.named_parameters()}

    x_out, x_grads = forward_backward(exact, torch.float64)
    t_out, t_grads = forward_backward(theirs, torch.float32)
    o_out, o_grads = forward_backward(ours, torch.float32)
    assert_flash_rule(o_out, t_out, x_out, f"{case} out", atol=1e-6)
    for name in x_grads:
        assert_flash_rule(o_grads[name], t_grads[name], x_grads[name], f"{case} {name}", atol=1e-5)


def test_dispatch_picks_windowed_where_it_pays():
    """Dispatch: windowed serves long sequences with a narrow window, and says why it refuses others."""
    m = MultiheadAttention(16, 4, window=16)
    x = torch.randn(1, 512, 16)
    q = torch.randn(1, 4, 512, 4)
    narrow = AttentionMask(1, 4, 512, 512, causal=True, window=(16, 0))
    assert A.choose(q, q, q, narrow, need_weights=False) is windowed
    assert windowed.not_supported_reasons(q, q, q, narrow, need_weights=True) == [
        "does not return attention weights (need_weights=True)"
    ]
    for wide in ((400, 0), (200, 200)):
        mask = AttentionMask(1, 4, 512, 512, window=wide)
        assert windowed.not_supported_reasons(q, q, q, mask, need_weights=False) == ["window too wide to pay"]
    short = AttentionMask(1, 4, 64, 64, window=(4, 0))
    assert windowed.not_supported_reasons(q, q, q, short, need_weights=False) == ["window too wide to pay"]
    for unbounded in (AttentionMask(1, 4, 512, 512, causal=True), AttentionMask(1, 4, 512, 512, window=(None, 3))):
        assert windowed.not_supported_reasons(q, q, q, unbounded, need_weights=False) == [
            "no window with a finite left reach"
        ]
    # the module's forward goes through dispatch too
    m.backend = "windowed"
    with torch.no_grad():
        forced = m(x, x, x, need_weights=False)[0]
        m.backend = None
        chosen = m(x, x, x, need_weights=False)[0]
        m.backend = "reference"
        exact = m(x, x, x, need_weights=False)[0]
    assert torch.equal(forced, chosen)
    torch.testing.assert_close(forced, exact)


def test_chunk_size_grows_with_the_window():
    sizes = [windowed.chunk_size(AttentionMask(1, 1, 4096, 4096, window=(w, 0))) for w in (8, 256, 512, 1024, 4000)]
    assert sizes == [32, 32, 32, 64, 128]
    assert all(windowed.MIN_CHUNK <= s <= windowed.MAX_CHUNK for s in sizes)
