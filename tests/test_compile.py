"""torch.compile: fullgraph (no graph break) on every path, no recompile across lengths with
dynamic=True, and compiled == eager (forward, backward, fully masked rows zero).

The matrix runs with a counting eager backend (Dynamo's tracing is what can break or recompile; fast);
inductor parity is checked on a few configurations only (each compile takes seconds here)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from multihead import KVCache, MultiheadAttention, RotaryEmbedding
from multihead.attend import blockwise_op

E, H = 16, 4
D = E // H


@pytest.fixture(autouse=True)
def no_compile_caches():
    """Each test compiles afresh: a graph cached by an earlier test with other shapes (AOTAutograd's and
    inductor's caches outlive `torch._dynamo.reset()`) would bring that test's shape guards along and
    turn a recompile count into a statement about test order."""
    import torch._functorch.config
    import torch._inductor.config

    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield


CONFIGS = {
    "plain": {},
    "gqa": {"num_kv_heads": 2},
    "rope": {"rotary": RotaryEmbedding(D, max_seq_len=64)},
    "window": {"window": (2, 1)},
    "gqa_rope_window": {"num_kv_heads": 1, "rotary": RotaryEmbedding(D, max_seq_len=64), "window": 3},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
}


def _masks(kind: str, batch: int, length: int) -> dict:
    """Call keyword arguments for one mask kind at (B, L); every kind with a mask hides all keys from
    at least one query row (fully masked rows must give zeros)."""
    g = torch.Generator().manual_seed(length * 10 + batch)
    some = torch.rand(length, length, generator=g) < 0.3
    some[-1] = True  # the last query row sees no key
    if kind == "none":
        return {}
    if kind == "is_causal":
        return {"is_causal": True}
    if kind == "causal_pattern":  # a user mask equal to the causal pattern, with the is_causal hint
        return {"attn_mask": torch.ones(length, length, dtype=torch.bool).triu(1), "is_causal": True}
    if kind == "bool_2d":
        return {"attn_mask": some}
    if kind == "float_2d":
        return {"attn_mask": torch.zeros(length, length).masked_fill(some, float("-inf"))}
    if kind == "bool_3d":
        return {"attn_mask": some.expand(batch * H, -1, -1).clone()}
    if kind == "float_3d":
        mask = torch.randn(batch * H, length, length, generator=g)
        return {"attn_mask": mask.masked_fill(some, float("-inf"))}
    padding = torch.rand(batch, length, generator=g) < 0.3
    padding[0] = True  # batch element 0: every key is padding
    if kind == "padding_bool":
        return {"key_padding_mask": padding}
    if kind == "padding_float":
        return {"key_padding_mask": torch.zeros(batch, length).masked_fill(padding, float("-inf"))}
    raise AssertionError(kind)


MASKS = [
    "none",
    "is_causal",
    "causal_pattern",
    "bool_2d",
    "float_2d",
    "bool_3d",
    "float_3d",
    "padding_bool",
    "padding_float",
]


def _run(module, batch: int, length: int, kind: str, need_weights: bool, seed: int = 0):
    """Forward and backward; returns (out, weights, input grad, parameter grads)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, length, E, requires_grad=True)
    out, weights = module(x, x, x, need_weights=need_weights, **_masks(kind, batch, length))
    loss = out.square().sum() + (weights.square().sum() if weights is not None else 0)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return out, weights, grads


