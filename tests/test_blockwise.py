"""The blockwise backend (`attend/blockwise.py`): query-blocked attention with weights in O(B*L*S)
memory and a recomputing, itself differentiable, backward.

Checked against the float64 reference backend by the flash-attn rule (our float32 error at most 2x
the float32 reference's own error, plus a tiny floor), and against torch.nn.MultiheadAttention
through the module: forward and backward, averaged and per-head weights, every mask kind, grouped
query heads, rows with no visible key, odd sizes and block sizes that do not divide L; gradcheck and
gradgradcheck in float64, with dropout under a fixed seed.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import multihead.attend as backends
from multihead.attend import blockwise, reference
from multihead.masks import AttentionMask, build_mask

from helpers import assert_flash_rule, inputs, pair

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def registered(monkeypatch):
    """The backend in the dispatch table (until the lead registers it for real)."""
    if "blockwise" not in backends.BACKENDS:
        monkeypatch.setitem(backends.BACKENDS, "blockwise", blockwise)
    if "blockwise" not in backends.PRIORITY:  # after every backend without weights, before the reference
        order = list(backends.PRIORITY)
        order.insert(order.index("reference") if "reference" in order else len(order), "blockwise")
        monkeypatch.setattr(backends, "PRIORITY", tuple(order))


# ---- masks -----------------------------------------------------------------------------------------
MASKS = [
    "none",
    "causal",
    "causal_L>S",  # top-left aligned, L != S: the last rows see every key
    "causal_bottom_right",  # offset = S - L (a KV cache)
    "causal_negative_offset",  # the first rows see no key at all
    "window",
    "window_left_only",
    "kpm_bool",
    "kpm_float",
    "dense2d_bool",
    "dense2d_float",
    "dense3d_bool",
    "dense3d_float",
    "causal+kpm",
    "window+dense3d_float",
]


def make_mask(kind: str, B: int, H: int, L: int, S: int, seed: int = 0) -> AttentionMask:
    """An AttentionMask of the given kind: user masks go through `build_mask` as the module builds
    them; band structure (offset, window) is set directly."""
    g = torch.Generator().manual_seed(seed)
    attn_mask = kpm = None
    band = {}
    if kind.startswith("causal"):
        band = dict(causal=True)
        if kind == "causal_bottom_right":
            band["offset"] = S - L
        elif kind == "causal_negative_offset":
            band["offset"] = -3
    elif kind == "window":
        band = dict(window=(3, 2))
    elif kind == "window_left_only":
        band = dict(window=(4, None), offset=1)
    elif kind.startswith("window+"):
        band = dict(window=(2, 5))
    if "kpm_bool" in kind or kind == "causal+kpm":
        kpm = torch.rand(B, S, generator=g) < 0.3
    elif "kpm_float" in kind:
        kpm = torch.randn(B, S, generator=g)
    if "dense2d_bool" in kind:
        attn_mask = torch.rand(L, S, generator=g) < 0.3
    elif "dense2d_float" in kind:
        attn_mask = torch.randn(L, S, generator=g)
    elif "dense3d_bool" in kind:
        attn_mask = torch.rand(B * H, L, S, generator=g) < 0.3
    elif "dense3d_float" in kind:
        attn_mask = torch.randn(B * H, L, S, generator=g)
    mask = build_mask(
        attn_mask=attn_mask,
        key_padding_mask=kpm,
        is_causal=False,
        batch=B,
        heads=H,
        q_len=L,
        k_len=S,
        batched=True,
        device=torch.device("cpu"),
    )
    return AttentionMask(**{**mask.__dict__, **band})


# ---- running a backend -----------------------------------------------------------------------------
def run(attend, q, k, v, mask, *, average=True, need_weights=True, dropout_p=0.0, seed=0, **kw):
    """Forward and backward of `attend` on leaf copies of q/k/v in q's dtype, with fixed random
    cotangents on the output and on the weights. Returns (out, weights, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out, w = attend(
        q,
        k,
        v,
        mask,
        scale=q.shape[-1] ** -0.5,
        dropout_p=dropout_p,
        need_weights=need_weights,
        average_weights=average,
        **kw,
    )
    g = torch.Generator().manual_seed(99)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)).sum()
    return (out, w, *torch.autograd.grad(loss, (q, k, v)))


