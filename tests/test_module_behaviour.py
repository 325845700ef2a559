"""The module as an nn.Module: meta-device construction, factory kwargs, torch.func.functional_call,
parameter order (torch's, for optimizer checkpoints), an optimizer state moving from torch's module to
ours, torch.compile, and from_torch / to_torch.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch.func import functional_call

from multihead import MultiheadAttention

from helpers import pair

E, H = 8, 2


def inputs(m, seed=0, dtype=None, L=3, S=4):
    dtype = dtype or m.out_proj.weight.dtype
    g = torch.Generator().manual_seed(seed)
    shape = (lambda n, d: (2, n, d)) if m.batch_first else (lambda n, d: (n, 2, d))
    return (
        torch.randn(shape(L, m.embed_dim), generator=g, dtype=dtype),
        torch.randn(shape(S, m.kdim), generator=g, dtype=dtype),
        torch.randn(shape(S, m.vdim), generator=g, dtype=dtype),
    )


# ---- construction --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config", [dict(), dict(kdim=3, vdim=5, add_bias_kv=True), dict(bias=False), dict(num_kv_heads=1, add_bias_kv=True)]
)
def test_meta_construction_then_to_empty_and_reset(config):
    """Built on the meta device (no memory, no init), materialised with to_empty, initialised with
    reset_parameters: a working module with exactly the initialisation of a CPU-built one."""
    meta = MultiheadAttention(E, H, device="meta", **config)
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(11)
    meta.reset_parameters()
    torch.manual_seed(11)
    cpu = MultiheadAttention(E, H, **config)
    for (n, a), (_, b) in zip(meta.named_parameters(), cpu.named_parameters()):
        assert a.device.type == "cpu" and torch.equal(a, b), n
    q, k, v = inputs(meta)
    out, w = meta(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out, cpu(q, k, v)[0], rtol=0, atol=0)


def test_factory_kwargs_dtype():
    m = MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    out, w = m(*inputs(m))
    assert out.dtype == w.dtype == torch.float64


def test_reset_parameters_reinitialises_everything():
    m = MultiheadAttention(E, H, add_bias_kv=True)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(7.0)
    m.reset_parameters()
    for n, p in m.named_parameters():
        assert not torch.all(p == 7.0), n


# ---- functional_call -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(), dict(kdim=3, vdim=5, add_bias_kv=True), dict(num_kv_heads=1)])
def test_functional_call_equals_loading_the_parameters(config):
    m = MultiheadAttention(E, H, **config)
    before = copy.deepcopy(m.state_dict())
    g = torch.Generator().manual_seed(1)
    replaced = {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}
    q, k, v = inputs(m)
    out, w = functional_call(m, replaced, (q, k, v), {"average_attn_weights": False})
    loaded = copy.deepcopy(m)
    loaded.load_state_dict(replaced)
    out2, w2 = loaded(q, k, v, average_attn_weights=False)
    assert torch.equal(out, out2) and torch.equal(w, w2)
    for n, p in m.state_dict().items():
        assert torch.equal(p, before[n]), f"functional_call changed {n}"


# ---- parameter order -----------------------------------------------------------------------------
FLAGS = list(itertools.product([True, False], [True, False], [True, False], [None, 3], [True, False]))


@pytest.mark.parametrize("bias,add_bias_kv,add_zero_attn,kdim,batch_first", FLAGS)
def test_parameter_order_is_torchs(bias, add_bias_kv, add_zero_attn, kdim, batch_first):
    kw = dict(
        bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim, vdim=kdim, batch_first=batch_first
    )
    theirs = torch.nn.MultiheadAttention(E, H, **kw)
    mine = MultiheadAttention(E, H, **kw)
    assert [(n, p.shape) for n, p in mine.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert [(n, t.shape) for n, t in mine.state_dict().items()] == [
        (n, t.shape) for n, t in theirs.state_dict().items()
    ]
    assert list(mine.named_buffers()) == list(theirs.named_buffers()) == []
    assert mine._qkv_same_embed_dim == theirs._qkv_same_embed_dim


# ---- optimizer state -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(), dict(kdim=3, vdim=5), dict(add_bias_kv=True, bias=False)])
@pytest.mark.parametrize("opt", ["Adam", "SGD"])
def test_optimizer_state_from_torch_continues_identically(config, opt):
    """torch's module trains a step; its optimizer state loads into an optimizer over ours (states
    are indexed by parameter position); the next steps give the same parameters."""
    theirs, _ = pair(torch.float64, seed=2, embed_dim=E, num_heads=H, batch_first=True, **config)
    make = {
        "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    }[opt]

    def step(module, optimizer, seed):
        q, k, v = inputs(module, seed=seed)
        optimizer.zero_grad()
        out, w = module(q, k, v)
        (out.square().mean() + w.square().mean()).backward()
        optimizer.step()

    opt_theirs = make(theirs.parameters())
    step(theirs, opt_theirs, seed=0)
    mine = MultiheadAttention.from_torch(theirs)
    opt_mine = make(mine.parameters())
    # through a checkpoint, as in real use (a live state_dict shares its state tensors)
    buf = io.BytesIO()
    torch.save(opt_theirs.state_dict(), buf)
    buf.seek(0)
    opt_mine.load_state_dict(torch.load(buf, weights_only=True))
    for seed in (1, 2):
        step(theirs, opt_theirs, seed)
        step(mine, opt_mine, seed)
    # tolerance: the key bias has an exactly-zero gradient up to round-off, which Adam normalises
    # to steps of size lr; everything else agrees to ~1e-15
    for (n, a), b in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m: f"{n}: {m}")  # noqa: B023


# ---- torch.compile -------------------------------------------------------------------------------
def _compiled_matches(module, compile_backend, masks, need_weights):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=compile_backend)
    q, k, v = inputs(module)
    for kw in masks:
        with torch.no_grad():
            eager = module(q, k, v, need_weights=need_weights, **kw)
            got = compiled(q, k, v, need_weights=need_weights, **kw)
        torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
        assert (got[1] is None) == (not need_weights)
        if need_weights:
            torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("need_weights", [True, False])
def test_compile_inductor(need_weights):
    """One small case through inductor (compiles in seconds here)."""
    torch.manual_seed(0)
    _compiled_matches(MultiheadAttention(E, H), "inductor", [dict()], need_weights)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(
    "config",
    [dict(), dict(kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=False), dict(num_kv_heads=1)],
)
def test_compile_aot_eager_with_masks(config, need_weights):
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, **config)
    causal = torch.ones(3, 4, dtype=torch.bool).triu(1)
    float_mask = torch.randn(3, 4).masked_fill(causal, float("-inf"))
    kpm = torch.tensor([[False, False, True, False], [True] * 4])
    masks = [dict(), dict(attn_mask=causal), dict(attn_mask=float_mask, key_padding_mask=kpm), dict(is_causal=True)]
    _compiled_matches(m, "aot_eager", masks, need_weights)


def test_compile_backward_matches_eager():
    torch.manual_seed(0)
    m = MultiheadAttention(E, H)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    q, k, v = inputs(m)
    grads = []
    for fn in (m, compiled):
        out, w = fn(q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool).triu(1))
        grads.append(torch.autograd.grad(out.sum() + w.sum(), list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- from_torch / to_torch -----------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_from_torch_keeps_layout_device_dtype_mode(training, batch_first, dtype, device):
    theirs = torch.nn.MultiheadAttention(E, H, dropout=0.1, batch_first=batch_first, dtype=dtype, device=device)
    theirs.train(training)
    mine = MultiheadAttention.from_torch(theirs)
    assert mine.batch_first == batch_first
    assert mine.training == training
    assert mine.dropout == 0.1
    for p in mine.parameters():
        assert p.dtype == dtype and p.device.type == device


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(bias=False),
        dict(add_bias_kv=True, add_zero_attn=True),
        dict(kdim=3, vdim=5),
        dict(batch_first=False),
    ],
)
def test_to_torch_round_trip(config):
    torch.manual_seed(3)
    mine = MultiheadAttention(E, H, dtype=torch.float64, **config).eval()
    theirs = mine.to_torch()
    assert type(theirs) is torch.nn.MultiheadAttention
    assert theirs.batch_first == mine.batch_first and not theirs.training
    back = MultiheadAttention.from_torch(theirs)
    assert list(back.state_dict()) == list(mine.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), mine.state_dict().values()))
    q, k, v = inputs(mine)
    with torch.no_grad():
        a, wa = mine(q, k, v)
        b, wb = theirs(q, k, v)
        c, wc = back(q, k, v)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-12)
    assert torch.equal(a, c) and torch.equal(wa, wc)


def test_to_torch_refuses_grouped_query_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadAttention(E, H, num_kv_heads=1).to_torch()
