"""The windowed backend: sliding-window attention in O(L * W) instead of O(L * S).

Query rows are cut into chunks of `c` rows. Chunk [q0, q0 + c) can only see the keys its band
allows, [q0 + offset - left, q0 + c - 1 + offset + right], so only those keys (and the same columns of
the key-padding and dense parts) go to `F.scaled_dot_product_attention`, with a small mask for the
chunk. Work grows as L * (c + W), not L * S.

Two ways to run the chunks, one result:
- the body: every full chunk whose key range lies inside [0, S) has the same span s = c + left + right
  and the same band pattern, so all of them go to SDPA in a single call, batched as (B * n, H, c, D)
  queries against (B * n, Hkv, s, D) key windows (an `unfold` of k, a view when B == 1) under one
  shared (c, s) band mask. One call, not n: a call per chunk costs Python and thread-pool start-up n
  times, and on a busy machine each call waits for its slowest thread.
- the edges (chunks whose range is clipped at 0 or S, a last partial chunk, or an unbounded right
  reach): one SDPA call per run of neighbouring chunks (at most max(c, left + right) rows) on the
  sliced keys.

The output is written into one preallocated tensor (a cat when autograd records), laid out in memory
as (L, B, H, D) so that the caller's merge of heads into (L, B, E) is a view.

GQA goes to SDPA as `enable_gqa`; dropout is SDPA's (its mask drawn per call); plain autograd through
SDPA gives the backward.

Fully masked rows: a chunk whose key range is empty is written as zeros; a row with no visible key
inside a non-empty range gets zeros from SDPA (torch >= 2.5), in forward and backward.

Notation: B batch, H heads, Hkv key/value heads, L query length, S key length, D head dim, c rows per
chunk, s keys per chunk, n chunks in the body.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import AttentionMask

name = "windowed"

MIN_CHUNK = 32  # query rows per chunk, a power of two in [MIN_CHUNK, MAX_CHUNK]
MAX_CHUNK = 128
MAX_SHARE = 0.5  # serve only when the visited (query, key) pairs are at most this share of L * S


def chunk_size(mask: AttentionMask) -> int:
    """Query rows per chunk: a power of two near W / 16, within [MIN_CHUNK, MAX_CHUNK]. Each row
    visits c + W keys, so small chunks waste less; the kernel runs slower on very small blocks.
    (Measured on CPU, L = 4096, D = 64: c = 32 is best up to W = 512, c = 64 at W = 1024.)"""
    left, right = mask.band_limits()
    width = (left or 0) + (right if right is not None else mask.k_len)
    size = MIN_CHUNK
    while size < MAX_CHUNK and 16 * (2 * size) <= width:
        size *= 2
    return size


def _limits(mask: AttentionMask) -> tuple[int, int | None]:
    """(left, right) of the band; this backend serves only a finite left reach (`not_supported_reasons`)."""
    left, right = mask.band_limits()
    assert left is not None, "the windowed backend needs a finite left reach"
    return left, right


def _key_range(mask: AttentionMask, q0: int, q1: int) -> tuple[int, int]:
    """Key columns [k0, k1) that query rows [q0, q1) can see through the band (k0 == k1: none)."""
    left, right = _limits(mask)
    k0 = min(mask.k_len, max(0, q0 + mask.offset - left))
    k1 = mask.k_len if right is None else max(0, min(mask.k_len, q1 - 1 + mask.offset + right + 1))
    return k0, max(k0, k1)


def _body(mask: AttentionMask, size: int) -> tuple[int, int]:
    """Chunks [c_lo, c_hi) that are full and whose key range is unclipped (c_hi <= c_lo: none)."""
    left, right = _limits(mask)
    if right is None:
        return 0, 0
    span = size + left + right
    c_lo = max(0, -(-(left - mask.offset) // size))  # first chunk with k0 >= 0
    c_hi = min(mask.q_len // size, (mask.k_len - span - mask.offset + left) // size + 1)  # k0 + span <= S
    return c_lo, c_hi


def _plan(mask: AttentionMask, size: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The body (chunks [c_lo, c_hi), run in one call) and the edge runs (q0, q1, k0, k1), one call
    each. Neighbouring edge chunks merge while a run has at most max(c, left + right) rows: fewer
    calls, and at most about twice the work of running them one by one."""
    body = _body(mask, size)
    if body[1] - body[0] < 2:  # a batch of one chunk is just an edge chunk
        body = (0, 0)
    left, right = _limits(mask)
    limit = size if right is None else max(size, left + right)
    runs: list[tuple[int, int, int, int]] = []
    start = None
    for c, q0 in enumerate(range(0, mask.q_len, size)):
        q1 = min(q0 + size, mask.q_len)
        if body[0] <= c < body[1]:
            continue
        if start is None or q1 - start > limit or q0 != runs[-1][1]:
            start = q0
        else:
            runs.pop()
        runs.append((start, q1, *_key_range(mask, start, q1)))
    return body, runs