def qkv(B, H, Hkv, L, S, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, L, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
    )


NAMES = ("out", "weights", "dq", "dk", "dv")


def check_against_reference(q, k, v, mask, *, average, rows, need_weights=True):
    """Our float32 result vs the float64 reference by the flash-attn rule, for out, weights and grads."""
    ours = run(blockwise.attend, q, k, v, mask, average=average, need_weights=need_weights, block_rows=rows)
    low = run(reference.attend, q, k, v, mask, average=average, need_weights=need_weights)
    exact = run(reference.attend, q.double(), k.double(), v.double(), mask, average=average, need_weights=need_weights)
    for name, a, b, c in zip(NAMES, ours, low, exact):
        if c is None:
            assert a is None and b is None, name
            continue
        assert a.shape == c.shape and a.dtype == q.dtype, name
        assert torch.isfinite(a).all(), name
        # a tiny floor, relative to the size of the values (a GQA dV sums r*G products in one GEMM)
        assert_flash_rule(a, b, c, name, atol=1e-6 * max(1.0, c.abs().max().item()))
    return ours


# ---- against the float64 reference -------------------------------------------------------------------
@pytest.mark.parametrize("average", [True, False], ids=["avg", "per_head"])
@pytest.mark.parametrize("kind", MASKS)
def test_every_mask_against_reference(kind, average):
    B, H, L, S, D = 2, 4, 23, 19, 8
    if kind == "causal_L>S":
        L = 29
    for Hkv, rows in ((4, 5), (2, 7), (1, 16)):
        q, k, v = qkv(B, H, Hkv, L, S, D, seed=len(kind) + rows)
        check_against_reference(q, k, v, make_mask(kind, B, H, L, S), average=average, rows=rows)


@pytest.mark.parametrize("rows", [1, 10, 32, 97, 200, None])
def test_odd_sizes_and_block_sizes(rows):
    """L=97, S=33, D=59, H=3 (GQA 3:1 and plain), blocks that do not divide L; causal + padding."""
    B, H, L, S, D = 2, 3, 97, 33, 59
    for Hkv in (3, 1):
        q, k, v = qkv(B, H, Hkv, L, S, D, seed=Hkv)
        for kind in ("causal_bottom_right", "kpm_bool"):
            check_against_reference(q, k, v, make_mask(kind, B, H, L, S), average=rows != 10, rows=rows)


