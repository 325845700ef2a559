"""RotaryEmbedding against an independent float64 formulation with complex multiplication."""

from __future__ import annotations

import pytest
import torch

from multihead.rotary import RotaryEmbedding


def reference(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, interleaved: bool = False):
    """Pair i as a complex number (x[i] + i x[i + D/2], or x[2i] + i x[2i+1] interleaved), multiplied
    by exp(i * position * base^(-2i/D)); float64 throughout."""
    x = x.double()
    d = x.shape[-1]
    if interleaved:
        z = torch.view_as_complex(x.unflatten(-1, (d // 2, 2)).contiguous())
    else:
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angle = positions.double()[..., None] * theta  # (T, D/2) | (B, T, D/2)
    if positions.dim() == 2:
        angle = angle[:, None]  # (B, 1, T, D/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        return torch.view_as_real(z).flatten(-2)
    return torch.cat([z.real, z.imag], dim=-1)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim", [2, 6, 64])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_matches_complex_reference_float64(interleaved, head_dim, base):
    rope = RotaryEmbedding(head_dim, base=base, interleaved=interleaved)
    x = randn(2, 3, 13, head_dim)
    positions = torch.arange(13) * 37  # large positions too
    out = rope(x, positions)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(x, positions, base, interleaved), rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_conventions_differ_and_half_split_is_rotate_half(interleaved):
    """The default is Llama's `x * cos + rotate_half(x) * sin` with cos/sin repeated over halves."""
    d = 8
    x = randn(1, 1, 5, d)
    pos = torch.arange(5)
    out = RotaryEmbedding(d, interleaved=interleaved)(x, pos)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * theta
    if interleaved:
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    torch.testing.assert_close(out, x * cos + rot * sin, rtol=0, atol=1e-12)
    other = RotaryEmbedding(d, interleaved=not interleaved)(x, pos)
    assert not torch.allclose(out, other)


@pytest.mark.parametrize("interleaved", [False, True])
def test_offsets_and_per_sequence_positions(interleaved):
    rope = RotaryEmbedding(10, interleaved=interleaved)
    long = randn(2, 3, 20, 10)
    full = rope(long, torch.arange(20))
    # a chunk at offset 7 rotated on its own equals that chunk of the whole sequence
    torch.testing.assert_close(rope(long[:, :, 7:12], torch.arange(7, 12)), full[:, :, 7:12], rtol=0, atol=1e-12)
    # (B, T) positions: each sequence at its own offset
    positions = torch.stack([torch.arange(3, 8), torch.arange(11, 16)])  # (B, T)
    x = randn(2, 3, 5, 10, seed=1)
    out = rope(x, positions)
    torch.testing.assert_close(out, reference(x, positions, interleaved=interleaved), rtol=0, atol=1e-12)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], rope(x[b : b + 1], positions[b]), rtol=0, atol=0)
    # an int p: positions p .. p+T-1 for every sequence, the same numbers as the tensor form; beyond the
    # table it grows, as the tensor form does
    q, k = randn(2, 3, 5, 10, seed=2), randn(2, 1, 5, 10, seed=3)
    for start in (0, 7, 3000):
        torch.testing.assert_close(rope(x, start), rope(x, torch.arange(start, start + 5)), rtol=0, atol=0)
        got = rope.rotate_qk(q, k, start)
        want = rope.rotate_qk(q, k, torch.arange(start, start + 5))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one position (q and k rotated as one tensor): the same as each on its own, forward and backward
    q1, k1 = q[:, :, 4:].requires_grad_(), k[:, :, 4:].requires_grad_()
    for pos in (9, torch.tensor([9]), torch.tensor([[9], [31]])):
        got = rope.rotate_qk(q1, k1, pos)
        want = rope(q1, pos), rope(k1, pos)
        cotangents = torch.randn_like(want[0]), torch.randn_like(want[1])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        grads = torch.autograd.grad(got, (q1, k1), cotangents)
        for a, b in zip(grads, torch.autograd.grad(want, (q1, k1), cotangents)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_position_zero_is_identity_and_norm_is_kept():
    rope = RotaryEmbedding(16)
    x = randn(1, 2, 9, 16)
    out = rope(x, torch.arange(9))
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_position_difference(interleaved):
    rope = RotaryEmbedding(12, interleaved=interleaved)
    q, k = randn(1, 1, 1, 12, seed=2), randn(1, 1, 1, 12, seed=3)

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()

    for m, n in [(0, 0), (5, 2), (2, 5), (100, 3)]:
        base = score(m, n)
        for shift in (1, 17, 1000):
            torch.testing.assert_close(score(m + shift, n + shift), base, rtol=0, atol=1e-10)
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_table_grows_on_demand_and_is_not_in_state_dict():
    rope = RotaryEmbedding(8, max_seq_len=4)
    assert rope.max_seq_len == 4
    assert rope.state_dict() == {} and "table" in dict(rope.named_buffers())
    x = randn(2, 1, 3, 8)
    positions = torch.tensor([[0, 1, 2], [50, 99, 7]])
    torch.testing.assert_close(rope(x, positions), reference(x, positions), rtol=0, atol=1e-12)
    assert rope.max_seq_len >= 100
    size = rope.max_seq_len
    rope(x, torch.arange(3), max_position=2 * size)  # a caller's bound grows it without reading positions
    assert rope.max_seq_len > 2 * size
    rope.reserve(10_000)
    assert rope.max_seq_len >= 10_000
    # a module holding it stays state-dict compatible
    holder = torch.nn.Sequential(torch.nn.Linear(2, 2), rope)
    assert set(holder.state_dict()) == {"0.weight", "0.bias"}


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 2e-5), (torch.bfloat16, 4e-2), (torch.float16, 4e-3), (torch.float64, 1e-12)]
)
@pytest.mark.parametrize("interleaved", [False, True])
def test_dtypes(dtype, atol, interleaved):
    """Applied in the input dtype, from a float32 table (float64 for float64 inputs)."""
    rope = RotaryEmbedding(32, interleaved=interleaved)
    x = randn(2, 2, 7, 32).to(dtype)
    positions = torch.arange(7) + 3000
    out = rope(x, positions)
    assert out.dtype == dtype
    exact = reference(x, positions, interleaved=interleaved)
    assert (out.double() - exact).abs().max() <= atol
    # the cast table is cached per dtype: a second call reuses it
    cached = rope._cast
    rope(x, positions)
    assert rope._cast is cached