def visited_share(mask: AttentionMask, size: int | None = None) -> float:
    """Share of the L * S (query, key) pairs that the chunks visit."""
    size = size or chunk_size(mask)
    body, runs = _plan(mask, size)
    visited = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in runs)
    if body[1] > body[0]:  # a body needs a bounded right reach (`_body`)
        left, right = _limits(mask)
        visited += (body[1] - body[0]) * size * (size + left + (right or 0))
    return visited / max(1, mask.q_len * mask.k_len)


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    reasons = []
    if need_weights:
        reasons.append("does not return attention weights (need_weights=True)")
    if torch.jit.is_tracing() or isinstance(mask.q_len, torch.SymInt) or isinstance(mask.k_len, torch.SymInt):
        # the chunk plan is Python arithmetic on L and S: a tracer would bake it in, a dynamic-shape
        # compile would guard (and recompile) on every length
        reasons.append("its chunk plan needs concrete lengths (dynamic shapes or torch.jit.trace)")
    elif mask.band_limits()[0] is None:
        reasons.append("no window with a finite left reach")
    elif mask.q_len < 4 * chunk_size(mask) or visited_share(mask) > MAX_SHARE:
        reasons.append("window too wide to pay")
    return reasons


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
    chunk: int | None = None,
) -> tuple[Tensor, None]:
    """q: (B, H, L, D), k/v: (B, Hkv, S, D) -> out (B, H, L, D), None.

    chunk: query rows per chunk (default `chunk_size(mask)`)."""
    assert not need_weights, "the windowed backend does not return weights"
    assert mask.band_limits()[0] is not None, "the windowed backend needs a finite left reach"
    size = chunk or chunk_size(mask)
    sdpa: dict[str, Any] = {"dropout_p": dropout_p, "scale": scale, "enable_gqa": bool(k.shape[1] != q.shape[1])}
    masks = _ChunkMasks(mask, q.dtype, q.device)
    body, runs = _plan(mask, size)
    pieces: list[tuple[int, int, Tensor]] = []  # (q0, q1, out rows (B, H, q1 - q0, Dv))
    if body[1] > body[0]:
        q0, q1 = body[0] * size, body[1] * size
        pieces.append((q0, q1, _attend_body(q, k, v, mask, masks, size, body, sdpa)))
    for q0, q1, k0, k1 in runs:
        if k0 == k1:  # no key in reach: zero rows
            part = q.new_zeros(q.shape[:2] + (q1 - q0, v.shape[-1]))
        else:
            part = F.scaled_dot_product_attention(
                q[:, :, q0:q1],  # (B, H, c, D)
                k[:, :, k0:k1],  # (B, Hkv, s, D)
                v[:, :, k0:k1],
                attn_mask=masks.chunk(q0, q1, k0, k1),  # (1|B, 1|H, c, s)
                **sdpa,
            )  # (B, H, c, Dv)
        pieces.append((q0, q1, part))

    # memory layout (L, B, H, Dv): the caller's permute + reshape to (L, B, E) is then a view
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # a cat: writing into a buffer would chain one full-size copy per piece into the backward
        parts = [p.permute(2, 0, 1, 3) for _, _, p in sorted(pieces, key=lambda x: x[0])]  # (l, B, H, Dv)
        return torch.cat(parts).permute(1, 2, 0, 3), None  # (B, H, L, Dv)
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(q_len, batch, heads, v.shape[-1]).permute(1, 2, 0, 3)  # (B, H, L, Dv)
    for q0, q1, part in pieces:
        out[:, :, q0:q1] = part
    return out, None


def _attend_body(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, masks: _ChunkMasks, size: int, body: tuple[int, int], sdpa
) -> Tensor:
    """The body's chunks in one SDPA call -> out rows [c_lo * c, c_hi * c) as (B, H, n * c, Dv)."""
    batch, heads, _, _ = q.shape
    n = body[1] - body[0]
    q0 = body[0] * size
    k0, _ = _key_range(mask, q0, q0 + size)
    span = masks.span(size)
    qb = (
        q[:, :, q0 : q0 + n * size].transpose(1, 2).reshape(batch * n, size, heads, -1).transpose(1, 2)
    )  # (B*n, H, c, D)
    kb = _windows(k, k0, n, size, span)  # (B*n, Hkv, s, D)
    vb = _windows(v, k0, n, size, span)  # (B*n, Hkv, s, Dv)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=masks.body(q0, k0, n, size), **sdpa)  # (B*n, H, c, Dv)
    return out.unflatten(0, (batch, n)).transpose(1, 2).reshape(batch, heads, n * size, -1)  # (B, H, n*c, Dv)


