"""The blockwise backend as one opaque op for `torch.compile`.

The blockwise backend's tile loops make host-side decisions (tile sizes from the CPU's cache size
read from sysfs, worker threads, a dropout seed turned into a Python int, cached triangles): a
compiler cannot trace them without graph breaks, and must not specialise on them. Under
`torch.compile` the dispatch table puts this module in blockwise's place: the same forward and
backward, wrapped as `torch.library.custom_op`s (`multihead::blockwise_attention` and its backward),
with fake implementations (shapes only) and an autograd formula, so Dynamo sees one node and a graph
with dynamic B, L and S never recompiles for it. The dropout seed is a tensor drawn in the graph
(`torch.randint`), read as a number only inside the op, so `torch.manual_seed` still reproduces a run.

Not served here: double backward (`create_graph=True`) through a compiled graph (eager blockwise
serves it); the exporters (`torch.export`, ONNX) do not run this op: `exportable` takes its place.

Notation: B batch, H heads, Hkv key/value heads, L query length, S key length, D head dim.
"""

# no `from __future__ import annotations`: torch.library reads the annotations to build the schema

import torch
from torch import Tensor

from ..masks import AttentionMask
from . import blockwise

name = "blockwise"  # serves exactly what blockwise serves
not_supported_reasons = blockwise.not_supported_reasons


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
    # a tensor drawn in the graph, from the global RNG: no .item() outside the op
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else torch.zeros((), dtype=torch.int64)
    left, right = mask.window if mask.window is not None else (None, None)
    out, weights = torch.ops.multihead.blockwise_attention(
        q,
        k,
        v,
        mask.key_padding,
        mask.dense,
        mask.causal,
        mask.offset,
        mask.window is not None,
        left,
        right,
        float(scale),
        float(dropout_p),
        need_weights,
        average_weights,
        seed,
    )
    return out, weights if need_weights else None


def _plan(
    q: Tensor,
    k: Tensor,
    key_padding: Tensor | None,
    dense: Tensor | None,
    causal: bool,
    offset: int,
    windowed: bool,
    left: int | None,
    right: int | None,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    average: bool,
    seed: Tensor,
) -> "blockwise._Plan":
    """The eager backend's plan, rebuilt from the op's arguments (inside the op: eager code)."""
    batch, heads, q_len, _ = q.shape
    mask = AttentionMask(
        batch,
        heads,
        q_len,
        k.shape[2],
        causal=causal,
        offset=offset,
        window=(left, right) if windowed else None,
        key_padding=key_padding,
        dense=dense,
        device=q.device,
    )
    return blockwise.make_plan(q, k, mask, scale, dropout_p, need_weights, average, seed=int(seed.item()))


@torch.library.custom_op("multihead::blockwise_attention", mutates_args=())
def blockwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding: Tensor | None,
    dense: Tensor | None,
    causal: bool,
    offset: int,
    windowed: bool,
    left: int | None,
    right: int | None,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    average: bool,
    seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """out (B, H, L, D) (laid out as (L, B, H, D)), weights (B, L, S) | (B, H, L, S) | (0,) without weights."""
    plan = _plan(
        q, k, key_padding, dense, causal, offset, windowed, left, right, scale, dropout_p, need_weights, average, seed
    )
    with torch.no_grad():
        out, weights = blockwise._forward(q, k, v, plan)
    return out, weights if weights is not None else q.new_empty(0)


@blockwise_attention.register_fake
def _(
    q, k, v, key_padding, dense, causal, offset, windowed, left, right, scale, dropout_p, need_weights, average, seed
):
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    out = q.new_empty(q_len, batch, heads, v.shape[-1]).permute(1, 2, 0, 3)  # the real op's layout
    if not need_weights:
        return out, q.new_empty(0)
    return out, q.new_empty((batch, q_len, k_len) if average else (batch, heads, q_len, k_len))


@torch.library.custom_op("multihead::blockwise_attention_backward", mutates_args=())
def blockwise_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    d_out: Tensor,
    d_weights: Tensor | None,
    key_padding: Tensor | None,
    dense: Tensor | None,
    causal: bool,
    offset: int,
    windowed: bool,
    left: int | None,
    right: int | None,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    average: bool,
    seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous) from the eager backend's in-place tile-by-tile backward."""
    plan = _plan(
        q, k, key_padding, dense, causal, offset, windowed, left, right, scale, dropout_p, need_weights, average, seed
    )
    with torch.no_grad():
        dq, dk, dv = blockwise._backward_fast(q, k, v, out, d_out, d_weights, plan)
    return dq, dk, dv


@blockwise_attention_backward.register_fake
def _(q, k, v, out, d_out, d_weights, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding, dense = inputs[:5]
    ctx.save_for_backward(q, k, v, output[0], key_padding, dense, inputs[14])  # ..., seed
    ctx.flags = inputs[5:14]  # causal ... average
    ctx.need_weights = inputs[12]


def _backward(ctx, d_out: Tensor | None, d_weights: Tensor | None):
    q, k, v, out, key_padding, dense, seed = ctx.saved_tensors
    if d_weights is not None and (not ctx.need_weights or d_weights.numel() == 0):
        d_weights = None
    if d_out is None:
        d_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.multihead.blockwise_attention_backward(
        q, k, v, out, d_out, d_weights, key_padding, dense, *ctx.flags, seed
    )
    return (dq, dk, dv) + (None,) * 12


blockwise_attention.register_autograd(_backward, setup_context=_setup_context)
