"""Every path on CUDA, in float32, bfloat16 and float16 (run with `pytest --device cuda`).

- parity: our module against torch.nn.MultiheadAttention (same weights), outputs, weights and every
  gradient, each judged against a float64 copy on the reference backend by the flash-attn rule (our
  error at most 2x torch's at the same precision, plus the rounding of the exact result);
- rows with no visible key on each SDPA kernel, forced with torch.nn.attention.sdpa_kernel (flash,
  efficient, cuDNN, math): zero output rows and finite zero gradients (a kernel that cannot take the
  mask at all is skipped with its reason);
- the blockwise, windowed and triton backends forced, against the float64 reference;
- the KV cache: a cached decode equals one causal pass, eagerly and with the decode step under
  torch.compile(mode="reduce-overhead") (CUDA graphs).

Skipped without `--device cuda` or without CUDA. Notation: B batch, L query length, S key length,
E embed dim, H heads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multihead import MultiheadAttention
from multihead.cache import KVCache
from multihead.rotary import RotaryEmbedding

from helpers import cotangent, first_error, pair


@pytest.fixture(autouse=True)
def cuda_only(request):
    if "cpu_too" in request.keywords:
        return
    if request.config.getoption("--device") != "cuda":
        pytest.skip("CUDA tests run with --device cuda")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
CUDA = torch.device("cuda")


def rule(ours, theirs, exact, name):
    """flash-attn rule with the rounding floor of the low precision."""
    floor = 2 * first_error(exact.to(ours.dtype), exact) + 1e-6 * max(1.0, exact.abs().max().item())
    ours_err, theirs_err = first_error(ours, exact), first_error(theirs, exact)
    assert torch.isfinite(ours).all(), name
    assert ours_err <= 2 * theirs_err + floor, f"{name}: ours err {ours_err:.3g} vs torch err {theirs_err:.3g}"


def masks(kind: str, B: int, L: int, S: int, g: torch.Generator):
    """(attn_mask, key_padding_mask, is_causal) on CUDA; bool masks keep key 0 visible."""
    attn_mask = kpm = None
    causal = False
    if kind == "causal":
        attn_mask, causal = torch.ones(L, S, dtype=torch.bool).triu(1), True
    elif kind == "bool":
        attn_mask = torch.rand(L, S, generator=g) < 0.3
        attn_mask[:, 0] = False
    elif kind == "float":
        attn_mask = torch.randn(L, S, generator=g)
    elif kind == "kpm":
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[:, 0] = False
    return (None if attn_mask is None else attn_mask.to(CUDA)), (None if kpm is None else kpm.to(CUDA)), causal


def forward_backward(module, x, attn_mask, kpm, causal, need_weights, average, dtype):
    """[out, weights, dx, *parameter grads] in `dtype` (inputs and float masks cast to it)."""
    x = x.detach().clone().to(dtype).requires_grad_()
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    out, w = module(
        x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights,
        average_attn_weights=average, is_causal=causal,
    )  # fmt: skip
    g = torch.Generator(device=CUDA).manual_seed(7)
    loss = (out * cotangent(out, g)).sum()
    if w is not None:
        loss = loss + (w * cotangent(w, g)).sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out, w, *grads]


# (mask, need_weights, average): every mask with and without weights, both weight modes, few kernel
# variants to compile (the GPU check has minutes)
PARITY = [
    ("none", True, True),
    ("none", False, True),
    ("causal", True, False),
    ("causal", False, True),
    ("bool", True, True),
    ("bool", False, True),
    ("float", True, False),
    ("kpm", True, True),
    ("kpm", False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "need_weights", "average"), PARITY, ids=[f"{k}-{w}-{a}" for k, w, a in PARITY])
def test_parity_with_torch(kind, need_weights, average, dtype):
    B, L, E, H = 2, 77, 64, 4
    theirs, ours = pair(torch.float32, seed=3, embed_dim=E, num_heads=H, batch_first=True, device=CUDA)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    exact = MultiheadAttention.from_torch(copy.deepcopy(theirs).double())
    exact.backend = "reference"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, generator=g).to(CUDA, dtype)  # rounded once: the float64 copy sees these values
    attn_mask, kpm, causal = masks(kind, B, L, L, g)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    args = (x, attn_mask, kpm, causal, need_weights, average)
    got = forward_backward(ours, *args, dtype)
    want = forward_backward(theirs, x, attn_mask, kpm, False, need_weights, average, dtype)
    ref = forward_backward(exact, *args, torch.float64)
    for i, (a, b, c) in enumerate(zip(got, want, ref)):
        if c is None:
            assert a is None and b is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, i
        rule(a, b, c, ["out", "weights", "dx"][i] if i < 3 else f"param {i - 3}")


# ---- rows with no visible key on each SDPA kernel ---------------------------------------------------
KERNELS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_with_no_visible_key_on_each_sdpa_kernel(kernel, dtype):
    """need_weights=False goes to SDPA: batch element 1 pads every key, and (bool attn_mask) query
    row 5 hides every key. Their outputs must be zeros, everything finite, gradients zero there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, L, E, H = 2, 40, 64, 4
    m = MultiheadAttention(E, H, device=CUDA, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, E, generator=g).to(CUDA, dtype).requires_grad_()
    kpm = torch.zeros(B, L, dtype=torch.bool, device=CUDA)
    kpm[1] = True
    attn_mask = torch.zeros(L, L, dtype=torch.bool, device=CUDA)
    attn_mask[5] = True
    with sdpa_kernel(getattr(SDPBackend, kernel)):
        try:
            out, _ = m(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
        except RuntimeError as err:
            if "No available kernel" in str(err) or "not supported" in str(err).lower():
                pytest.skip(f"{kernel} cannot take this mask on this GPU: {str(err).splitlines()[0]}")
            raise
        out.float().square().sum().backward()
    attention_rows = out - m.out_proj.bias  # a row that sees no key outputs only the out-projection bias
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert attention_rows[1].abs().max() == 0 and attention_rows[0, 5].abs().max() == 0
    assert torch.isfinite(m.in_proj_weight.grad).all()


# ---- our backends, forced -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", ["blockwise", "windowed", "triton"])
def test_backends_against_reference(backend, dtype):
    """Each backend through the module (window (16, 0) for windowed; key padding that hides batch
    element 1 entirely for the others) against a float64 reference copy, judged against the reference
    backend run at the same precision."""
    B, L, E, H = 2, 300, 128, 4
    window = (16, 0) if backend == "windowed" else None
    need_weights = backend != "windowed"
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, num_kv_heads=2, window=window, device=CUDA)
    for p in ours.parameters():
        if p.dim() == 1:
            nn.init.normal_(p, 0, 0.1)
    low = copy.deepcopy(ours).to(dtype)
    low.backend = "reference"
    exact = copy.deepcopy(ours).double()
    exact.backend = "reference"
    ours = ours.to(dtype)
    ours.backend = backend
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, generator=g).to(CUDA, dtype)
    kpm = None
    if backend != "windowed":
        kpm = torch.rand(B, L, generator=g).to(CUDA) < 0.2
        kpm[1] = True
    results = []
    for m, dt in ((ours, dtype), (low, dtype), (exact, torch.float64)):
        results.append(forward_backward(m, x, None, kpm, backend == "blockwise", need_weights, True, dt))
    for i, (a, b, c) in enumerate(zip(*results)):
        if c is None:
            continue
        rule(a, b, c, f"{backend} result {i}")
    if kpm is not None:  # batch element 1 sees nothing: its attention output is the out-projection bias
        torch.testing.assert_close(results[0][0][1], ours.out_proj.bias.expand(L, E), rtol=0, atol=0)


