"""The SDPA backend: `torch.nn.functional.scaled_dot_product_attention` (flash, memory-efficient,
cuDNN or the CPU flash kernel, as torch picks). Serves every request that needs no weights.

Grouped-query heads on the CPU: torch's CPU kernel with `enable_gqa` reads a kv head once for each
of its G query heads. When every query row of a kv head's group sees the same keys (no causal band,
and a mask that does not depend on the head, with one query position or none at all), the G heads
are stacked as G*L rows of their kv head and attended in one call, which reads each kv head once:
a decode step (L = 1) against a long cache costs about half (measured in BENCHMARKS.md). It is done
only while the folded call still has a work item for each of torch's threads (B*Hkv of them), since
the CPU kernel parallelises over batch and heads.

Fully masked rows: SDPA (torch >= 2.5) returns zeros for a query row with no visible key, in forward
and backward; tests hold it to that.

Notation: B batch, H query heads, Hkv key/value heads, G = H // Hkv, L query length, S key length,
D head dim.
"""

from __future__ import annotations

import torch
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
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if Hkv != H and _folds(q, Hkv, attn_mask, is_causal, dropout_p):
        out = F.scaled_dot_product_attention(
            q.reshape(B, Hkv, H // Hkv * L, D), k, v, attn_mask=attn_mask, scale=scale
        )  # (B, Hkv, G*L, D): the G query heads of a kv head as its rows
        return out.view(B, H, L, D), None
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=bool(Hkv != H),  # a Python bool, also under torch.jit.trace
    )
    return out, None


def _folds(q: Tensor, kv_heads: int, attn_mask: Tensor | None, is_causal: bool, dropout_p: float) -> bool:
    """Whether the query heads can be stacked as rows of their kv head (see the module docstring):
    on the CPU, without dropout (its random draws would change order), without a causal band (rows
    of one kv head sit at different positions then), with a mask shared by the heads and, unless
    there is no mask, one query position; and only while B*Hkv items keep every thread busy."""
    if q.device.type != "cpu" or is_causal or dropout_p > 0.0:
        return False
    if attn_mask is not None and (q.shape[2] != 1 or (attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1)):
        return False
    return q.shape[0] * kv_heads >= _threads()


@torch._dynamo.assume_constant_result
def _threads() -> int:
    """torch's intra-op threads (read once per compiled graph: a compiled step keeps the choice)."""
    return torch.get_num_threads()
