"""Semantics beyond parity: fully masked rows, is_causal, dropout, mask routing, conversion."""

from __future__ import annotations

import pytest
import torch

from multihead import MultiheadAttention
from multihead.attend import BACKENDS
from multihead.masks import build_mask

from helpers import pair


def backends_for(need_weights: bool) -> list[str]:
    """Backends that serve these plain (window-free) requests: windowed serves sliding windows only."""
    return [n for n in BACKENDS if n != "windowed" and not (n == "sdpa" and need_weights)]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kind", ["kpm", "bool2d", "float2d", "bool3d"])
def test_fully_masked_rows_give_zeros_and_finite_grads(kind, need_weights):
    torch.manual_seed(0)
    B, L, S, E, H = 2, 4, 5, 8, 2
    for backend in backends_for(need_weights):
        m = MultiheadAttention(E, H)
        m.backend = backend
        q = torch.randn(B, L, E, requires_grad=True)
        kv = torch.randn(B, S, E, requires_grad=True)
        kpm = attn = None
        if kind == "kpm":  # the whole second batch is padding: every row of it is empty
            kpm = torch.zeros(B, S, dtype=torch.bool)
            kpm[1] = True
            empty = (1, slice(None))
        elif kind == "bool2d":
            attn = torch.zeros(L, S, dtype=torch.bool)
            attn[2] = True
            empty = (slice(None), 2)
        elif kind == "float2d":
            attn = torch.zeros(L, S)
            attn[2] = float("-inf")
            empty = (slice(None), 2)
        else:
            attn = torch.zeros(B * H, L, S, dtype=torch.bool)
            attn[:, 1] = True
            empty = (slice(None), 1)
        out, w = m(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
        # zero before out_proj means out_proj.bias after it
        torch.testing.assert_close(out[empty], m.out_proj.bias.expand_as(out[empty]), msg=backend)
        assert torch.isfinite(out).all(), backend
        if need_weights:
            assert torch.equal(w[empty], torch.zeros_like(w[empty])), backend
            torch.testing.assert_close(w.sum(-1)[empty], torch.zeros_like(w.sum(-1)[empty]))
        (out.sum() + (w.sum() if w is not None else 0)).backward()
        for t in (q, kv, *m.parameters()):
            assert torch.isfinite(t.grad).all(), backend
        assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty])), backend


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("q_len,k_len", [(6, 6), (4, 7), (7, 4)])
def test_is_causal_without_mask_is_top_left_causal(need_weights, q_len, k_len):
    theirs, ours = pair(embed_dim=12, num_heads=3, batch_first=True)
    q = torch.randn(2, q_len, 12)
    kv = torch.randn(2, k_len, 12)
    mask = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
    expected = theirs(q, kv, kv, attn_mask=mask, need_weights=need_weights)
    got = ours(q, kv, kv, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got[0], expected[0])
    if need_weights:
        torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("need_weights", [True, False])
def test_mask_wins_over_is_causal_hint(need_weights):
    _, ours = pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(1, 5, 8)
    mask = torch.zeros(5, 5, dtype=torch.bool)  # attend everywhere
    hinted = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0]
    plain = ours(x, x, x, need_weights=need_weights)[0]
    torch.testing.assert_close(hinted, plain)


def test_causal_pattern_is_recognised_and_other_masks_are_not():
    common = dict(key_padding_mask=None, is_causal=False, batch=1, heads=2, batched=True, device=torch.device("cpu"))
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert build_mask(attn_mask=causal, q_len=6, k_len=6, **common).is_plain_causal
    as_float = torch.zeros(6, 6).masked_fill(causal, float("-inf"))
    assert build_mask(attn_mask=as_float, q_len=6, k_len=6, **common).is_plain_causal
    shifted = torch.ones(6, 6, dtype=torch.bool).triu(2)
    assert build_mask(attn_mask=shifted, q_len=6, k_len=6, **common).dense is not None
    almost = as_float.clone()
    almost[3, 0] = -1.0  # a finite bias under the diagonal: not the pure causal pattern
    assert not build_mask(attn_mask=almost, q_len=6, k_len=6, **common).is_plain_causal


