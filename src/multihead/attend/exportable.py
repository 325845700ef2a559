"""The exportable backend: plain torch math that exporters and tracers can translate.

Under `torch.export`, `torch.onnx.export(dynamo=True)` and `torch.jit.trace` the dispatch table puts
this backend in place of the others: blockwise's tile loops are Python control flow on shapes
(an exporter would specialise B, L and S to the traced values) and its op is unknown to ONNX; the
exported SDPA does not zero a query row with no visible key (onnxruntime returns a nonzero row).

The work is chunked by key/value head: each of the Hkv steps holds the (B, G, L, S) scores of one
group of G = H // Hkv query heads, so peak memory is (B, G, L, S) plus the weights, and the number of
steps is a constant of the module (no loop over a dynamic size). A row with no visible key is found
in the graph (its maximum score is -inf) and gives zero output, zero weights and zero gradients,
with no NaN anywhere on the way (the softmax runs on a zeroed row, then is zeroed).

Notation: B batch, H heads, Hkv key/value heads, G = H // Hkv, L query length, S key length, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import AttentionMask

name = "exportable"


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    # serves every request; the dispatch table picks it only while an exporter or tracer records the
    # call (in eager the others are faster), and a user can force it by name
    return []


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
    """q: (B, H, L, D), k/v: (B, Hkv, S, D) -> out (B, H, L, D), weights (B, L, S) | (B, H, L, S) | None."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    bias = mask.additive(q.dtype, q.device)  # (1|B, 1|H, L, S) | None
    outs: list[Tensor] = []
    probs_per_head: list[Tensor] = []
    weights_sum: Tensor | None = None
    for j in range(kv_heads):  # a constant number of steps
        heads_j = slice(j * group, (j + 1) * group)
        scores = torch.matmul(q[:, heads_j] * scale, k[:, j : j + 1].transpose(-2, -1))  # (B, G, L, S)
        if bias is not None:
            scores = scores + (bias if bias.shape[1] == 1 else bias[:, heads_j])
        probs = _safe_softmax(scores)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        outs.append(torch.matmul(probs, v[:, j : j + 1]))  # (B, G, L, D)
        if need_weights and average_weights:
            part = probs.sum(1)  # (B, L, S)
            weights_sum = part if weights_sum is None else weights_sum + part
        elif need_weights:
            probs_per_head.append(probs)
    out = torch.cat(outs, dim=1)  # (B, H, L, D)
    if not need_weights:
        return out, None
    if average_weights:
        assert weights_sum is not None
        return out, weights_sum / heads  # (B, L, S)
    return out, torch.cat(probs_per_head, dim=1)  # (B, H, L, S)


def _safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim; a row that is entirely -inf gives zeros, in forward and backward."""
    if scores.shape[-1] == 0:  # S = 0: no key at all (amax would raise)
        return scores.clone()
    empty = scores.amax(dim=-1, keepdim=True) == float("-inf")  # (..., L, 1)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return probs.masked_fill(empty, 0.0)