def test_results_do_not_depend_on_the_block_size():
    B, H, L, S, D = 2, 4, 37, 41, 16
    q, k, v = qkv(B, H, 2, L, S, D)
    mask = make_mask("window+dense3d_float", B, H, L, S)
    base = run(blockwise.attend, q, k, v, mask, block_rows=L)
    for rows in (1, 3, 8, 36):
        other = run(blockwise.attend, q, k, v, mask, block_rows=rows)
        for name, a, b in zip(NAMES, base, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_need_weights_false_returns_no_weights():
    q, k, v = qkv(2, 4, 2, 9, 7, 8)
    out, w = blockwise.attend(
        q, k, v, make_mask("causal", 2, 4, 9, 7), scale=0.3, dropout_p=0.0, need_weights=False, average_weights=True
    )
    assert w is None
    check_against_reference(q, k, v, make_mask("causal", 2, 4, 9, 7), average=True, rows=4, need_weights=False)


def test_rows_with_no_visible_key_give_zeros_forward_and_backward():
    """Rows hidden by the band (negative causal offset), by padding every key of a batch, or by a
    dense row of True: zero output, zero weights, zero (finite) gradient for those queries."""
    B, H, L, S, D = 2, 4, 12, 10, 8
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees nothing
    dense = torch.zeros(L, S, dtype=torch.bool)
    dense[5] = True  # row 5 sees nothing
    base = build_mask(
        attn_mask=dense,
        key_padding_mask=kpm,
        is_causal=False,
        batch=B,
        heads=H,
        q_len=L,
        k_len=S,
        batched=True,
        device=torch.device("cpu"),
    )
    mask = AttentionMask(**{**base.__dict__, "causal": True, "offset": -2})  # rows 0, 1 see nothing
    q, k, v = qkv(B, H, 2, L, S, D)
    for average in (True, False):
        out, w, dq, dk, dv = check_against_reference(q, k, v, mask, average=average, rows=3)
        for t in (out, dq):
            assert torch.all(t[1] == 0) and torch.all(t[0, :, [0, 1, 5]] == 0)
        w_rows = w[1] if average else w[1].transpose(0, 1)
        assert torch.all(w_rows == 0)
        assert torch.all((w[0, [0, 1, 5]] if average else w[0, :, [0, 1, 5]]) == 0)
        assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


def test_whole_blocks_with_no_visible_key():
    """A window far to the right of every query (offset beyond S): every block is skipped."""
    B, H, L, S, D = 1, 2, 9, 5, 4
    mask = AttentionMask(batch=B, heads=H, q_len=L, k_len=S, causal=True, offset=-L - 1)
    q, k, v = qkv(B, H, H, L, S, D)
    out, w, dq, dk, dv = run(blockwise.attend, q, k, v, mask, block_rows=4)
    for t in (out, w, dq, dk, dv):
        assert torch.all(t == 0)


def test_empty_sequences():
    for L, S in ((0, 5), (5, 0), (0, 0)):
        q, k, v = qkv(2, 2, 1, L, S, 4)
        out, w, dq, dk, dv = run(blockwise.attend, q, k, v, make_mask("causal", 2, 2, L, S))
        assert out.shape == (2, 2, L, 4) and w.shape == (2, L, S)
        assert all(torch.all(t == 0) for t in (out, dq, dk, dv))


# ---- memory: never a (B, H, L, S) tensor when the weights are averaged ---------------------------------
class _LargestTensor(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("kind", ["none", "causal", "dense3d_float"])
def test_no_tensor_of_size_b_h_l_s_with_averaged_weights(kind):
    """Forward and backward (training with need_weights=True): no tensor larger than O(B*L*S) or a
    block; the dense (B, H, L, S) mask the user passed is not ours."""
    B, H, L, S, D = 2, 8, 64, 64, 4
    q, k, v = qkv(B, H, H, L, S, D)
    mask = make_mask(kind, B, H, L, S)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with _LargestTensor() as seen:
        out, w = blockwise.attend(
            q, k, v, mask, scale=0.5, dropout_p=0.1, need_weights=True, average_weights=True, block_rows=16
        )
        (out.sum() + w.sum()).backward()
    assert seen.largest <= B * H * 16 * S < B * H * L * S


# ---- dropout -----------------------------------------------------------------------------------------------
def test_dropout_reproducible_and_consistent():
    """Same seed: same output, weights and grads; another seed: different. The output is exactly
    the returned per-head weights times V, and the backward used the same keep-mask (dV = W^T dO)."""
    B, H, Hkv, L, S, D = 2, 4, 2, 21, 17, 8
    q, k, v = qkv(B, H, Hkv, L, S, D)
    mask = make_mask("causal+kpm", B, H, L, S)
    kw = dict(average=False, dropout_p=0.4, block_rows=6)
    a = run(blockwise.attend, q, k, v, mask, seed=1, **kw)
    b = run(blockwise.attend, q, k, v, mask, seed=1, **kw)
    c = run(blockwise.attend, q, k, v, mask, seed=2, **kw)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name
    assert not torch.equal(a[1], c[1])

    out, w = a[0], a[1]  # (B, H, L, D), (B, H, L, S)
    v_heads = v.repeat_interleave(H // Hkv, dim=1)
    torch.testing.assert_close(out, w @ v_heads, rtol=1e-5, atol=1e-6)
    # the dropped share among the probabilities that were not zero before dropout
    p = reference.attend(q, k, v, mask, scale=D**-0.5, dropout_p=0.0, need_weights=True, average_weights=False)[1]
    dropped = ((w == 0) & (p > 0)).sum() / (p > 0).sum()
    assert 0.3 < dropped < 0.5

    # dV from the backward equals W^T dO with the returned W: the backward saw the forward's mask
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    out, w = blockwise.attend(
        q2, k2, v2, mask, scale=D**-0.5, dropout_p=0.4, need_weights=True, average_weights=False, block_rows=6
    )
    d_out = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v2, d_out)
    expect = (w.transpose(-1, -2) @ d_out).unflatten(1, (Hkv, H // Hkv)).sum(2)
    torch.testing.assert_close(dv, expect, rtol=1e-5, atol=1e-5)


def test_dropout_averaged_weights_are_the_mean_of_per_head_ones():
    B, H, L, S, D = 1, 4, 10, 10, 4
    q, k, v = qkv(B, H, H, L, S, D)
    mask = make_mask("none", B, H, L, S)
    per_head = run(blockwise.attend, q, k, v, mask, average=False, dropout_p=0.5, seed=5)
    averaged = run(blockwise.attend, q, k, v, mask, average=True, dropout_p=0.5, seed=5)
    torch.testing.assert_close(averaged[1], per_head[1].mean(1))
    torch.testing.assert_close(averaged[0], per_head[0])


# ---- gradcheck and gradgradcheck --------------------------------------------------------------------------
GRAD_MASKS = ["none", "causal_negative_offset", "window", "causal+kpm"]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("average", [True, False], ids=["avg", "per_head"])
@pytest.mark.parametrize("kind", GRAD_MASKS)
def test_gradcheck_and_gradgradcheck(kind, average, dropout_p):
    B, H, Hkv, L, S, D = 1, 2, 1, 5, 4, 3
    q, k, v = (t.requires_grad_() for t in qkv(B, H, Hkv, L, S, D, dtype=torch.float64))
    mask = make_mask(kind, B, H, L, S)

    def f(q, k, v):
        torch.manual_seed(0)  # every evaluation draws the same dropout mask
        return blockwise.attend(
            q, k, v, mask, scale=0.7, dropout_p=dropout_p, need_weights=True, average_weights=average, block_rows=2
        )

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_fast_and_differentiable_backward_agree():
    """The in-place backward (create_graph=False) and the differentiable one (create_graph=True)
    give the same gradients, with dropout, GQA, a mask and gradients on the weights."""
    B, H, Hkv, L, S, D = 2, 4, 2, 13, 11, 8
    mask = make_mask("causal+kpm", B, H, L, S)
    for average in (True, False):
        q, k, v = (t.requires_grad_() for t in qkv(B, H, Hkv, L, S, D, dtype=torch.float64))
        torch.manual_seed(4)
        out, w = blockwise.attend(
            q, k, v, mask, scale=0.4, dropout_p=0.2, need_weights=True, average_weights=average, block_rows=5
        )
        cot = (torch.randn_like(out), torch.randn_like(w))
        fast = torch.autograd.grad((out, w), (q, k, v), cot, retain_graph=True)
        slow = torch.autograd.grad((out, w), (q, k, v), cot, create_graph=True)
        assert all(s.requires_grad for s in slow)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_the_weights_get_a_gradient():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 6, 6, 4, dtype=torch.float64))
    mask = make_mask("causal", 1, 2, 6, 6)
    args = dict(scale=0.5, dropout_p=0.0, need_weights=True, average_weights=True)
    _, w = blockwise.attend(q, k, v, mask, **args, block_rows=4)
    _, w_ref = reference.attend(q, k, v, mask, **args)
    cot = torch.randn_like(w)
    ours = torch.autograd.grad(w, (q, k, v), cot)
    theirs = torch.autograd.grad(w_ref, (q, k, v), cot, allow_unused=True)  # the weights do not depend on v
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


# ---- through the module, against torch.nn.MultiheadAttention ----------------------------------------------
MODULE_MASKS = ["none", "causal_bool", "is_causal", "kpm_bool", "kpm_float", "bool2d", "float2d", "bool3d", "float3d"]


@pytest.mark.parametrize("average", [True, False], ids=["avg", "per_head"])
@pytest.mark.parametrize("kind", MODULE_MASKS)
def test_module_matches_torch(registered, monkeypatch, kind, average):
    """Ours with backend="blockwise" (several blocks) and torch's module on the same weights: outputs,
    weights and every gradient (inputs and parameters)."""
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 1)  # 16 rows per block: L=37 -> 3 blocks
    B, L, S, E, H = 2, 37, 29, 12, 3
    theirs, ours = pair(torch.float32, seed=len(kind), embed_dim=E, num_heads=H, batch_first=True)
    ours.backend = "blockwise"
    q, k, v = (t.requires_grad_() for t in inputs(B, L, S, E, E, E, True, torch.float32, seed=3))
    g = torch.Generator().manual_seed(5)
    attn_mask = kpm = None
    ours_causal = False
    if kind in ("causal_bool", "is_causal"):
        k, v = q, q
        S = L
        attn_mask = torch.ones(L, S, dtype=torch.bool).triu(1)
        ours_causal = True
    elif kind.startswith("kpm"):
        kpm = torch.rand(B, S, generator=g) < 0.3 if kind == "kpm_bool" else torch.randn(B, S, generator=g)
    elif kind in ("bool2d", "float2d"):
        attn_mask = torch.rand(L, S, generator=g) < 0.3 if kind == "bool2d" else torch.randn(L, S, generator=g)
    elif kind in ("bool3d", "float3d"):
        shape = (B * H, L, S)
        attn_mask = torch.rand(shape, generator=g) < 0.3 if kind == "bool3d" else torch.randn(shape, generator=g)
    results = []
    for module, mask, causal in (
        (ours, None if kind == "is_causal" else attn_mask, ours_causal),
        (theirs, attn_mask, False),
    ):
        out, w = module(
            q,
            k,
            v,
            key_padding_mask=kpm,
            attn_mask=mask,
            need_weights=True,
            average_attn_weights=average,
            is_causal=causal,
        )
        cot = torch.Generator().manual_seed(8)
        loss = (out * torch.randn(out.shape, generator=cot)).sum() + (w * torch.randn(w.shape, generator=cot)).sum()
        leaves = [t for t in {id(t): t for t in (q, k, v)}.values()]
        results.append((out, w, *torch.autograd.grad(loss, leaves + list(module.parameters()))))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"item {i}: {m}")  # noqa: B023


