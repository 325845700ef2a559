"""KVCache: what update writes, what the mask hides, errors, and a compiled decode step."""

from __future__ import annotations

import pytest
import torch

import multihead
from multihead.cache import KVCache
from multihead.rotary import RotaryEmbedding

B, HKV, D, MAX = 2, 3, 4, 12


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def expected_hidden(before: list[int], length: int, max_len: int, window=None) -> torch.Tensor:
    """Brute force: (B, 1, L, max_len), True unless j <= before[b] + t (and j >= before[b] + t - left)."""
    out = torch.ones(len(before), 1, length, max_len, dtype=torch.bool)
    for b, start in enumerate(before):
        for t in range(length):
            p = start + t
            for j in range(max_len):
                visible = j <= p and (window is None or window[0] is None or j >= p - window[0])
                out[b, 0, t, j] = not visible
    return out


@pytest.mark.parametrize("window", [None, (2, 0), (0, 0), (None, 0), (3, 5)])
def test_update_writes_at_lengths_and_masks(window):
    cache = KVCache(B, MAX, HKV, D)
    ks, vs = randn(B, HKV, 5, D, seed=1), randn(B, HKV, 5, D, seed=2)
    assert cache.positions(5).tolist() == [list(range(5))] * B
    k, v, hidden = cache.update(ks, vs, window=window)  # prefill 5
    # eager: the buffers up to the longest sequence (views); compiled: the whole buffers
    assert k.shape == v.shape == (B, HKV, 5, D) and hidden.shape == (B, 1, 5, 5)
    assert k.data_ptr() == cache.k.data_ptr() and v.data_ptr() == cache.v.data_ptr()
    assert hidden.dtype == torch.bool
    torch.testing.assert_close(k[:, :, :5], ks, rtol=0, atol=0)
    torch.testing.assert_close(v[:, :, :5], vs, rtol=0, atol=0)
    assert cache.lengths.tolist() == [5, 5] and cache.bound == 5
    assert torch.equal(hidden, expected_hidden([0] * B, 5, MAX, window)[..., :5])
    # decode one, then a chunk of three
    before = 5
    for n, seed in ((1, 3), (3, 4)):
        assert cache.positions(n).tolist() == [list(range(before, before + n))] * B
        kn, vn = randn(B, HKV, n, D, seed=seed), randn(B, HKV, n, D, seed=seed + 10)
        k, v, hidden = cache.update(kn, vn, window=window)
        nothing_hidden = n == 1 and (window is None or window[0] is None)  # eager: no mask needed at all
        assert (hidden is None) == nothing_hidden
        if nothing_hidden:
            hidden = torch.zeros(B, 1, 1, before + 1, dtype=torch.bool)
        torch.testing.assert_close(k[:, :, before : before + n], kn, rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, before : before + n], vn, rtol=0, atol=0)
        torch.testing.assert_close(k[:, :, :5], ks, rtol=0, atol=0)  # earlier keys untouched
        before += n
        assert k.shape[2] == hidden.shape[-1] == before
        assert torch.equal(hidden, expected_hidden([before - n] * B, n, MAX, window)[..., :before])
    assert cache.lengths.tolist() == [9, 9] and cache.bound == 9


def test_per_sequence_lengths_after_right_padded_prefill():
    cache = KVCache(B, MAX, HKV, D)
    prompt = randn(B, HKV, 6, D, seed=1)
    cache.update(prompt, prompt)  # both prompts padded to 6 tokens
    cache.rewind([3, 6])  # real lengths
    assert cache.positions(2).tolist() == [[3, 4], [6, 7]]
    new = randn(B, HKV, 2, D, seed=2)
    k, _, hidden = cache.update(new, new)
    torch.testing.assert_close(k[0, :, 3:5], new[0], rtol=0, atol=0)  # overwrote sequence 0's padding
    torch.testing.assert_close(k[1, :, 6:8], new[1], rtol=0, atol=0)
    torch.testing.assert_close(k[0, :, :3], prompt[0, :, :3], rtol=0, atol=0)
    assert cache.lengths.tolist() == [5, 8] and cache.bound == 8
    assert torch.equal(hidden, expected_hidden([3, 6], 2, MAX)[..., :8])
    hidden = cache.update(new[:, :, :1], new[:, :, :1], window=(1, 0))[2]
    assert torch.equal(hidden, expected_hidden([5, 8], 1, MAX, (1, 0))[..., :9])
    assert cache.update(new[:, :, :1], new[:, :, :1])[2] is not None  # unequal lengths: a mask is needed
    cache.reset()
    assert cache.lengths.tolist() == [0, 0] and cache.bound == 0 and not cache.k.any()
    with pytest.raises(ValueError, match="lengths must be between 0 and the current lengths"):
        cache.rewind([1, 0])
    with pytest.raises(ValueError, match="lengths must have shape \\(batch_size,\\) = \\(2,\\)"):
        cache.rewind([0, 0, 0])


