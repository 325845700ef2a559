"""The Triton backend (`attend/triton.py`): fused kernels that return attention weights.

On CPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, set by this module for its own
tests), at small odd sizes with 32 x 32 tiles, so that lengths like 37 cut into partial tiles; with
`--device cuda` the same tests run the compiled kernels on the GPU, with the production tile sizes
and a longer case. Skipped without triton.

Oracles: the float64 reference backend, by the flash-attn rule (our error at most 2x the error of the
reference run at the same precision, plus the rounding of the exact result to that precision), for
the output, the weights and all three gradients, including the gradient through the weights; torch's
own nn.MultiheadAttention through the module; gradcheck in float64 (interpreter only).
"""

from __future__ import annotations

import pytest
import torch

import multihead.attend as backends
from multihead.attend import reference
from multihead.attend import triton as triton_backend
from multihead.masks import AttentionMask, build_mask

from helpers import first_error, pair

triton = pytest.importorskip("triton")

NAMES = ("out", "weights", "dq", "dk", "dv")


@pytest.fixture(autouse=True, scope="module")
def setup(request):
    """CPU: Triton's interpreter on for this module (tests/conftest.py imported triton with it on, as
    triton requires) and 32 x 32 tiles, both restored after; CUDA: the compiled kernels, their tiles."""
    if request.config.getoption("--device") == "cuda":
        yield
        return
    if not triton_interpreted():
        pytest.skip("triton was imported without TRITON_INTERPRET=1: its interpreter cannot run here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setattr(triton_backend, "BLOCKS", (32, 32))
        yield


def triton_interpreted() -> bool:
    """Were triton's own jit helpers built for the interpreter (at its import)?"""
    import triton.language as tl

    return not isinstance(tl.zeros, triton.runtime.JITFunction)  # an InterpretedFunction


# ---- inputs ----------------------------------------------------------------------------------------
def qkv(B, H, Hkv, L, S, D, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D))
    return tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)


def make_mask(kind: str, B: int, H: int, L: int, S: int, device, seed: int = 0) -> AttentionMask:
    """User masks through `build_mask`, as the module builds them; band structure set directly.
    Every kind with a padding or dense part hides some rows entirely."""
    g = torch.Generator().manual_seed(seed)
    attn_mask = kpm = None
    band = {}
    if kind == "causal":
        band = dict(causal=True)
    elif kind == "causal_offset":  # a KV cache: bottom-right; with L > S the first rows see nothing
        band = dict(causal=True, offset=S - L)
    elif kind.startswith("window"):
        band = dict(window=(5, 3))
    if "kpm" in kind:
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[-1] = True  # the last batch element sees no key
        if "float" in kind:
            kpm = torch.zeros(B, S).masked_fill(kpm, -torch.inf) + torch.randn(B, S, generator=g)
    if kind == "dense_bool":
        attn_mask = torch.rand(B * H, L, S, generator=g) < 0.3
        attn_mask[-1, 3] = True  # one row of one head sees nothing
    elif kind == "dense_float":
        attn_mask = torch.randn(L, S, generator=g)
        attn_mask[4] = -torch.inf
    mask = build_mask(
        attn_mask=None if attn_mask is None else attn_mask.to(device),
        key_padding_mask=None if kpm is None else kpm.to(device),
        is_causal=False,
        batch=B,
        heads=H,
        q_len=L,
        k_len=S,
        batched=True,
        device=device,
    )
    return AttentionMask(**{**mask.__dict__, **band})