def test_module_dtype_casts_rebuild_the_table():
    """module.half() / .double() cast buffers; the table is recomputed in the precision it needs."""
    rope = RotaryEmbedding(16).double()
    x = randn(1, 1, 5, 16)
    positions = torch.arange(5) + 12345
    torch.testing.assert_close(rope(x, positions), reference(x, positions), rtol=0, atol=1e-12)
    assert rope.table.dtype == torch.float64
    rope.half()
    out = rope(x.float(), positions)
    assert rope.table.dtype == torch.float32
    assert (out.double() - reference(x, positions)).abs().max() < 1e-4


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck(interleaved):
    rope = RotaryEmbedding(6, interleaved=interleaved)
    x = randn(2, 2, 4, 6).requires_grad_()
    positions = torch.tensor([[0, 1, 2, 3], [9, 8, 7, 100]])
    assert torch.autograd.gradcheck(lambda t: rope(t, positions), (x,))
    assert torch.autograd.gradgradcheck(lambda t: rope(t, positions), (x,))


def test_compiled_matches_eager():
    rope = RotaryEmbedding(8, max_seq_len=64)
    x = randn(1, 2, 5, 8, dtype=torch.float32)
    positions = torch.tensor([[3, 4, 5, 6, 7]])
    compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, positions), rope(x, positions))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 7}, "head_dim must be a positive even int"),
        ({"head_dim": 0}, "head_dim must be a positive even int"),
        ({"head_dim": 8, "base": 1.0}, "base must be a number greater than 1"),
        ({"head_dim": 8, "max_seq_len": 0}, "max_seq_len must be a positive int"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(**kwargs)


def test_call_errors():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match="x must be a \\(B, H, T, D\\) tensor with D = head_dim = 8"):
        rope(torch.randn(2, 3, 5, 6), torch.arange(5))
    with pytest.raises(ValueError, match="x must be a \\(B, H, T, D\\)"):
        rope(torch.randn(3, 5, 8), torch.arange(5))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rope(x, torch.arange(5.0))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rope(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions must have shape \\(T,\\) = \\(5,\\) or \\(B, T\\) = \\(2, 5\\)"):
        rope(x, torch.arange(4))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope(x, torch.arange(5) - 1)
    with pytest.raises(ValueError, match="positions must be >= 0, got the first position -1"):
        rope(x, -1)
    with pytest.raises(TypeError, match="positions must be an integer tensor or a first position \\(int\\), got bool"):
        rope(x, True)


def test_rotate_qk_equals_two_calls():
    rope = RotaryEmbedding(8, max_seq_len=4)
    q, k = randn(2, 6, 3, 8, seed=4), randn(2, 2, 3, 8, seed=5)
    positions = torch.tensor([[5, 6, 7], [0, 1, 2]])
    rq, rk = rope.rotate_qk(q, k, positions, max_position=7)
    torch.testing.assert_close(rq, rope(q, positions), rtol=0, atol=0)
    torch.testing.assert_close(rk, rope(k, positions), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must be a \\(B, H, T, D\\)"):
        rope.rotate_qk(q, k[..., :6], positions)


def test_pickle_and_deepcopy_drop_the_cast_cache():
    import copy
    import pickle

    rope = RotaryEmbedding(4)
    x = torch.randn(1, 1, 2, 4, dtype=torch.float16)
    rope(x, torch.arange(2))
    assert rope._cast is not None
    for clone in (copy.deepcopy(rope), pickle.loads(pickle.dumps(rope))):
        assert clone._cast is None and torch.equal(clone.table, rope.table)
        torch.testing.assert_close(clone(x, torch.arange(2)), rope(x, torch.arange(2)), rtol=0, atol=0)
