"""Numerics at the edges: huge logits, half precision, CPU autocast, mixed -inf/finite float masks,
L = 1 / S = 1, empty query or key sequences, non-contiguous and stride-0 inputs, determinism under a
seed with dropout, and `torch.use_deterministic_algorithms(True)`.

Every backend that can serve a request is run (`multihead.attend.BACKENDS`); the float64 reference
(`backend="reference"` on a float64 copy) is the oracle; low precision uses the flash-attn rule
(our error against the oracle at most a few times torch's error at the same precision).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import multihead.attend
from multihead import MultiheadAttention

from helpers import first_error, pair

REFUSAL = "no attention backend can serve"
NEED_WEIGHTS = pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])


def for_each_backend(check, **params):
    """Run `check(backend=name, **params)` for every backend in `multihead.attend.BACKENDS` that
    serves the request. A backend may refuse one (a ValueError naming it, with its reasons); the
    reference serves every request and SDPA every one without weights. Failures name the backend."""
    served, refused = [], {}
    for name in multihead.attend.BACKENDS:
        try:
            check(backend=name, **params)
        except Exception as err:
            if isinstance(err, ValueError) and REFUSAL in str(err) and f"{name}:" in str(err):
                refused[name] = str(err)
                continue
            raise AssertionError(f"backend {name!r}: {type(err).__name__}: {err}") from err
        served.append(name)
    required = {"reference"} if params["need_weights"] else {"reference", "sdpa"}
    assert required <= set(served), refused
    return served


def each_backend(check):
    """Decorator: the test runs `check` once per backend that serves its request (see above)."""
    sig = inspect.signature(check)

    def test(**params):
        for_each_backend(check, **params)

    test.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "backend"])
    test.__name__, test.__doc__ = check.__name__, check.__doc__
    return test


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def oracle(ours: MultiheadAttention) -> MultiheadAttention:
    exact = copy.deepcopy(ours).double()
    exact.backend = "reference"
    return exact


def up(t):
    return None if t is None else t.double() if t.is_floating_point() else t


def call(m, q, k, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m(q, k, v, **kw)


# ---- huge logits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@NEED_WEIGHTS
@each_backend
def test_logits_of_magnitude_1e4(backend, need_weights, dtype):
    theirs, ours = pair(dtype, seed=3, embed_dim=8, num_heads=2, batch_first=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=dtype) * 60
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True  # a fully masked row among huge logits
    mask[0, 1:] = True
    # the scores really are ~1e4
    w_q, w_k, _ = ours.in_proj_weight.detach().double().chunk(3)
    b_q, b_k, _ = ours.in_proj_bias.detach().double().chunk(3)
    qh = (x.double() @ w_q.T + b_q).unflatten(-1, (2, 4))
    kh = (x.double() @ w_k.T + b_k).unflatten(-1, (2, 4))
    scores = torch.einsum("blhd,bshd->bhls", qh, kh) * 4**-0.5
    assert 3e3 < scores.abs().max() < 1e5

    exact = oracle(ours)
    x_out, x_w = exact(x.double(), x.double(), x.double(), attn_mask=mask)
    t_out, t_w = call(theirs, x, x, x, attn_mask=mask, need_weights=need_weights)
    ours.backend = backend
    out, w = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
    assert torch.isfinite(out).all()
    rows = torch.ones(5, dtype=torch.bool)
    rows[2] = False  # torch gives NaN there
    err, t_err = first_error(out[:, rows], x_out[:, rows]), first_error(t_out[:, rows], x_out[:, rows])
    assert err <= 2 * t_err + 1e-9 * x_out.abs().max().item() + (1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(out[:, 2], ours.out_proj.bias.detach().expand(2, 8), rtol=0, atol=0)
    if need_weights:
        assert torch.isfinite(w).all()
        assert torch.all(w[:, 2] == 0)
        torch.testing.assert_close(w.double(), x_w, rtol=0, atol=max(2 * first_error(t_w[:, rows], x_w[:, rows]), 1e-6))


# ---- half precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@NEED_WEIGHTS
@pytest.mark.parametrize(
    "config",
    [dict(), dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10, batch_first=False)],
    ids=["plain", "bias_kv+zero_attn+kdim_vdim"],
)
@each_backend
def test_half_precision_flash_rule(config, backend, need_weights, dtype):
    """Inputs and parameters in float16/bfloat16: our error against the float64 oracle (run on the
    same rounded inputs and weights) is at most 3x torch's error at that precision; gradients too."""
    config = {"embed_dim": 16, "num_heads": 2, "batch_first": True, **config}
    theirs, ours = pair(torch.float32, seed=1, **config)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    exact = oracle(ours)  # the rounded weights, upcast
    g = torch.Generator().manual_seed(2)
    shape = (lambda n, d: (2, n, d)) if config["batch_first"] else (lambda n, d: (n, 2, d))
    q = torch.randn(shape(7, 16), generator=g).to(dtype).requires_grad_()
    k = torch.randn(shape(9, config.get("kdim", 16)), generator=g).to(dtype).requires_grad_()
    v = torch.randn(shape(9, config.get("vdim", 16)), generator=g).to(dtype).requires_grad_()
    mask = torch.rand(7, 9, generator=g) < 0.3
    mask[:, 0] = False
    kpm = torch.randn(2, 9, generator=g).to(dtype)

    results = {}
    ours.backend = backend
    for name, m, xs, kp in (
        ("ours", ours, (q, k, v), kpm),
        ("torch", theirs, (q, k, v), kpm),
        ("exact", exact, [t.detach().double().requires_grad_() for t in (q, k, v)], kpm.double()),
    ):
        out, w = call(m, *xs, attn_mask=mask, key_padding_mask=kp, need_weights=need_weights)
        gg = torch.Generator().manual_seed(5)
        loss = (out.double() * torch.randn(out.shape, generator=gg, dtype=torch.float64)).sum()
        grads = torch.autograd.grad(loss, list(xs) + list(m.parameters()))
        results[name] = (out, w, grads)
    (o, ow, og), (t, tw, tg), (x, xw, xg) = results["ours"], results["torch"], results["exact"]
    assert o.dtype == dtype and torch.isfinite(o).all()
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    assert first_error(o, x) <= 3 * first_error(t, x) + floor, (first_error(o, x), first_error(t, x))
    if need_weights:
        assert ow.dtype == dtype
        assert first_error(ow, xw) <= 3 * first_error(tw, xw) + floor / 10, (first_error(ow, xw), first_error(tw, xw))
    for i, (a, b, c) in enumerate(zip(og, tg, xg)):
        assert a.dtype == dtype and torch.isfinite(a).all(), i
        scale = c.abs().max().item()
        assert first_error(a, c) <= 3 * first_error(b, c) + floor * max(scale, 1), (
            i,
            first_error(a, c),
            first_error(b, c),
        )


