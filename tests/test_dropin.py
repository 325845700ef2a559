"""A true drop-in: `isinstance(ours, torch.nn.MultiheadAttention)` holds, and code that special-cases
torch's class keeps working with ours: a client that dispatches on isinstance calls our forward,
`quantize_dynamic` leaves the module working, `torch.fx.symbolic_trace` keeps it a leaf, whole-module
`torch.load(weights_only=True)` works with our allow-list, and `out_proj` runs as a module (its hooks
fire). `type(m) is torch.nn.MultiheadAttention` is the one check that tells the two apart.
"""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import multihead
from multihead import MultiheadAttention, RotaryEmbedding, module
from multihead.module import FusedKernelOff

E, H = 8, 2


class GraphLayer(nn.Module):
    """Shaped like real clients (a graph-transformer layer): the global attention runs only
    `if isinstance(self.attn, torch.nn.MultiheadAttention)`; anything else is silently skipped."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.local = nn.Linear(E, E)
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.local(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            h = h + self.attn(x, x, x, need_weights=False)[0]
        return h


def _pair(**config):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=True, **config)
    return theirs, MultiheadAttention.from_torch(theirs)


def test_isinstance_and_the_check_that_tells_them_apart():
    theirs, ours = _pair()
    assert isinstance(ours, nn.MultiheadAttention) and isinstance(theirs, nn.MultiheadAttention)
    assert type(theirs) is nn.MultiheadAttention and type(ours) is not nn.MultiheadAttention
    assert not isinstance(theirs, MultiheadAttention)


@pytest.mark.parametrize(
    "config",
    [dict(num_kv_heads=1), dict(rotary=RotaryEmbedding(E // H)), dict(window=(1, 0))],
    ids=["gqa", "rotary", "window"],
)
def test_extended_modules_pass_isinstance_with_truthful_layout(config):
    """Decided: one class, so GQA/RoPE/window modules pass isinstance too (clients that check and
    call get our forward with every feature). The layout attributes stay true to the weights."""
    m = MultiheadAttention(E, H, **config)
    assert isinstance(m, nn.MultiheadAttention)
    packed = "num_kv_heads" not in config
    assert m._qkv_same_embed_dim is packed
    assert (m.in_proj_weight is not None) is packed and (m.q_proj_weight is None) is packed


def test_client_dispatching_on_isinstance_calls_our_forward(monkeypatch):
    theirs, ours = _pair()
    torch.manual_seed(1)
    client_theirs = GraphLayer(theirs)
    client_ours = GraphLayer(ours)
    client_ours.local.load_state_dict(client_theirs.local.state_dict())
    calls = []
    forward = MultiheadAttention.forward
    monkeypatch.setattr(MultiheadAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(2))
    target = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for client in (client_theirs, client_ours):
        loss = nn.functional.mse_loss(client(x), target)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(client.parameters())))
    assert calls == [1]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for a, b, (name, _) in zip(grads[1], grads[0], client_ours.named_parameters()):
        assert a.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")  # noqa: B023


def test_torchs_methods_are_ours_or_torchs_on_purpose():
    ours = MultiheadAttention
    torchs = nn.MultiheadAttention
    for name in ("__init__", "_reset_parameters", "__setstate__", "forward"):
        assert ours.__dict__[name] is not torchs.__dict__[name], name
    assert ours.merge_masks is torchs.merge_masks  # torch's mask arithmetic, inherited on purpose
    # torch's __init__ never ran: no torch-only state, our registration order
    m = MultiheadAttention(E, H, kdim=3, vdim=5, add_bias_kv=True)
    assert list(m._parameters) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_weight",
                                   "in_proj_bias", "bias_k", "bias_v"]  # fmt: skip


def test_out_proj_is_torchs_class_and_state_dict_is_unchanged():
    theirs, ours = _pair()
    assert type(ours.out_proj) is NonDynamicallyQuantizableLinear is type(theirs.out_proj)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("spec", [None, {nn.Linear}], ids=["default_spec", "linear_spec"])
def test_quantize_dynamic_leaves_the_module_working(spec):
    theirs, ours = _pair()
    x = torch.randn(2, 5, E)
    results = []
    for attn in (theirs, ours):
        model = nn.Sequential()
        model.add_module("attn", attn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            quantized = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
        assert type(quantized.attn.out_proj) is NonDynamicallyQuantizableLinear
        with torch.no_grad():
            results.append(quantized.attn(x, x, x))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


class TwoAttentions(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.norm = nn.LayerNorm(E)

    def forward(self, x, mask):
        out, weights = self.attn(x, x, x, attn_mask=mask)
        return self.norm(out), weights


def test_fx_symbolic_trace_keeps_our_module_a_leaf():
    theirs, ours = _pair()
    graphs = [torch.fx.symbolic_trace(TwoAttentions(m)) for m in (theirs, ours)]
    kinds = [[(n.op, n.target) for n in g.graph.nodes if n.op == "call_module"] for g in graphs]
    assert kinds[0] == kinds[1] == [("call_module", "attn"), ("call_module", "norm")]
    x = torch.randn(2, 5, E)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    traced = graphs[1](x, mask)
    eager = TwoAttentions(ours)(x, mask)
    assert isinstance(graphs[1].attn, MultiheadAttention)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_whole_module_weights_only_load(training):
    """The allow-list covers out_proj's class and FusedKernelOff with its hook."""
    _, ours = _pair(add_bias_kv=True)
    ours.train(training)
    ours.backend = "reference"
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(multihead.safe_globals()):
        loaded = torch.load(buf, weights_only=True)
    assert type(loaded) is MultiheadAttention and loaded.training == training and loaded.backend == "reference"
    assert len(loaded._fused_kernel_off._forward_pre_hooks) == 1
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x, x), ours(x, x, x), rtol=0, atol=0)