def test_module_dispatches_to_blockwise_for_weights(registered, monkeypatch):
    _, ours = pair(torch.float32, embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 40, 8)
    q, k, v = (torch.randn(2, 2, 40, 4) for _ in range(3))
    mask = make_mask("none", 2, 2, 40, 40)
    # a call that fits one tile is the direct backend's; beyond one tile, blockwise's
    assert backends.choose(q, k, v, mask, need_weights=True).name == "direct"
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 2 * 40 * 4 * 4)  # 4 rows per tile (16 at least)
    assert backends.choose(q, k, v, mask, need_weights=True) is blockwise
    assert backends.choose(q, k, v, mask, need_weights=False).name == "sdpa"
    out, w = ours(x, x, x)
    assert w.shape == (2, 40, 40)


# ---- worker threads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 3])  # workers sum dK/dV apart (one batch element), or own elements
@pytest.mark.parametrize("kind", ["none", "causal_bottom_right", "kpm_float"])
def test_worker_threads_give_the_inline_result(monkeypatch, kind, B):
    """Tiles shared among two single-threaded workers: the same output, weights and gradients as the
    inline loop (with GQA, dropout under a seed, and gradients on the weights); the caller's thread
    count is left as it was; an error inside a worker reaches the caller."""
    H, Hkv, L, S, D = 4, 2, 40, 36, 8
    q, k, v = qkv(B, H, Hkv, L, S, D)
    mask = make_mask(kind, B, H, L, S)
    kw = dict(average=True, dropout_p=0.25, seed=3, block_rows=4)
    inline = run(blockwise.attend, q, k, v, mask, **kw)
    monkeypatch.setattr(blockwise, "PARALLEL_MIN_ELEMENTS", 1)
    torch.set_num_threads(2)
    try:
        shared = run(blockwise.attend, q, k, v, mask, **kw)
        assert torch.get_num_threads() == 2
        with torch.inference_mode():
            out, w = blockwise.attend(
                q, k, v, mask, scale=0.3, dropout_p=0.0, need_weights=True, average_weights=False, block_rows=4
            )
        assert out.is_inference() and w.shape == (B, H, L, S)

        def broken(*args):
            raise RuntimeError("broken block")

        monkeypatch.setattr(blockwise, "_write_weights", broken)
        with pytest.raises(RuntimeError, match="broken block"):
            blockwise.attend(
                q, k, v, mask, scale=0.3, dropout_p=0.0, need_weights=True, average_weights=True, block_rows=4
            )
    finally:
        torch.set_num_threads(1)
    assert blockwise._workers is not None
    for name, a, b in zip(NAMES, inline, shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("B", [1, 2, 5])  # a fixed split with own dK/dV sums; whole batch elements
def test_worker_results_do_not_depend_on_timing(monkeypatch, B):
    """Workers claim tiles (forward) or groups (backward) as they free up; which thread runs what must
    change no bit of the result: the same call twice gives identical outputs, weights and gradients."""
    q, k, v = qkv(B, 4, 2, 48, 40, 8, seed=4)
    mask = make_mask("causal_bottom_right", B, 4, 48, 40)
    monkeypatch.setattr(blockwise, "PARALLEL_MIN_ELEMENTS", 1)
    torch.set_num_threads(2)
    try:
        first = run(blockwise.attend, q, k, v, mask, block_rows=4)
        second = run(blockwise.attend, q, k, v, mask, block_rows=4)
    finally:
        torch.set_num_threads(1)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_schedule_groups():
    """Forward: one tile per group, largest first. Backward: whole batch elements when balanced, else
    one group per worker, every tile exactly once."""
    tiles = [
        (i, b, b + 1, q0, q0 + 4, 0, q0 + 4) for i, (b, q0) in enumerate((b, q0) for b in range(4) for q0 in (0, 4))
    ]
    groups, whole = blockwise._schedule(tiles, 2)
    assert not whole and all(len(g) == 1 for g in groups)
    costs = [blockwise._cost(g[0]) for g in groups]
    assert costs == sorted(costs, reverse=True)
    groups, whole = blockwise._schedule(tiles, 2, by_batch=True)
    assert whole and len(groups) == 4 and all(len({t[1] for t in g}) == 1 for g in groups)
    groups, whole = blockwise._schedule(tiles[:4], 2, by_batch=True)  # 2 batch elements, 1 tile-pair each
    assert sorted(t for g in groups for t in g) == sorted(tiles[:4])
    assert blockwise._schedule(tiles[:3], 2) == ([tiles[:3]], True)  # fewer than 2 per worker: inline


# ---- small pieces -------------------------------------------------------------------------------------------
def test_not_supported_reasons():
    q, k, v = qkv(1, 2, 2, 3, 3, 4)
    mask = make_mask("none", 1, 2, 3, 3)
    assert blockwise.not_supported_reasons(q, k, v, mask, need_weights=True) == []
    assert blockwise.not_supported_reasons(q, k, v, mask, need_weights=False) == []
    ints = q.to(torch.int64)
    assert blockwise.not_supported_reasons(ints, k, v, mask, need_weights=True)
    graded = AttentionMask(batch=1, heads=2, q_len=3, k_len=3, dense=torch.zeros(1, 1, 3, 3, requires_grad=True))
    assert blockwise.not_supported_reasons(q, k, v, graded, need_weights=True)


def test_block_rows_fit_the_budget_and_even_out(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 2**20)
    rows = blockwise.choose_block_rows(4, 1000, 1024, 4, cpu)  # 64 rows fit: 16 blocks of 63 rows
    assert rows == 63
    assert blockwise.choose_block_rows(1, 10, 10, 4, cpu) == 10  # everything fits: one block
    assert blockwise.choose_block_rows(64, 4096, 65536, 4, cpu) == 16  # never below 16 rows
    assert blockwise.choose_block_rows(1, 0, 10, 4, cpu) == 1
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", None)
    assert blockwise.choose_block_rows(16, 4096, 4096, 4, cpu) >= 16
    with pytest.raises(ValueError, match="block_rows"):
        blockwise.attend(*qkv(1, 1, 1, 2, 2, 2), make_mask("none", 1, 1, 2, 2), scale=1.0, dropout_p=0.0,
                         need_weights=True, average_weights=True, block_rows=-1)  # fmt: skip