# ---- autocast ------------------------------------------------------------------------------------
AUTOCAST_CONFIGS = {
    "plain": dict(),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "kdim_vdim": dict(kdim=5, vdim=6),
    "no_bias_seq_first": dict(bias=False, batch_first=False),
    "gqa": dict(num_kv_heads=1),
}


@NEED_WEIGHTS
@pytest.mark.parametrize("config", list(AUTOCAST_CONFIGS))
@each_backend
def test_cpu_autocast_bfloat16(config, backend, need_weights):
    """float32 parameters, bfloat16 compute: no dtype error, torch's output dtype, torch's numbers
    (within bfloat16 error of the float32 module), and a backward pass."""
    kw = {"embed_dim": 8, "num_heads": 2, "batch_first": True, **AUTOCAST_CONFIGS[config]}
    gqa = "num_kv_heads" in kw
    torch.manual_seed(0)
    if gqa:
        theirs, ours = None, MultiheadAttention(**kw)
    else:
        theirs, ours = pair(torch.float32, seed=0, **kw)
    ours.backend = backend
    g = torch.Generator().manual_seed(1)
    shape = (lambda n, d: (2, n, d)) if kw["batch_first"] else (lambda n, d: (n, 2, d))
    q = torch.randn(shape(3, 8), generator=g, requires_grad=True)
    k = torch.randn(shape(4, kw.get("kdim", 8)), generator=g)
    v = torch.randn(shape(4, kw.get("vdim", 8)), generator=g)
    mask = torch.randn(3, 4, generator=g)
    mask[1, 2] = float("-inf")
    full = ours(q, k, v, attn_mask=mask, need_weights=need_weights)[0].detach()  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = ours(q, k, v, attn_mask=mask, need_weights=need_weights)
        if theirs is not None:
            t_out, t_w = theirs(q, k, v, attn_mask=mask, need_weights=need_weights)
    (grad,) = torch.autograd.grad(out.float().sum(), q)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert torch.isfinite(out).all()
    if theirs is not None:
        assert out.dtype == t_out.dtype
        assert (w is None) == (t_w is None)
        if w is not None:
            assert w.dtype == t_w.dtype
            torch.testing.assert_close(w.float(), t_w.float(), rtol=0, atol=3e-2)
        torch.testing.assert_close(out.float(), t_out.float(), rtol=0, atol=5e-2)
        assert first_error(out, full) <= 3 * first_error(t_out, full) + 1e-2
    else:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), full, rtol=0, atol=5e-2)