def run(attend, q, k, v, mask, *, average=True, dropout_p=0.0, seed=0):
    """Forward and backward on leaf copies of q/k/v, with fixed random cotangents on the output and
    on the weights. Returns (out, weights, dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out, w = attend(
        q, k, v, mask, scale=q.shape[-1] ** -0.5, dropout_p=dropout_p, need_weights=True, average_weights=average
    )
    g = torch.Generator().manual_seed(99)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum()
    loss = loss + (w * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w)).sum()
    return (out, w, *torch.autograd.grad(loss, (q, k, v)))


def rounding(exact, dtype) -> float:
    """The error of storing the exact result in `dtype`: no kernel that returns `dtype` beats it."""
    return first_error(exact.to(dtype), exact)


def check_against_reference(q, k, v, mask, *, average=True):
    ours = run(triton_backend.attend, q, k, v, mask, average=average)
    low = run(reference.attend, q, k, v, mask, average=average)
    exact = run(reference.attend, q.double(), k.double(), v.double(), mask, average=average)
    for name, a, b, c in zip(NAMES, ours, low, exact):
        assert a.shape == c.shape and a.dtype == q.dtype, name
        assert torch.isfinite(a).all(), name
        ours_err, theirs_err = first_error(a, c), first_error(b, c)
        floor = 2 * rounding(c, q.dtype) + 1e-6 * max(1.0, c.abs().max().item())
        assert ours_err <= 2 * theirs_err + floor, f"{name}: ours err {ours_err:.3g} vs reference err {theirs_err:.3g}"
    return ours


# ---- against the float64 reference -----------------------------------------------------------------
CASES = [  # (mask kind, B, H, Hkv, D, average, L, S)
    ("none", 1, 2, 2, 16, True, 37, 37),
    ("causal", 1, 4, 2, 32, False, 37, 45),
    ("causal_offset", 1, 4, 1, 64, True, 45, 37),
    ("window+kpm", 2, 2, 1, 16, True, 37, 37),
    ("kpm_float", 2, 2, 2, 16, False, 37, 29),
    ("dense_bool", 1, 4, 2, 32, True, 37, 37),
    ("dense_float", 1, 2, 2, 16, True, 37, 29),
]


@pytest.mark.parametrize(("kind", "B", "H", "Hkv", "D", "average", "L", "S"), CASES, ids=[c[0] for c in CASES])
def test_against_reference_float32(device, kind, B, H, Hkv, D, average, L, S):
    q, k, v = qkv(B, H, Hkv, L, S, D, device, seed=D + Hkv)
    check_against_reference(q, k, v, make_mask(kind, B, H, L, S, device), average=average)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_against_reference_half(device, dtype):
    B, H, L, S, D = 1, 2, 37, 37, 32
    q, k, v = qkv(B, H, 1, L, S, D, device, dtype=dtype)
    check_against_reference(q, k, v, make_mask("causal", B, H, L, S, device))


def test_tile_boundaries_with_unequal_tiles(device, monkeypatch):
    """16-row query tiles against 32-key tiles: the band's tile ranges (which key tiles a query tile
    visits, which query tiles a key tile visits) must not drop a visible pair."""
    monkeypatch.setattr(triton_backend, "BLOCKS", (16, 32))
    B, H, L, S, D = 1, 2, 37, 41, 16
    q, k, v = qkv(B, H, 2, L, S, D, device)
    mask = AttentionMask(B, H, L, S, window=(7, 2), offset=3, device=device)
    check_against_reference(q, k, v, mask, average=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a long case needs the compiled kernels")
def test_long_sequence_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("runs with --device cuda")
    B, H, L, S, D = 2, 8, 1000, 1100, 64
    q, k, v = qkv(B, H, 2, L, S, D, device, dtype=torch.bfloat16)
    check_against_reference(q, k, v, make_mask("causal_offset", B, H, L, S, device))


# ---- semantics ----------------------------------------------------------------------------------------
def test_rows_with_no_visible_key_give_zeros(device):
    B, H, L, S, D = 2, 2, 37, 29, 16
    q, k, v = qkv(B, H, 2, L, S, D, device)
    out, w, dq, dk, dv = run(triton_backend.attend, q, k, v, make_mask("window+kpm", B, H, L, S, device), average=False)
    # batch 1 pads every key; the window (5, 3) around the diagonal misses every key for rows i > S + 4
    assert out[1].abs().max() == 0 and w[1].abs().max() == 0 and dq[1].abs().max() == 0
    assert dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert out[0, :, S + 5 :].abs().max() == 0 and w[0, :, S + 5 :].abs().max() == 0
    assert all(torch.isfinite(t).all() for t in (out, w, dq, dk, dv))


def test_dropout_weights_are_the_ones_applied(device):
    """With dropout the per-head weights rebuild the output (out = W @ V), the averaged weights are
    their mean, a seed reproduces the mask, and the gradients are those of the reference with that
    mask (read off the weights: a kept visible pair has a non-zero weight)."""
    B, H, L, S, D, p = 1, 2, 37, 37, 16, 0.3
    q, k, v = qkv(B, H, 1, L, S, D, device)
    mask = AttentionMask(B, H, L, S, causal=True, device=device)
    out, w, *grads = run(triton_backend.attend, q, k, v, mask, average=False, dropout_p=p, seed=5)
    torch.testing.assert_close(out, w @ v, rtol=1e-5, atol=1e-5)
    again = run(triton_backend.attend, q, k, v, mask, average=True, dropout_p=p, seed=5)
    torch.testing.assert_close(again[0], out, rtol=0, atol=0)
    torch.testing.assert_close(again[1], w.mean(1), rtol=1e-6, atol=1e-7)
    visible = torch.ones(L, S, dtype=torch.bool, device=device).tril()
    dropped = ((w == 0) & visible).sum().item() / (visible.sum().item() * B * H)
    assert 0.2 < dropped < 0.4, dropped  # 962 visible pairs: 0.3 +- 0.1 is over 6 standard deviations
    keep = (w != 0).double()

    def with_mask(q, k, v, mask, *, scale, dropout_p, need_weights, average_weights):
        probs = reference.safe_softmax((q @ k.transpose(-1, -2)) * scale + mask.additive(q.dtype, q.device))
        probs = probs * keep / (1 - p)
        return probs @ v, probs

    exact = run(with_mask, q.double(), k.double(), v.double(), mask, average=False)
    for name, a, c in zip(NAMES, (out, w, *grads), exact):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5, msg=name)


def test_deterministic(device):
    B, H, L, S, D = 1, 2, 37, 29, 16
    q, k, v = qkv(B, H, 2, L, S, D, device)
    mask = make_mask("dense_float", B, H, L, S, device)
    first = run(triton_backend.attend, q, k, v, mask)
    second = run(triton_backend.attend, q, k, v, mask)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_gradcheck_float64(device):
    if device.type != "cpu":
        pytest.skip("float64 is served under the interpreter only")
    B, H, L, S, D = 1, 2, 5, 7, 16
    q, k, v = (t.requires_grad_() for t in qkv(B, H, 1, L, S, D, device, dtype=torch.float64))
    mask = make_mask("window+kpm", 2, H, L, S, device)
    mask = AttentionMask(**{**mask.__dict__, "batch": 1, "key_padding": mask.key_padding[:1]})

    def fn(q, k, v):
        out, w = triton_backend.attend(q, k, v, mask, scale=0.3, dropout_p=0.0, need_weights=True, average_weights=True)
        return out, w

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_double_backward(device):
    """create_graph=True: the first gradients equal the fast backward's, and a second-order gradient
    (of the squared first gradients) matches the float64 reference's."""
    B, H, L, S, D = 1, 2, 9, 11, 16
    q, k, v = qkv(B, H, 1, L, S, D, device)
    mask = make_mask("causal_offset", B, H, L, S, device)
    fast = run(triton_backend.attend, q, k, v, mask)

    def second(attend, q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, w = attend(q, k, v, mask, scale=D**-0.5, dropout_p=0.0, need_weights=True, average_weights=True)
        g = torch.Generator().manual_seed(99)
        loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum()
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w)).sum()
        grads = torch.autograd.grad(loss, (q, k, v), create_graph=True)
        return grads, torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))

    first, ours = second(triton_backend.attend, q, k, v)
    _, exact = second(reference.attend, q.double(), k.double(), v.double())
    for name, a, b in zip(NAMES[2:], first, fast[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for name, a, c in zip(NAMES[2:], ours, exact):
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-5, msg=name)


# ---- the module, against torch ------------------------------------------------------------------------
def test_module_against_torch(device):
    """backend='triton' through our MultiheadAttention against torch.nn.MultiheadAttention: output,
    weights, and every parameter's gradient (causal float mask + key padding)."""
    E, H, B, L = 32, 2, 2, 21
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=True, device=device)
    ours.backend = "triton"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, generator=g).to(device)
    attn_mask = torch.randn(L, L, generator=g).to(device)
    kpm = (torch.rand(B, L, generator=g) < 0.2).to(device)
    kpm[:, 0] = False
    results = []
    for m in (theirs, ours):
        out, w = m(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm)
        (out.square().sum() + w.square().sum()).backward()
        results.append((out, w, *(p.grad for p in m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_declines_what_it_does_not_serve(device, monkeypatch):
    q, k, v = qkv(1, 2, 2, 4, 4, 16, device)
    mask = AttentionMask(1, 2, 4, 4, device=device)
    assert triton_backend.not_supported_reasons(q, k, v, mask, need_weights=True) == []
    wide = torch.zeros(1, 2, 4, 512, device=device)
    assert triton_backend.not_supported_reasons(wide, wide, wide, mask, need_weights=True)
    empty = torch.zeros(1, 2, 0, 16, device=device)
    assert triton_backend.not_supported_reasons(empty, k, v, mask, need_weights=True)
    grad_mask = AttentionMask(1, 2, 4, 4, dense=torch.zeros(1, 1, 4, 4, device=device, requires_grad=True))
    assert triton_backend.not_supported_reasons(q, k, v, grad_mask, need_weights=True)
    if device.type == "cpu":  # dispatch never picks it for CPU tensors; without the interpreter it declines
        assert backends.explain(q, k, v, mask, need_weights=True)["triton"]
        assert backends.choose(q, k, v, mask, need_weights=True).name in ("direct", "blockwise")  # not triton
        assert backends.choose(q, k, v, mask, need_weights=True, backend="triton") is triton_backend
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert any("CUDA" in r for r in triton_backend.not_supported_reasons(q, k, v, mask, need_weights=True))