def test_dispatch_picks_triton_for_weights_on_cuda():
    pytest.importorskip("triton")
    import multihead.attend as backends
    from multihead.masks import AttentionMask

    q = torch.randn(1, 4, 64, 64, device=CUDA, dtype=torch.bfloat16)
    mask = AttentionMask(1, 4, 64, 64, device=CUDA)
    assert backends.choose(q, q, q, mask, need_weights=True).name == "triton"
    assert backends.choose(q, q, q, mask, need_weights=False).name == "sdpa"


# ---- KV cache ---------------------------------------------------------------------------------------------
def decoder(E, H, kv_heads, total, dtype):
    torch.manual_seed(0)
    rope = RotaryEmbedding(E // H, max_seq_len=total, device=CUDA)
    m = MultiheadAttention(E, H, num_kv_heads=kv_heads, rotary=rope, device=CUDA, dtype=dtype)
    return m.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kv_cache_decode_equals_one_causal_pass(dtype):
    E, H, kv, prompt, steps, B = 128, 8, 2, 11, 9, 2
    total = prompt + steps
    m = decoder(E, H, kv, total, dtype)
    x = torch.randn(B, total, E, device=CUDA, dtype=dtype)
    cache = KVCache(B, total, kv, E // H, device=CUDA, dtype=dtype)
    with torch.no_grad():
        rows = [m(x[:, :prompt], x[:, :prompt], x[:, :prompt], need_weights=False, kv_cache=cache)[0]]
        for t in range(prompt, total):
            h = x[:, t : t + 1]
            rows.append(m(h, h, h, need_weights=False, kv_cache=cache)[0])
        full = m(x, x, x, need_weights=False, is_causal=True)[0]
        exact = m.double()(*(x.double(),) * 3, need_weights=False, is_causal=True)[0]
    got = torch.cat(rows, 1)
    rule(got, full, exact, "cached decode")


def test_decode_step_under_cuda_graphs():
    """The decode step compiled with mode="reduce-overhead" (CUDA graphs, static shapes) matches the
    eager step token by token, without recompiling and without skipping the graph."""
    from torch._dynamo.utils import counters

    E, H, kv, prompt, steps, B = 256, 8, 2, 16, 12, 1
    total = prompt + steps + 1
    m = decoder(E, H, kv, total, torch.bfloat16)
    x = torch.randn(B, total, E, device=CUDA, dtype=torch.bfloat16)
    caches = [KVCache(B, total, kv, E // H, device=CUDA, dtype=torch.bfloat16) for _ in range(2)]

    def step(cache, h):  # (B, 1, E) -> (B, 1, E)
        return m(h, h, h, need_weights=False, kv_cache=cache)[0]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    counters.clear()
    with torch.no_grad():
        for cache in caches:  # eager prefill
            step(cache, x[:, :prompt])
        for i, t in enumerate(range(prompt, prompt + steps)):
            h = x[:, t : t + 1].clone()
            want = step(caches[0], h)
            torch.compiler.cudagraph_mark_step_begin()
            with torch._dynamo.config.patch(error_on_recompile=i > 1):
                got = compiled(caches[1], h).clone()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [prompt + steps] * B
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, f"CUDA graphs were skipped {skips} times"


@pytest.mark.cpu_too
def test_gpu_benchmark_exits_cleanly_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: scripts/gpu_check.sh runs the benchmark")
    from multihead.benchmarks import gpu

    assert gpu.main(["--out", str(tmp_path), "--lengths", "1024"]) == 0
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()) and gpu.SCENARIOS == {}