# ---- float masks mixing -inf and finite values ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@NEED_WEIGHTS
@each_backend
def test_float_masks_mix_neg_inf_and_finite(backend, need_weights, dtype):
    theirs, ours = pair(dtype, seed=4, embed_dim=6, num_heads=3, batch_first=True)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 6, generator=g, dtype=dtype), torch.randn(2, 5, 6, generator=g, dtype=dtype)
    ninf = float("-inf")
    mask = torch.tensor(
        [
            [0.0, ninf, 3.0, -2.0, ninf],
            [ninf, ninf, ninf, ninf, -1e9],  # one key, far down but finite: it gets all the weight
            [-1e4, 5.0, ninf, 0.0, 1.0],
            [ninf, ninf, ninf, ninf, ninf],  # nothing visible
        ],
        dtype=dtype,
    )
    mask3 = mask.expand(2 * 3, 4, 5).clone()
    mask3[1, 0] = ninf  # batch 0, head 1, row 0: fully masked in one head only
    kpm = torch.tensor([[0.0, 0.0, -0.5, 0.0, 0.0], [ninf, 0.0, 0.0, 0.0, 1.0]], dtype=dtype)
    ours.backend = backend
    exact = oracle(ours)
    for am in (mask, mask3):
        out, w = ours(
            q, k, k, attn_mask=am, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=False
        )
        x_out, x_w = exact(q.double(), k.double(), k.double(), attn_mask=am.double(), key_padding_mask=kpm.double())
        t_out, t_w = call(
            theirs, q, k, k, attn_mask=am, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=False
        )
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, 3], ours.out_proj.bias.detach().expand(2, 6), rtol=0, atol=0)
        torch.testing.assert_close(out.double(), x_out, **tol)
        finite = ~torch.isnan(t_out)
        torch.testing.assert_close(out[finite], t_out[finite], **tol)
        if need_weights:
            assert torch.all(w[:, :, 3] == 0)
            torch.testing.assert_close(w[:, :, 1, 4], torch.ones(2, 3, dtype=dtype), **tol)
            if am is mask3:
                assert torch.all(w[0, 1, 0] == 0)
            _, x_w = exact(
                q.double(),
                k.double(),
                k.double(),
                attn_mask=am.double(),
                key_padding_mask=kpm.double(),
                average_attn_weights=False,
            )
            torch.testing.assert_close(w.double(), x_w, **tol)


