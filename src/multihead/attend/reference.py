"""The reference backend: plain torch math, in any dtype (float64 for the oracle).

Every other backend is tested against this one. It serves every request the mask form can express,
at the cost of materialising (B, H, L, S) scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import AttentionMask

name = "reference"


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    return []


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim; a row that is entirely -inf gives zeros (not NaN), and so does
    its gradient."""
    if scores.shape[-1] == 0:  # S = 0: no key at all, every row is fully masked (amax would raise)
        return scores.clone()  # (..., L, 0)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max).detach()
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(total == 0, 1.0, total)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    average_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """q: (B, H, L, D), k/v: (B, Hkv, S, D) -> out (B, H, L, D), weights (B, L, S) | (B, H, L, S)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, H, L, S)
    bias = mask.additive(scores.dtype, scores.device)
    if bias is not None:
        scores = scores + bias
    probs = safe_softmax(scores)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v)  # (B, H, L, D)
    if not need_weights:
        return out, None
    return out, probs.mean(dim=1) if average_weights else probs