def test_the_hook_that_keeps_torchs_fused_kernel_off_is_on_a_child_that_never_runs():
    """torch's encoder layer looks for a hook on any of its modules; ours carries it on a child that is
    never called, so our own calls keep nn.Module's fast path (no hook on the module itself)."""
    import copy

    m = MultiheadAttention(E, H)
    for mode in (True, False):
        m.train(mode)
        assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0
        assert [len(c._forward_pre_hooks) for c in m.modules() if isinstance(c, FusedKernelOff)] == [1]
    assert len(copy.deepcopy(m)._fused_kernel_off._forward_pre_hooks) == 1
    assert set(m.state_dict()) == set(nn.MultiheadAttention(E, H).state_dict())  # no state of its own
    calls = []
    m._fused_kernel_off.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 5, E)
    m(x, x, x)
    assert calls == []  # never called


def test_pickles_from_before_the_child_migrate():
    """A module pickled when the hook sat on the module itself loads with the child instead."""
    m = MultiheadAttention(E, H).eval()
    del m._modules["_fused_kernel_off"]
    m.register_forward_pre_hook(module._our_forward_runs)
    loaded = pickle.loads(pickle.dumps(m))
    assert len(loaded._forward_pre_hooks) == 0
    assert isinstance(loaded._fused_kernel_off, FusedKernelOff)


# ---- out_proj runs as a module; the output is not a view ---------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_out_proj_hooks_fire_and_output_is_not_a_view(batch_first, batched):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, batch_first=batch_first)
    ours = MultiheadAttention.from_torch(theirs)
    seen = []
    ours.out_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    shape = (2, 5, E) if batch_first else (5, 2, E)
    x = torch.randn(shape if batched else (5, E))
    out, _ = ours(x, x, x)
    expected, _ = theirs(x, x, x)
    assert len(seen) == 1
    assert not out._is_view()
    assert out.stride() == expected.stride()  # torch's (L, B, E) memory layout
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.mul_(2)  # in place on the result is fine (no view of an autograd intermediate)


# ---- mixed parameter dtypes ---------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 3])
def test_bias_of_another_dtype_is_cast_to_the_weights(batch_first, kdim):
    torch.manual_seed(0)
    m = MultiheadAttention(4, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, dtype=torch.float64).eval()
    with torch.no_grad():
        m.in_proj_bias.normal_()
    exact = MultiheadAttention.from_torch(m.to_torch())  # float64 throughout
    with torch.no_grad():
        exact.in_proj_bias.copy_(m.in_proj_bias.half().double())
    m.in_proj_bias = nn.Parameter(m.in_proj_bias.detach().half())
    q = torch.randn(4, 4, 4, dtype=torch.float64)
    k = torch.randn(4, 4, kdim or 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, k), exact(q, k, k), rtol=0, atol=0)


# ---- backend: validated on assignment, shown in repr --------------------------------------------
def test_backend_assignment_is_validated_and_shown():
    m = MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="backend must be one of"):
        m.backend = "fast"
    assert m.backend is None and "backend" not in repr(m)
    m.backend = "blockwise"
    assert "backend='blockwise'" in repr(m)
    m.backend = None
    assert m.backend is None


def test_fsdp2_fully_shard_out_proj():
    """FSDP2 on `module.out_proj` (one process, gloo): its hooks run because out_proj is called as a
    module; numbers and gradients are the unsharded module's; in-place ops on the output are safe."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of another test")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        plain = MultiheadAttention(E, H)
        sharded = MultiheadAttention(E, H)
        sharded.load_state_dict(plain.state_dict())
        fully_shard(sharded.out_proj)
        x = torch.randn(2, 5, E)
        outs = []
        for m in (plain, sharded):
            out, _ = m(x, x, x)
            out.add_(1.0)  # in place on the returned output
            out.square().sum().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
        grad = sharded.out_proj.weight.grad
        torch.testing.assert_close(grad.full_tensor(), plain.out_proj.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sharded.in_proj_weight.grad, plain.in_proj_weight.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