def test_overflow_is_a_value_error_before_any_write():
    cache = KVCache(1, 4, 1, 2)
    x = randn(1, 1, 3, 2)
    cache.update(x, x)
    with pytest.raises(
        ValueError, match="KVCache overflow: 2 new token\\(s\\) on top of up to 3 cached exceed max_len=4"
    ):
        cache.update(x[:, :, :2], x[:, :, :2])
    assert cache.lengths.tolist() == [3] and cache.bound == 3  # nothing written
    cache.update(x[:, :, :1], x[:, :, :1])  # exactly full is fine
    with pytest.raises(ValueError, match="overflow"):
        cache.check_room(1)
    with pytest.raises(ValueError, match="length must be between 1 and max_len=4"):
        cache.positions(5)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, HKV, 1, D), "k_new has batch size 3, but the cache holds batch_size=2"),
        ((B, 1, 1, D), "k_new has 1 key/value heads, but the cache holds num_kv_heads=3"),
        ((B, HKV, 1, 5), "k_new has head dim 5, but the cache holds head_dim=4"),
        ((B, HKV, MAX + 1, D), "KVCache overflow: 13 new token\\(s\\) on top of up to 0 cached exceed max_len=12"),
        ((B, HKV, 0, D), "k_new has 0 new tokens; expected between 1 and max_len=12"),
        ((B, HKV, D), "k_new must be \\(B, Hkv, L, D\\)"),
    ],
)
def test_mismatch_errors(shape, match):
    cache = KVCache(B, MAX, HKV, D)
    with pytest.raises(ValueError, match=match):
        cache.update(torch.zeros(shape), torch.zeros(shape))


def test_other_errors_and_state_dict():
    cache = KVCache(B, MAX, HKV, D)
    x = torch.zeros(B, HKV, 1, D)
    with pytest.raises(ValueError, match="k_new and v_new must have the same shape"):
        cache.update(x, torch.zeros(B, HKV, 2, D))
    with pytest.raises(TypeError, match="v_new has dtype torch.float64, but the cache holds torch.float32"):
        cache.update(x, x.double())
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"max_len": 2.0}, "max_len must be a positive int"),
        ({"num_kv_heads": -1}, "num_kv_heads must be a positive int"),
    ]:
        args = {"batch_size": 1, "max_len": 4, "num_kv_heads": 1, "head_dim": 2} | kwargs
        with pytest.raises(ValueError, match=match):
            KVCache(**args)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        KVCache(1, 4, 1, 2, dtype=torch.int32)
    assert cache.state_dict() == {}
    assert KVCache(1, 4, 1, 2, dtype=torch.float64).half().k.dtype == torch.float16


def test_inference_mode():
    cache = KVCache(1, 4, 1, 2)
    with torch.inference_mode():
        x = torch.ones(1, 1, 2, 2)
        cache.update(x, x)
    assert cache.lengths.tolist() == [2]


