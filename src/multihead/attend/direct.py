"""The direct backend: the whole call fits one tile, so plain batched ops and autograd's own backward.

On small calls (a speech model's dozen frames, a ViT's 50 patches, the page's example 1) the cost is
the number of ops and Python calls, not arithmetic: blockwise's tile machinery (the plan, the tile
list, views per tile, a custom autograd.Function) costs more than its tile's work. When blockwise
would cut the call into a single tile anyway (its tile budget, `blockwise.choose_tiles`, decides:
nothing here is tuned to a machine), this backend computes the same thing in a handful of batched
ops: one GEMM for the scores of every (batch element, kv head), the mask added in place, a safe
softmax, dropout, one GEMM with V. Its memory is the one tile's scores (B*H*L*S), kept by autograd
for the backward.

Semantics are the house's: a query row with no visible key gives zero output, zero weights and
finite (zero) gradients (`torch._safe_softmax`, whose backward is softmax's: zero for a zero row; it
costs about four softmaxes on the CPU, so it runs only when the mask has an empty row);
the weights returned are the ones applied to V (after dropout); grouped-query heads share their kv
head's GEMM; every mask form comes from `AttentionMask.additive`; any floating dtype.

Notation: B batch, H query heads, Hkv key/value heads, G = H // Hkv, L query length, S key length,
D head dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import AttentionMask
from . import blockwise
from .reference import safe_softmax

name = "direct"


_HAS_SAFE_SOFTMAX = hasattr(torch, "_safe_softmax")  # torch >= 2.5


def _safe_softmax(scores: Tensor, dim: int) -> Tensor:
    """Softmax that gives zeros (and zero gradients) for rows that are all -inf: one aten op (called
    through torch.ops while compiling, which traces it), else our reference's safe softmax."""
    if not _HAS_SAFE_SOFTMAX:
        return safe_softmax(scores.movedim(dim, -1)).movedim(-1, dim)
    if torch.compiler.is_compiling():
        return torch.ops.aten._safe_softmax.default(scores, dim)
    return torch._safe_softmax(scores, dim)


@functools.lru_cache(maxsize=1)
def vector_bytes() -> int:
    """Width of the SIMD registers torch's CPU kernels use on this CPU (AVX-512: 64 bytes)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return 64 if "AVX512" in capability else 32 if "AVX2" in capability or "256" in capability else 16


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    if not q.is_floating_point():
        return [f"needs floating-point inputs, got {q.dtype}"]
    if torch.compiler.is_compiling():  # the one-tile test reads the machine and guards on the shapes
        return ["under torch.compile (blockwise's custom op serves the weights path there)"]
    B, H, L, _ = q.shape
    if not fits_one_tile(B, H, L, k.shape[2], q.element_size(), q.device):
        batches, rows = blockwise.choose_tiles(B, H, L, k.shape[2], q.element_size(), q.device)
        return [f"B*H*L*S = {B * H * L * k.shape[2]} scores are more than one blockwise tile ({batches} x {rows} rows)"]
    return []


def fits_one_tile(batch: int, heads: int, q_len: int, k_len: int, itemsize: int, device: torch.device) -> bool:
    """Whether blockwise would cut the call into a single tile (what this backend serves, eager)."""
    if torch.compiler.is_compiling():
        return False
    batches, rows = blockwise.choose_tiles(batch, heads, q_len, k_len, itemsize, device)
    return batches >= batch and rows >= q_len


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
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    # the G query heads of a kv head stacked by rows: one GEMM per (batch element, kv head)
    qg = q.reshape(B * Hkv, G * L, D)  # a view when B and H merge (q from its own projection, seq first)
    kg, vg = k.reshape(B * Hkv, S, D), v.reshape(B * Hkv, S, D)
    scores = torch.baddbmm(qg.new_empty(B * Hkv, G * L, S), qg, kg.transpose(1, 2), beta=0.0, alpha=scale)
    bias = mask.additive(scores.dtype, scores.device)  # (1|B, 1|H, L, S) | None; None: no row is empty
    softmax = torch.softmax if bias is None or not _may_have_empty_rows(bias) else _safe_softmax
    if scores.device.type == "cpu" and S * scores.element_size() < vector_bytes() and not torch.compiler.is_compiling():
        # torch's CPU softmax vectorises along a row: rows shorter than one SIMD register run a scalar
        # loop, several times slower than a copy to (S, B, H, L), where the softmax over dim 0 is
        # vectorised across all B*H*L rows (eager only: compile fuses its own)
        scores = scores.permute(2, 0, 1).contiguous().view(S, B, H, L)
        if bias is not None:
            scores.add_(bias.permute(3, 0, 1, 2))
        probs_sbhl = softmax(scores, 0)  # (S, B, H, L)
        probs = probs_sbhl.permute(1, 2, 3, 0)  # (B, H, L, S) view
        grouped = probs_sbhl.view(S, B * Hkv, G * L).permute(1, 2, 0)  # (B*Hkv, G*L, S) view: no copy for the GEMM
    else:
        scores = scores.view(B, H, L, S)
        if bias is not None:
            scores.add_(bias)
        probs = softmax(scores, -1)  # (B, H, L, S), zero rows where nothing is visible
        grouped = probs.view(B * Hkv, G * L, S)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)  # the weights returned are these: the ones applied
        grouped = probs.reshape(B * Hkv, G * L, S)
    out = torch.bmm(grouped, vg).view(B, H, L, D)
    if not need_weights:
        return out, None
    return out, (probs.mean(dim=1) if average_weights else probs).contiguous()  # torch's contiguous layout


def _may_have_empty_rows(bias: Tensor) -> bool:
    """Whether a query row of the additive mask hides every key (its softmax needs the safe form).

    `torch._safe_softmax` costs about four softmaxes on the CPU (it scans the scores for rows of -inf
    after the softmax); the mask is up to H times smaller than the scores and almost never has an
    empty row, so on the CPU (where reading the answer does not stall a device) we look there first.
    Without an empty row both forms give the same values and gradients. On other devices (and while
    compiling) the safe form always runs."""
    if bias.device.type != "cpu" or torch.compiler.is_compiling() or bias.shape[-1] == 0:
        return True
    return bias.amax(dim=-1).min().item() == float("-inf")  # NaN: False, and both forms give NaN