def _assert_same(got, want):
    for a, b in zip(got[:2], want[:2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _fully_masked_rows_zero(kind: str, out, weights, batch: int, length: int, model_out_bias):
    """Rows whose query sees no key: attention gives 0, so the module's output is its out-proj bias."""
    if kind in ("bool_2d", "float_2d", "bool_3d", "float_3d"):
        rows = out[:, -1]  # (B, E)
        w = None if weights is None else weights[:, -1]
    elif kind.startswith("padding"):
        rows = out[0]  # (L, E)
        w = None if weights is None else weights[0]
    else:
        return
    torch.testing.assert_close(rows, model_out_bias.expand_as(rows), rtol=0, atol=1e-6)
    if w is not None:
        assert not w.any()


# every mask kind on the plain module and on GQA + RoPE + window together; each other config on three
MATRIX = [(c, m) for c in ("plain", "gqa_rope_window") for m in MASKS] + [
    (c, m) for c in ("gqa", "rope", "window", "bias_kv_zero_attn") for m in ("none", "bool_3d", "padding_float")
]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(("config", "kind"), MATRIX)
def test_fullgraph_no_recompile_matches_eager(one_thread, config, kind, need_weights):
    """One graph (fullgraph=True), one compile for every length >= 2 and batch >= 2 (dynamic=True),
    train mode, forward and backward equal to eager, fully masked rows zero."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, **CONFIGS[config])
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=True)
    for batch, length in ((2, 5), (3, 8)):
        got = _run(compiled, batch, length, kind, need_weights)
        _assert_same(got, _run(module, batch, length, kind, need_weights))
        if not CONFIGS[config].get("add_bias_kv"):
            _fully_masked_rows_zero(kind, got[0], got[1], batch, length, module.out_proj.bias)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 2 shapes"


@pytest.mark.parametrize("need_weights", [True, False])
def test_eval_no_grad_and_per_head_weights(one_thread, need_weights):
    """eval mode under no_grad, and average_attn_weights=False: one graph, one compile."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, num_kv_heads=2).eval()
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for length in (4, 7, 13):
            x = torch.randn(2, length, E)
            kw = {"need_weights": need_weights, "average_attn_weights": False, **_masks("bool_2d", 2, length)}
            got, want = compiled(x, x, x, **kw), module(x, x, x, **kw)
            torch.testing.assert_close(got[0], want[0])
            if need_weights:
                assert got[1].shape == (2, H, length, length)
                torch.testing.assert_close(got[1], want[1])
    assert counter.frame_count == 1


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_graph_seed(one_thread, need_weights):
    """Dropout > 0 in train mode: no graph break; the seed is drawn in the graph from the global RNG, so
    the same manual_seed gives eager's exact result (eager backend), and weights are the applied ones."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, dropout=0.5)
    module.backend = "blockwise"  # eager's small calls would take direct (torch's dropout RNG, not the op's)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=True)
    for length in (5, 9):
        got = _run(compiled, 2, length, "bool_2d", need_weights, seed=3)
        _assert_same(got, _run(module, 2, length, "bool_2d", need_weights, seed=3))
        if need_weights:
            assert (got[1] == 0).any()  # dropout did drop
    assert counter.frame_count == 1


def test_windowed_backend_static_compile(one_thread):
    """With static shapes (dynamic=False) the windowed backend serves a long sliding window: one
    graph, no break (its band masks are built in the graph, not taken from the eager cache)."""
    from multihead.attend import choose, windowed

    torch.manual_seed(0)
    module = MultiheadAttention(E, H, window=(8, 0)).eval()
    x = torch.randn(1, 256, E)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, x, x, need_weights=False)[0], module(x, x, x, need_weights=False)[0])
    assert counter.frame_count == 1
    from multihead.masks import AttentionMask

    q = torch.randn(1, H, 256, D)
    assert choose(q, q, q, AttentionMask(1, H, 256, 256, causal=True, window=(8, 0)), need_weights=False) is windowed


def test_kv_cache_decode_weights(one_thread):
    """A KV-cache step with weights (the custom op on a cache's dense mask): one graph for the decode
    steps, matching eager."""
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, num_kv_heads=2, rotary=RotaryEmbedding(D, max_seq_len=32)).eval()
    caches = [KVCache(2, 16, 2, D) for _ in range(2)]
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    with torch.no_grad():
        prompt = torch.randn(2, 4, E)
        module(prompt, prompt, prompt, kv_cache=caches[0])
        module(prompt, prompt, prompt, kv_cache=caches[1])
        for _ in range(3):
            x = torch.randn(2, 1, E)
            want = module(x, x, x, kv_cache=caches[0])
            got = compiled(x, x, x, kv_cache=caches[1])
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1][..., : want[1].shape[-1]], want[1])
            assert not got[1][..., want[1].shape[-1] :].any()  # keys not yet cached: zero weight
    assert counter.frame_count == 1


def test_dispatch_under_compile_uses_the_op():
    """The dispatch table swaps blockwise for its custom op only while compiling."""
    from multihead.attend import blockwise, choose
    from multihead.masks import AttentionMask

    q = torch.randn(1, 2, 3, 4)
    mask = AttentionMask(1, 2, 3, 3)
    assert choose(q, q, q, mask, need_weights=True, backend="blockwise") is blockwise
    seen = []

    def probe(q):
        seen.append(choose(q, q, q, mask, need_weights=True))  # direct declines while compiling
        return q

    torch._dynamo.reset()
    torch.compile(probe, backend="eager", fullgraph=True)(q)
    assert seen == [blockwise_op]


def test_custom_op_opcheck(one_thread):
    """torch.library.opcheck: schema, fake tensor, autograd registration and dispatch are consistent."""
    q, k, v = (torch.randn(2, 4, 5, 3, requires_grad=True) for _ in range(3))
    padding = torch.tensor([[False] * 5, [False, True, False, False, True]])
    seed = torch.zeros((), dtype=torch.int64)
    args = (q, k, v, padding, None, False, 0, True, 1, 0, 0.5, 0.0, True, True, seed)  # window (1, 0)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")  # not the slow aot_dispatch
    torch.library.opcheck(torch.ops.multihead.blockwise_attention, args, test_utils=tests)


# ---- inductor: a handful of configurations (each compile takes seconds) -------------------------------
INDUCTOR = {
    "weights_bool_mask_fully_masked_row": ({}, "bool_2d", True),
    "no_weights_padding_fully_masked": ({"num_kv_heads": 2}, "padding_bool", False),
    "weights_gqa_rope_causal": ({"num_kv_heads": 2, "rotary": RotaryEmbedding(D, max_seq_len=64)}, "is_causal", True),
}


@pytest.mark.parametrize("name", list(INDUCTOR))
def test_inductor_matches_eager(name):
    config, kind, need_weights = INDUCTOR[name]
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, **config)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for batch, length in ((2, 6), (3, 9)):
        with torch._dynamo.config.patch(error_on_recompile=length > 6):
            got = _run(compiled, batch, length, kind, need_weights)
        _assert_same(got, _run(module, batch, length, kind, need_weights))
        _fully_masked_rows_zero(kind, got[0], got[1], batch, length, module.out_proj.bias)