@pytest.mark.parametrize("window", [None, (2, 0)])
def test_module_with_cache_equals_full_causal_attention(window):
    """Prefill 5 + decode 1 + chunk 3 + decode 1 through the cache == one causal pass (GQA, RoPE)."""
    torch.manual_seed(0)
    E, H, KV, T = 24, 6, 2, 10
    attn = multihead.MultiheadAttention(E, H, num_kv_heads=KV, rotary=RotaryEmbedding(E // H), window=window)
    x = torch.randn(B, T, E)
    with torch.no_grad():
        full, _ = attn(x, x, x, is_causal=True, need_weights=False)
        cache = KVCache(B, 16, KV, E // H)
        outs, start = [], 0
        for n in (5, 1, 3, 1):
            chunk = x[:, start : start + n]
            outs.append(attn(chunk, chunk, chunk, need_weights=False, kv_cache=cache)[0])
            start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_fullgraph():
    """rotary + update + attention compiled once with fullgraph=True (inductor, CPU); every later
    decode step reuses the graph (no recompiles) and matches eager."""
    Hq, T0, steps = 6, 5, 4
    rope = RotaryEmbedding(D, max_seq_len=MAX)

    def step(cache: KVCache, q, k, v):
        positions = cache.positions(q.shape[2])  # (B, L)
        q, k = rope(q, positions), rope(k, positions)
        k_all, v_all, hidden = cache.update(k, v, window=(6, 0))
        mask = None if hidden is None else ~hidden  # None: eager, nothing hidden
        return torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)

    eager_cache, compiled_cache = KVCache(B, MAX, HKV, D), KVCache(B, MAX, HKV, D)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        prompt = [randn(B, n, T0, D, seed=s) for n, s in ((Hq, 1), (HKV, 2), (HKV, 3))]
        step(eager_cache, *prompt)
        compiled_cache.update(rope(prompt[1], torch.arange(T0)), prompt[2])  # eager prefill
        for i in range(steps):
            q, k, v = (randn(B, n, 1, D, seed=10 * i + s) for n, s in ((Hq, 1), (HKV, 2), (HKV, 3)))
            want = step(eager_cache, q, k, v)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(compiled_cache, q, k, v)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert compiled_cache.lengths.tolist() == eager_cache.lengths.tolist() == [T0 + steps] * B
    torch.testing.assert_close(compiled_cache.k, eager_cache.k, rtol=1e-6, atol=1e-6)
    # compiled steps leave the Python-side counter unknown; the next eager call re-reads it
    assert compiled_cache.bound is None
    k, _, hidden = compiled_cache.update(*(randn(B, HKV, 1, D) for _ in range(2)), window=(2, 0))
    assert compiled_cache.bound == T0 + steps + 1 and k.shape[2] == hidden.shape[-1] == T0 + steps + 1
    with pytest.raises(ValueError, match="overflow"):
        compiled_cache.check_room(MAX)


@pytest.mark.parametrize("window", [None, (2, 0)])
@pytest.mark.parametrize("lengths", [[7, 7], [4, 9]], ids=["equal", "ragged"])
@pytest.mark.parametrize("L", [1, 3])
def test_cached_attention_op_equals_attention_over_the_whole_buffers(L, lengths, window):
    """`multihead::cached_attention` reads only the filled keys; it equals the float64 reference and
    torch's SDPA over the whole buffers with `update`'s mask (the stale keys past each length hold
    garbage here). Forward only: the op serves calls with gradients off."""
    from multihead.attend import reference
    from multihead.masks import AttentionMask

    Hq = 6
    q = randn(B, Hq, L, D, seed=1, dtype=torch.float64)
    k, v = randn(B, HKV, MAX, D, seed=2, dtype=torch.float64), randn(B, HKV, MAX, D, seed=3, dtype=torch.float64)
    after = torch.tensor(lengths)
    left = None if window is None else window[0]
    got = torch.ops.multihead.cached_attention(q, k, v, after, left, 0.5)
    hidden = expected_hidden([n - L for n in lengths], L, MAX, window)
    mask = AttentionMask(B, Hq, L, MAX, dense=hidden)
    want, _ = reference.attend(q, k, v, mask, scale=0.5, dropout_p=0.0, need_weights=False, average_weights=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~hidden, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, theirs)
    assert got.is_contiguous()


def test_compiled_module_decode_attends_only_the_cached_keys():
    """A compiled decode step of the module (CPU, no grad) attends through `KVCache.attend`'s op, so
    its cost follows what is cached, not max_len: one graph, matching eager, also once the sequences
    have different lengths (after a rewind)."""
    torch.manual_seed(0)
    E, H, KV = 24, 6, 2
    attn = multihead.MultiheadAttention(E, H, num_kv_heads=KV, rotary=RotaryEmbedding(E // H, max_seq_len=64))
    caches = [KVCache(B, 64, KV, E // H) for _ in range(2)]
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(attn, backend=recording, fullgraph=True, dynamic=False)
    with torch.no_grad():
        prompt = torch.randn(B, 5, E)
        for cache in caches:
            attn(prompt, prompt, prompt, need_weights=False, kv_cache=cache)
            cache.rewind([5, 3])
        for _ in range(3):
            x = torch.randn(B, 1, E)
            want = attn(x, x, x, need_weights=False, kv_cache=caches[0])[0]
            got = compiled(x, x, x, need_weights=False, kv_cache=caches[1])[0]
            torch.testing.assert_close(got, want)
    assert len(graphs) == 1
    ops = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.ops.multihead.cached_attention in ops
    with torch.enable_grad():  # with gradients on, the op (no autograd formula) is not used
        torch._dynamo.reset()
        graphs.clear()
        x = torch.randn(B, 1, E)
        compiled(x, x, x, need_weights=False, kv_cache=caches[1])
        ops = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
        assert torch.ops.multihead.cached_attention not in ops


def test_compiled_module_decode_with_inductor_matches_eager():
    """The op inside an inductor graph (its fake implementation's layout is what inductor checks)."""
    torch.manual_seed(0)
    E, H, KV = 16, 4, 2
    attn = multihead.MultiheadAttention(E, H, num_kv_heads=KV, rotary=RotaryEmbedding(E // H, max_seq_len=32))
    caches = [KVCache(1, 32, KV, E // H) for _ in range(2)]
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True, dynamic=False)
    with torch.no_grad():
        prompt = torch.randn(1, 4, E)
        for cache in caches:
            attn(prompt, prompt, prompt, need_weights=False, kv_cache=cache)
        for _ in range(2):
            x = torch.randn(1, 1, E)
            want = attn(x, x, x, need_weights=False, kv_cache=caches[0])[0]
            torch.testing.assert_close(compiled(x, x, x, need_weights=False, kv_cache=caches[1])[0], want)
