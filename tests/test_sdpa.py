"""The SDPA backend (`attend/sdpa.py`): grouped-query heads folded into rows of their kv head on the
CPU when every row of a group sees the same keys, and left to `enable_gqa` otherwise.

Checked against the float64 reference backend and torch's own SDPA with `enable_gqa`, forward and backward, on every mask form the fold
takes or declines (and that it declines: a folded call with a causal band or a per-head mask would
be wrong, not slow); and the thread rule (a folded call must keep every thread busy).
"""

from __future__ import annotations

import pytest
import torch

from multihead.attend import reference, sdpa
from multihead.masks import AttentionMask, build_mask

F64 = torch.float64
B, H, HKV, D, S = 2, 6, 2, 8, 9


def _mask(kind: str, L: int, g: torch.Generator) -> tuple[AttentionMask, bool]:
    """(mask, whether the fold may take it) for a (B, H, L, S) call."""
    kpm = torch.rand(B, S, generator=g) < 0.3
    kpm[:, 0] = False
    per_head = torch.rand(B * H, L, S, generator=g) < 0.3
    per_head[..., 0] = False
    args = dict(attn_mask=None, key_padding_mask=None, is_causal=False)
    args.update(
        {
            "none": {},
            "key_padding": {"key_padding_mask": kpm},
            "shared_2d": {"attn_mask": per_head[0]},
            "per_head": {"attn_mask": per_head},
            "causal": {"is_causal": True},
        }[kind]
    )
    mask = build_mask(**args, batch=B, heads=H, q_len=L, k_len=S, batched=True, device=torch.device("cpu"))
    folds = kind == "none" or (L == 1 and kind in ("key_padding", "shared_2d"))
    return mask, folds


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("kind", ["none", "key_padding", "shared_2d", "per_head", "causal"])
def test_folded_heads_match_the_reference(kind, L, monkeypatch):
    """Folded or not, the backend's output and gradients equal the float64 reference; the fold is
    taken exactly where every query row of a kv head's group sees the same keys."""
    monkeypatch.setattr(sdpa, "_threads", lambda: 1)
    g = torch.Generator().manual_seed(L)
    q = torch.randn(B, H, L, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, HKV, S, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, HKV, S, D, generator=g, dtype=F64, requires_grad=True)
    mask, folds = _mask(kind, L, g)
    attn_mask, is_causal = mask.for_sdpa(q.dtype)
    assert sdpa._folds(q, HKV, attn_mask, is_causal, 0.0) is folds
    kw = dict(scale=D**-0.5, dropout_p=0.0, need_weights=False, average_weights=True)
    out, _ = sdpa.attend(q, k, v, mask, **kw)
    want, _ = reference.attend(q, k, v, mask, **kw)
    theirs = torch.nn.functional.scaled_dot_product_attention(  # torch's own GQA, unfolded
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=D**-0.5, enable_gqa=True
    )
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    for oracle in (want, theirs):
        torch.testing.assert_close(out, oracle)
        for a, b in zip(got, torch.autograd.grad(oracle, (q, k, v), grad)):
            torch.testing.assert_close(a, b)


def test_fold_needs_a_work_item_per_thread_and_no_dropout(monkeypatch):
    """B*Hkv items: folded while they cover torch's threads, not beyond; never with dropout (its
    draws would follow another layout), never with equal heads (nothing to fold), never on CUDA."""
    q = torch.randn(B, H, 1, D)
    monkeypatch.setattr(sdpa, "_threads", lambda: B * HKV)
    assert sdpa._folds(q, HKV, None, False, 0.0)
    assert not sdpa._folds(q, HKV, None, False, 0.1)
    monkeypatch.setattr(sdpa, "_threads", lambda: B * HKV + 1)
    assert not sdpa._folds(q, HKV, None, False, 0.0)
    if torch.cuda.is_available():
        assert not sdpa._folds(q.cuda(), HKV, None, False, 0.0)
    calls = []
    monkeypatch.setattr(sdpa, "_folds", lambda *args: calls.append(args) or True)
    mask = AttentionMask(B, H, 1, S)
    x = torch.randn(B, H, S, D)
    sdpa.attend(q, x, x, mask, scale=1.0, dropout_p=0.0, need_weights=False, average_weights=True)
    assert not calls  # H == Hkv: the fold is not even asked