@pytest.mark.parametrize("shape", [(600, 600), (600, 300), (300, 600), (1100, 1000), (7, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64], ids=str)
def test_causal_pattern_check_reads_every_entry_of_a_long_mask(shape, dtype):
    """Beyond 1 MiB the check runs block by block (256 rows); below, one comparison. One changed entry
    anywhere (before a block, in its triangle, after it; a NaN) makes it not causal, in every layout."""
    from multihead.masks import _is_causal_pattern

    L, S = shape
    hidden = torch.ones(L, S, dtype=torch.bool).triu(1)
    mask = hidden if dtype == torch.bool else torch.zeros(L, S, dtype=dtype).masked_fill(hidden, float("-inf"))
    assert _is_causal_pattern(mask)
    for i, j in [(L - 1, 0), (L - 1, min(S, L) - 1), (0, S - 1), (min(L, S) - 1, min(L, S) - 2), (L // 2, S // 2)]:
        changed = mask.clone()
        if dtype == torch.bool:
            changed[i, j] = not changed[i, j]
        else:
            changed[i, j] = float("nan") if (i + j) % 2 else (0.0 if changed[i, j] else float("-inf"))
        assert not _is_causal_pattern(changed), (i, j)


def test_dropout_zero_is_deterministic_and_eval_is_identity():
    theirs, ours = pair(embed_dim=16, num_heads=4, dropout=0.0, batch_first=True)
    x = torch.randn(2, 7, 16)
    a, b = ours(x, x, x), ours(x, x, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dropping = MultiheadAttention(16, 4, dropout=0.5)
    dropping.load_state_dict(ours.state_dict())
    dropping.eval()
    ours.eval()
    for need_weights in (True, False):
        torch.testing.assert_close(
            dropping(x, x, x, need_weights=need_weights)[0], ours(x, x, x, need_weights=need_weights)[0]
        )


def test_dropout_weights_are_the_ones_applied():
    torch.manual_seed(0)
    p = 0.4
    m = MultiheadAttention(16, 4, dropout=p, bias=False)
    x = torch.randn(2, 9, 16)
    out, w = m(x, x, x, average_attn_weights=False)  # (B, H, L, S) after dropout
    nonzero = w[w != 0]
    # each kept weight is a softmax probability scaled by 1 / (1 - p); some were dropped
    assert (w == 0).float().mean() > 0.2
    assert torch.all(nonzero <= 1 / (1 - p) + 1e-6)
    # the output rebuilds from exactly these weights
    v = torch.nn.functional.linear(x, m.in_proj_weight[32:]).unflatten(-1, (4, 4)).transpose(1, 2)
    rebuilt = (w @ v).transpose(1, 2).reshape(2, 9, 16) @ m.out_proj.weight.T
    torch.testing.assert_close(out, rebuilt)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_keeps_the_expectation(need_weights):
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, dropout=0.3)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        exact = m.eval()(x, x, x, need_weights=need_weights)[0]
        m.train()
        mean = torch.stack([m(x, x, x, need_weights=need_weights)[0] for _ in range(4000)]).mean(0)
    # the Monte-Carlo mean of 4000 draws is within a few standard errors of the no-dropout output
    assert (mean - exact).abs().max() < 0.05 * exact.abs().max() + 0.02


def test_from_torch_keeps_layout_device_dtype_and_mode_and_round_trips():
    theirs = torch.nn.MultiheadAttention(12, 3, kdim=5, vdim=7, dtype=torch.float64).eval()
    ours = MultiheadAttention.from_torch(theirs)
    assert ours.batch_first is False and not ours.training and ours.out_proj.weight.dtype == torch.float64
    q, k, v = (
        torch.randn(4, 2, 12, dtype=torch.float64),
        torch.randn(3, 2, 5, dtype=torch.float64),
        torch.randn(3, 2, 7, dtype=torch.float64),
    )
    torch.testing.assert_close(ours(q, k, v)[0], theirs(q, k, v)[0])
    back = ours.to_torch()
    assert isinstance(back, torch.nn.MultiheadAttention) and back.batch_first is False and not back.training
    for (n, a), (_, b) in zip(back.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(TypeError, match="from_torch"):
        MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


def test_state_dict_moves_both_ways():
    for kw in (dict(), dict(kdim=3, vdim=5), dict(add_bias_kv=True, bias=False)):
        theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        ours = MultiheadAttention(8, 2, **kw)
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(MultiheadAttention(8, 2, **kw).state_dict())
        assert list(ours.state_dict()) == list(theirs.state_dict())


def test_grouped_query_attention_matches_repeated_heads():
    """GQA with Hkv groups equals full MHA whose k/v projections repeat each kv head."""
    torch.manual_seed(0)
    E, H, KV = 16, 4, 2
    D = E // H
    gqa = MultiheadAttention(E, H, num_kv_heads=KV)
    assert gqa.k_proj_weight.shape == (KV * D, E) and not gqa._qkv_same_embed_dim
    full = MultiheadAttention(E, H)
    with torch.no_grad():
        rep = lambda w: w.view(KV, D, -1).repeat_interleave(H // KV, 0).reshape(E, -1)  # noqa: E731
        full.in_proj_weight.copy_(torch.cat([gqa.q_proj_weight, rep(gqa.k_proj_weight), rep(gqa.v_proj_weight)]))
        b_q, b_k, b_v = gqa.in_proj_bias.split([E, KV * D, KV * D])
        full.in_proj_bias.copy_(torch.cat([b_q, rep(b_k[:, None])[:, 0], rep(b_v[:, None])[:, 0]]))
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(2, 6, E)
    for backend in backends_for(need_weights=True) + ["sdpa"]:
        gqa.backend = full.backend = backend
        for nw in (True, False) if backend != "sdpa" else (False,):
            a, b = gqa(x, x, x, is_causal=True, need_weights=nw), full(x, x, x, is_causal=True, need_weights=nw)
            torch.testing.assert_close(a[0], b[0], msg=backend)
    with pytest.raises(ValueError, match="to_torch"):
        gqa.to_torch()