# ---- L = 1, S = 1 --------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [(1, 1), (1, 4), (4, 1)], ids=["L1S1", "L1", "S1"])
@NEED_WEIGHTS
@each_backend
def test_length_one(backend, need_weights, lengths):
    L, S = lengths
    theirs, ours = pair(torch.float64, seed=5, embed_dim=6, num_heads=2, batch_first=True)
    ours.backend = backend
    g = torch.Generator().manual_seed(5)
    q, k = (
        torch.randn(3, L, 6, generator=g, dtype=torch.float64),
        torch.randn(3, S, 6, generator=g, dtype=torch.float64),
    )
    for causal in (False, True):
        out, w = ours(q, k, k, need_weights=need_weights, is_causal=causal)
        mask = torch.ones(L, S, dtype=torch.bool).triu(1) if causal else None
        t_out, t_w = theirs(q, k, k, need_weights=need_weights, attn_mask=mask)
        assert out.shape == (3, L, 6)
        torch.testing.assert_close(out, t_out, rtol=1e-10, atol=1e-10)
        if need_weights:
            assert w.shape == (3, L, S)
            torch.testing.assert_close(w, t_w, rtol=1e-10, atol=1e-10)


# ---- empty sequences -----------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@NEED_WEIGHTS
@each_backend
def test_zero_length_query(backend, need_weights, batched):
    """L = 0: output (B, 0, E), weights (B, 0, S); backward gives zero gradients."""
    theirs, ours = pair(torch.float32, seed=6, embed_dim=6, num_heads=2, batch_first=True)
    ours.backend = backend
    lead = (2,) if batched else ()
    q = torch.randn(*lead, 0, 6, requires_grad=True)
    k = torch.randn(*lead, 3, 6, requires_grad=True)
    out, w = ours(q, k, k, need_weights=need_weights, key_padding_mask=torch.zeros(*lead, 3, dtype=torch.bool))
    assert out.shape == (*lead, 0, 6)
    if need_weights:
        assert w.shape == (*lead, 0, 3)
    t_out, _ = theirs(q, k, k, need_weights=True)  # torch's need_weights=False path fails on L = 0
    assert out.shape == t_out.shape
    grads = torch.autograd.grad(out.sum(), [k, *ours.parameters()], allow_unused=True)
    assert all(gr is None or torch.all(gr == 0) for gr in grads)


