"""The SDPA backend: `torch.nn.functional.scaled_dot_product_attention` (flash, memory-efficient,
cuDNN or the CPU flash kernel, as torch picks). Serves every request that needs no weights.

Fully masked rows: SDPA (torch >= 2.5) returns zeros for a query row with no visible key, in forward
and backward; tests hold it to that.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..masks import AttentionMask

name = "sdpa"


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    return ["does not return attention weights (need_weights=True)"] if need_weights else []


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
) -> tuple[Tensor, None]:
    """q: (B, H, L, D), k/v: (B, Hkv, S, D) -> out (B, H, L, D), None."""
    attn_mask, is_causal = mask.for_sdpa(q.dtype)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=bool(k.shape[1] != q.shape[1]),  # a Python bool, also under torch.jit.trace
    )
    return out, None