def _windows(x: Tensor, start: int, n: int, step: int, span: int) -> Tensor:
    """(B, Hkv, S, D) -> (B * n, Hkv, span, D): windows of `span` rows starting at start + i * step.
    A view when B == 1 (overlapping windows share memory); a copy otherwise."""
    w = x[:, :, start : start + (n - 1) * step + span].unfold(2, span, step)  # (B, Hkv, n, D, span)
    return w.permute(0, 2, 1, 4, 3).flatten(0, 1)  # (B*n, Hkv, span, D)


class _ChunkMasks:
    """Additive float masks (0 visible, -inf hidden, plus float parts) for chunks of rows and
    columns. The band part depends only on a chunk's geometry (see `_band`); key padding is made
    additive once per call; dense parts are cut per chunk."""

    def __init__(self, mask: AttentionMask, dtype: torch.dtype, device: torch.device) -> None:
        self.mask = mask
        self.dtype = dtype
        self.device = device
        self.left, self.right = _limits(mask)
        kp = mask.key_padding
        self.padding = None if kp is None else _additive(kp, dtype)  # (B, S)

    def span(self, size: int) -> int:
        """Keys per chunk in the body."""
        assert self.right is not None, "a body needs a bounded right reach (`_body`)"
        return size + self.left + self.right

    def band(self, rows: int, cols: int, shift: int) -> Tensor:
        """(rows, cols) additive band for rows whose diagonal is at column `shift` + row (cached in
        eager mode only: a compiler builds it in the graph)."""
        make = _make_band if torch.compiler.is_compiling() else _band
        return make(rows, cols, shift, self.left, self.right, self.dtype, self.device)

    def chunk(self, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """Rows [q0, q1), columns [k0, k1) -> (c, s) or (1|B, 1|H, c, s)."""
        total = self.band(q1 - q0, k1 - k0, q0 + self.mask.offset - k0)  # (c, s)
        if self.padding is not None:
            total = total + self.padding[:, None, None, k0:k1]  # (B, 1, c, s)
        if self.mask.dense is not None:
            total = total + _additive(self.mask.dense[:, :, q0:q1, k0:k1], self.dtype)  # (1|B, 1|H, c, s)
        return total

    def body(self, q0: int, k0: int, n: int, size: int) -> Tensor:
        """n chunks of `size` rows from q0, keys from k0 -> (c, s) or (B*n, 1|H, c, s)."""
        span = self.span(size)
        total = self.band(size, span, q0 + self.mask.offset - k0)  # (c, s), the same for every chunk
        batch = self.mask.batch
        if self.padding is not None:
            pad = self.padding[:, k0 : k0 + (n - 1) * size + span].unfold(1, span, size)  # (B, n, s)
            total = total + pad.reshape(batch * n, 1, 1, span)  # (B*n, 1, c, s)
        dense = self.mask.dense
        if dense is not None:
            b, h = dense.shape[:2]
            s0, s1, s2, s3 = dense.stride()
            blocks = dense.as_strided(
                (b, n, h, size, span),
                (s0, size * (s2 + s3), s1, s2, s3),
                dense.storage_offset() + q0 * s2 + k0 * s3,
            )  # (1|B, n, 1|H, c, s): the diagonal blocks
            blocks = _additive(blocks.expand(batch, -1, -1, -1, -1), self.dtype)
            total = total + blocks.reshape(batch * n, h, size, span)  # (B*n, 1|H, c, s)
        return total


@functools.lru_cache(maxsize=64)
def _band(
    rows: int, cols: int, shift: int, left: int, right: int | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(rows, cols) additive band: 0 where row r may see column c (r + shift - left <= c <=
    r + shift + right), -inf elsewhere. Cached across calls: it depends only on the geometry, and
    building it costs several small elementwise ops, each a thread-pool round trip, which on a busy
    machine can cost more than the attention itself. Never modified in place by its users."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable by autograd later
        return _make_band(rows, cols, shift, left, right, dtype, device)


def _make_band(
    rows: int, cols: int, shift: int, left: int, right: int | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    r = torch.arange(rows, device=device).unsqueeze(1) + shift  # (rows, 1) diagonal column
    c = torch.arange(cols, device=device).unsqueeze(0)  # (1, cols)
    hidden = c < r - left
    if right is not None:
        hidden |= c > r + right
    return _additive(hidden, dtype)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)