@pytest.mark.parametrize(
    "flags", [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True)], ids=["plain", "bias_kv", "zero_attn"]
)
@NEED_WEIGHTS
@each_backend
def test_zero_length_key(backend, need_weights, flags):
    """S = 0 (defined here): every query row sees no key, so the output before out_proj is zero
    (output == out_proj.bias) and the weights have zero width; with add_bias_kv/add_zero_attn the
    one extra key is seen by every row, as torch does. Backward works."""
    theirs, ours = pair(torch.float32, seed=7, embed_dim=6, num_heads=2, batch_first=True, **flags)
    ours.backend = backend
    q = torch.randn(2, 3, 6, requires_grad=True)
    k = torch.randn(2, 0, 6, requires_grad=True)
    extra = int(bool(flags))
    for kw in (dict(), dict(key_padding_mask=torch.zeros(2, 0, dtype=torch.bool)), dict(is_causal=True)):
        out, w = ours(q, k, k, need_weights=need_weights, **kw)
        assert out.shape == (2, 3, 6) and torch.isfinite(out).all()
        if "key_padding_mask" not in kw:  # torch's need_weights=False path fails on an empty (B, 0) mask
            t_out, t_w = theirs(q, k, k, need_weights=need_weights)
            torch.testing.assert_close(out, t_out)
        if not flags:
            torch.testing.assert_close(out, ours.out_proj.bias.detach().expand(2, 3, 6), rtol=0, atol=0)
        if need_weights:
            assert w.shape == (2, 3, extra)
            torch.testing.assert_close(w, torch.ones(2, 3, extra))
        (gq,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(gq).all()
        if not flags:
            assert torch.all(gq == 0)


# ---- memory layouts ------------------------------------------------------------------------------
@NEED_WEIGHTS
@pytest.mark.parametrize("batch_first", [True, False])
@each_backend
def test_non_contiguous_and_expanded_inputs(backend, need_weights, batch_first):
    """Transposed, sliced and stride-0 (expanded) inputs and masks give exactly what their
    contiguous copies give, outputs and gradients."""
    _, ours = pair(torch.float64, seed=8, embed_dim=6, num_heads=2, batch_first=batch_first, kdim=4, vdim=5)
    ours.backend = backend
    B, L, S = 3, 4, 5
    g = torch.Generator().manual_seed(8)

    def layout(t):  # (B, n, d) -> module layout
        return t if batch_first else t.transpose(0, 1)

    q = torch.randn(L if batch_first else B, B if batch_first else L, 6, generator=g, dtype=torch.float64)
    q = q.transpose(0, 1)  # transposed: (B, L, E) or (L, B, E), not contiguous
    k = layout(torch.randn(B, 2 * S, 8, generator=g, dtype=torch.float64)[:, ::2, ::2])  # sliced, strided
    v = layout(torch.randn(1, S, 5, generator=g, dtype=torch.float64).expand(B, S, 5))  # stride 0 on B
    attn_mask = (torch.rand(S, L, generator=g) < 0.3).t()  # transposed (L, S) bool
    attn_mask[:, 0] = False
    kpm = torch.randn(S, 1, generator=g, dtype=torch.float64).expand(S, B).t()  # stride-0, transposed
    assert not q.is_contiguous() and not k.is_contiguous() and 0 in v.stride() and 0 in kpm.stride()
    assert not attn_mask.is_contiguous()

    def run(q, k, v, am, kp):
        leaves = [t.detach().clone() if t.is_contiguous() else t.detach() for t in (q, k, v)]
        leaves = [t.requires_grad_() for t in leaves]
        out, w = ours(*leaves, attn_mask=am, key_padding_mask=kp, need_weights=need_weights)
        grads = torch.autograd.grad(out.sum() + (0 if w is None else w.sum()), leaves + list(ours.parameters()))
        return out, w, grads

    strided = run(q, k, v, attn_mask, kpm)
    dense = run(*(t.contiguous() for t in (q, k, v)), attn_mask.contiguous(), kpm.contiguous())
    torch.testing.assert_close(strided[0], dense[0], rtol=1e-12, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(strided[1], dense[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(strided[2], dense[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a (B*H, L, S) mask expanded from one head
    m3 = torch.randn(1, L, S, generator=g, dtype=torch.float64).expand(B * 2, L, S)
    a, _ = ours(q, k, v, attn_mask=m3, need_weights=need_weights)
    b, _ = ours(q, k, v, attn_mask=m3.contiguous(), need_weights=need_weights)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- determinism ---------------------------------------------------------------------------------
@NEED_WEIGHTS
@each_backend
def test_same_seed_same_dropout(backend, need_weights):
    """Train mode, dropout > 0: the same seed gives the same outputs, weights and gradients; another
    seed gives others."""
    torch.manual_seed(0)
    ours = MultiheadAttention(8, 2, dropout=0.5, add_bias_kv=True).train()
    ours.backend = backend
    x = torch.randn(2, 5, 8)

    def once(seed):
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        out, w = ours(xx, xx, xx, need_weights=need_weights)
        grads = torch.autograd.grad(out.sum(), [xx, *ours.parameters()])
        return out, w, grads

    with torch.random.fork_rng():
        a, b, c = once(1), once(1), once(2)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    if need_weights:
        assert torch.equal(a[1], b[1])
        assert not torch.equal(a[1], c[1])
    for ga, gb in zip(a[2], b[2]):
        assert torch.equal(ga, gb)


@NEED_WEIGHTS
@each_backend
def test_use_deterministic_algorithms(backend, need_weights):
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    theirs, ours = pair(torch.float32, seed=9, embed_dim=8, num_heads=2, batch_first=True, add_zero_attn=True)
    ours.backend = backend
    x = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool).triu(1)
    try:
        torch.use_deterministic_algorithms(True)
        runs = []
        for _ in range(2):
            out, w = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
            runs.append((out, torch.autograd.grad(out.sum(), [x, *ours.parameters()])))
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
    assert torch.are_deterministic_algorithms_enabled() == before
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    t_out, _ = theirs(x, x, x, attn_mask=mask, need_weights=need_weights)
    torch.testing.assert_close(o1, t_out)
