"""The Triton backend: a fused GPU kernel that returns the attention weights in O(B*L*S) memory.

Nothing of size (B, H, L, S) is ever made. The forward is two kernels (see `_triton_kernels.py`):
1. FlashAttention-2's online softmax over key tiles gives the output and each row's log-sum-exp
   (B, H, L) (float32);
2. for the weights, each program takes one (query tile, key tile) of one batch element, recomputes
   every head's scores for it, P = exp(S - lse) (after dropout), and writes their mean over heads
   (one program sums all heads in a fixed order: no atomics, deterministic) or each head's P.
The backward recomputes P from q, k and the saved log-sum-exp (FlashAttention-2): dK and dV of a key
tile are summed in registers over the G query heads of its kv head and over every query tile; dQ of a
query tile over every key tile: two kernels, no atomics, deterministic. delta = rowsum(dO * O), plus
rowsum(P_dropped * dW) when the returned weights get a gradient (a third kernel), so gradients through
the weights are exact too.

Masks: the band (causal, window, with the offset a KV cache uses) is never materialised, and key
tiles outside it are skipped; key padding (B, S) and the dense part (bool or float, broadcast dims read
with stride 0) are read per tile. GQA: q head h reads kv head h // G. A query row with no visible key
gives a zero output, zero weights and zero gradients. Dropout: Philox (`tl.rand`) keyed by a seed drawn
from torch's generator and by (batch, head, row, key), so the forward, the weights and the backward
see the same mask and `torch.manual_seed` reproduces a run; the returned weights are those applied.

Serves CUDA tensors in float16, bfloat16 and float32 (float32 products in IEEE precision unless
`torch.backends.cuda.matmul.allow_tf32`), head dim <= 256. Under `TRITON_INTERPRET=1` it also serves
CPU tensors, in float64 too (tests: correctness and gradcheck on CPU), when forced by name: dispatch
picks it for CUDA tensors only. Not under torch.compile (the kernels are not registered as a custom
op yet). Double backward (`create_graph=True`) recomputes with blockwise's differentiable tiles (not
with dropout).

Notation: B batch, H heads, Hkv kv heads, G = H // Hkv, L query length, S key length, D head dim.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..masks import AttentionMask

name = "triton"

MAX_HEAD_DIM = 256

#: (BLOCK_M, BLOCK_N) of every kernel, when set (tests cut small inputs into several tiles); None
#: picks per kernel and head dim (`_tiles`).
BLOCKS: tuple[int, int] | None = None


# ---- what this backend serves ------------------------------------------------------------------
def interpreting() -> bool:
    """Triton's interpreter is on (`TRITON_INTERPRET=1`): kernels run on CPU tensors, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    reasons = []
    if not _triton_available():
        return ["triton is not installed (pip install triton)"]
    on_cuda = q.device.type == "cuda"
    if not on_cuda and not interpreting():
        reasons.append(f"needs CUDA tensors, got {q.device.type} (CPU runs only in tests, under TRITON_INTERPRET=1)")
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + (() if on_cuda else (torch.float64,))
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"needs q, k, v all in one of {[str(d) for d in dtypes]}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if on_cuda and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons.append("bfloat16 needs a GPU of compute capability >= 8.0")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] != q.shape[-1]:
        reasons.append(f"head dim must be <= {MAX_HEAD_DIM} and equal for q, k, v, got {q.shape[-1]}, {v.shape[-1]}")
    if 0 in q.shape or k.shape[2] == 0:
        reasons.append("empty inputs (B, H, L, S or D is 0)")
    if any(p is not None and p.requires_grad for p in (mask.key_padding, mask.dense)):
        reasons.append("a float mask that requires grad (no gradient to the mask)")
    if torch.compiler.is_compiling():
        reasons.append("not under torch.compile (the kernels are not a registered custom op)")
    return reasons


# ---- the plan: everything about a call that is not q, k, v ----------------------------------------
@dataclass(frozen=True)
class _Plan:
    scale: float
    dropout_p: float
    keep_scale: float
    seed: int
    need_weights: bool
    average: bool
    offset: int
    left: int | None
    right: int | None
    key_padding: Tensor | None  # (B, S) additive, in the accumulation dtype
    dense: Tensor | None  # (1|B, 1|H, L, S): uint8 (1 = hidden) or float (added)
    mask: AttentionMask  # for the differentiable (double) backward
    acc: torch.dtype  # the kernels' accumulation dtype: float32, float64 for float64 inputs


def _plan(q: Tensor, mask: AttentionMask, scale: float, dropout_p: float, need_weights: bool, average: bool) -> _Plan:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    left, right = mask.band_limits() if mask.has_band else (None, None)
    key_padding = mask.key_padding
    if key_padding is not None:  # (B, S): -inf where padded (bool), or the user's floats
        if key_padding.dtype == torch.bool:
            key_padding = torch.zeros(key_padding.shape, dtype=acc, device=q.device).masked_fill_(
                key_padding, -torch.inf
            )
        key_padding = key_padding.to(acc).contiguous()
    dense = mask.dense
    if dense is not None and dense.dtype == torch.bool:
        dense = dense.view(torch.uint8)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item()) if dropout_p > 0.0 else 0
    return _Plan(
        scale=float(scale),
        dropout_p=float(dropout_p),
        keep_scale=0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p),
        seed=seed,
        need_weights=need_weights,
        average=average,
        offset=mask.offset,
        left=left,
        right=right,
        key_padding=key_padding,
        dense=dense,
        mask=mask,
        acc=acc,
    )


#: Tiles and launch options on a GPU, per kernel: BLOCK_M query rows, BLOCK_N keys, warps, pipeline
#: stages, for head dims up to 64 / above 64. Chosen from FlashAttention-2 practice on Hopper (the
#: forward holds a (BLOCK_M, D) float32 accumulator and a (BLOCK_M, BLOCK_N) score tile in registers;
#: the weights and backward kernels hold two of each), not tuned on a measurement yet.
GPU_TILES: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "forward": ((128, 64, 4, 3), (128, 64, 8, 3)),
    "weights": ((64, 64, 4, 2), (64, 64, 8, 2)),
    "backward": ((64, 64, 4, 2), (64, 64, 8, 2)),
}


def _tiles(q: Tensor, kernel: str) -> dict:
    """BLOCK_M, BLOCK_N (and on a GPU num_warps, num_stages) for one kernel launch."""
    if BLOCKS is not None or q.device.type != "cuda" or interpreting():
        block_m, block_n = BLOCKS or (64, 64)
        return dict(BLOCK_M=block_m, BLOCK_N=block_n)
    small, large = GPU_TILES[kernel]
    block_m, block_n, warps, stages = small if q.shape[-1] <= 64 else large
    if q.shape[-1] > 128:  # D = 256: halve the tiles to stay in registers and shared memory
        block_m, block_n = max(16, block_m // 2), max(16, block_n // 2)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _strides4(t: Tensor) -> list[int]:
    """Strides of a 4-d tensor, 0 for a dimension of size 1 (a broadcast)."""
    return [s if n != 1 else 0 for s, n in zip(t.stride(), t.shape)]


_built: tuple[bool, ModuleType] | None = None


def _kernels() -> ModuleType:
    """The kernels module, (re)built when the interpreter setting differs from when it was built
    (`triton.jit` decides at decoration time)."""
    global _built
    flag = interpreting()
    if _built is None or _built[0] != flag:
        module = importlib.import_module(f"{__package__}._triton_kernels")
        if _built is not None:
            module = importlib.reload(module)
        _built = (flag, module)
    return _built[1]


def _common(q: Tensor, k: Tensor, plan: _Plan, dummy: Tensor) -> tuple[list, list, dict]:
    """What every kernel takes besides its own tensors: the two mask pointers (first among the
    pointers), the mask strides and scalars (after the strides), and the constexprs."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kp, dense = plan.key_padding, plan.dense
    pointers = [dummy if kp is None else kp, dummy if dense is None else dense]
    scalars = [
        0 if kp is None else kp.stride(0),
        *([0, 0, 0, 0] if dense is None else _strides4(dense)),
        H,
        H // Hkv,
        L,
        S,
        plan.offset,
        plan.left or 0,
        plan.right or 0,
        plan.scale,
        plan.seed,
        plan.dropout_p,
        plan.keep_scale,
    ]
    # float32 products as torch's matmul makes them (IEEE unless it allows TF32); for 16-bit inputs
    # the setting does not apply (Triton's default)
    precision = "tf32"
    if q.dtype in (torch.float32, torch.float64) and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        precision = "ieee"
    constexprs = dict(
        D=D,
        BLOCK_D=max(16, 1 << (D - 1).bit_length()),
        HAS_LEFT=plan.left is not None,
        HAS_RIGHT=plan.right is not None,
        HAS_KP=kp is not None,
        DENSE=0 if dense is None else 1 if dense.dtype == torch.uint8 else 2,
        DROPOUT=plan.dropout_p > 0.0,
        PREC=precision,
        UPCAST=q.dtype == torch.bfloat16 and interpreting(),
    )
    return pointers, scalars, constexprs


# ---- forward ---------------------------------------------------------------------------------------
def _forward(q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor | None]:
    """out (B, H, L, D) (laid out as (L, B, H, D), torch's merge order), lse (B, H, L), weights or None."""
    kern = _kernels()
    B, H, L, D = q.shape
    S = k.shape[2]
    out = q.new_empty(L, B, H, D).permute(1, 2, 0, 3)  # (B, H, L, D) view of (L, B, H, D)
    lse = torch.empty(B, H, L, dtype=plan.acc, device=q.device)
    ptrs, rest, const = _common(q, k, plan, lse)
    tiles = _tiles(q, "forward")
    grid = (_cdiv(L, tiles["BLOCK_M"]), B * H)
    kern._forward[grid](
        q, k, v, out, lse, *ptrs, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *rest, **const, **tiles
    )
    weights = None
    if plan.need_weights:
        weights = q.new_empty((B, L, S) if plan.average else (B, H, L, S))
        w_strides = (weights.stride(0), 0, *weights.stride()[1:]) if plan.average else weights.stride()
        tiles = _tiles(q, "weights")
        w_grid = (_cdiv(L, tiles["BLOCK_M"]), _cdiv(S, tiles["BLOCK_N"]), B if plan.average else B * H)
        kern._weights[w_grid](
            q, k, lse, weights, *ptrs, *q.stride(), *k.stride(), *w_strides, *rest, **const, AVERAGE=plan.average,
            **tiles,
        )  # fmt: skip
    return out, lse, weights


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # ceil(a / b)


# ---- backward --------------------------------------------------------------------------------------
def _backward(q, k, v, out, lse, d_out: Tensor, d_weights: Tensor | None, plan: _Plan):
    """dq, dk, dv (FlashAttention-2 recompute)."""
    kern = _kernels()
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    delta = (d_out.to(plan.acc) * out.to(plan.acc)).sum(-1).contiguous()  # (B, H, L): rowsum(dO * O)
    ptrs, rest, const = _common(q, k, plan, lse)
    tiles = _tiles(q, "backward")
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    has_dw = d_weights is not None
    dw = d_weights if has_dw else lse
    w_strides: tuple[int, ...]
    if d_weights is not None and plan.average:  # (B, L, S)
        w_strides = (d_weights.stride(0), 0, d_weights.stride(1), d_weights.stride(2))
    elif d_weights is not None:
        w_strides = tuple(d_weights.stride())
    else:
        w_strides = (0, 0, 0, 0)
    dw_scale = 1.0 / H if plan.average else 1.0
    if has_dw:  # delta += rowsum(P_dropped * dW_h)
        kern._backward_delta_w[(_cdiv(L, block_m), B * H)](
            q, k, lse, dw, delta, *ptrs, *q.stride(), *k.stride(), *w_strides, *rest, dw_scale, **const,
            AVERAGE=plan.average, **tiles,
        )  # fmt: skip
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    flags = dict(HAS_DW=has_dw, AVERAGE=plan.average)
    kern._backward_dkdv[(_cdiv(S, block_n), B * Hkv)](
        q, k, v, d_out, lse, delta, dw, dk, dv, *ptrs,
        *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *w_strides, *dk.stride(), *dv.stride(),
        *rest, dw_scale, **const, **flags, **tiles,
    )  # fmt: skip
    kern._backward_dq[(_cdiv(L, block_m), B * H)](
        q, k, v, d_out, lse, delta, dw, dq, *ptrs,
        *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *w_strides, *dq.stride(),
        *rest, dw_scale, **const, **flags, **tiles,
    )  # fmt: skip
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan):
        out, lse, weights = _forward(q, k, v, plan)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_weights: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        if d_out is None and d_weights is None:
            return None, None, None, None
        if d_out is None:
            d_out = torch.zeros_like(out)
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            return (*_backward_differentiable(q, k, v, d_out, d_weights, plan), None)
        return (*_backward(q, k, v, out, lse, d_out, d_weights, plan), None)


def _backward_differentiable(q, k, v, d_out, d_weights, plan: _Plan):
    """Double backward: blockwise's differentiable tile-by-tile recompute (same probabilities, math
    autograd can differentiate again). Its dropout masks are not ours, so not with dropout."""
    if plan.dropout_p > 0.0:
        raise RuntimeError(
            "the triton backend's backward is not differentiable with dropout > 0 (create_graph=True); "
            "use backend='blockwise' for double backward with dropout"
        )
    from . import blockwise

    B, H, L, _ = q.shape
    batches, rows = blockwise.choose_tiles(B, H, L, k.shape[2], q.element_size(), q.device)
    tiles = blockwise._Plan(plan.mask, plan.scale, 0.0, plan.need_weights, plan.average, rows, batches, 0)
    return blockwise._backward_differentiable(q, k, v, d_out, d_weights, tiles)


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
    if dropout_p > 0.0 and mask.q_len * mask.k_len >= 2**31:
        raise ValueError(f"dropout in the triton backend needs L * S < 2**31, got L={mask.q_len}, S={mask.k_len}")
    plan = _plan(q, mask, scale, dropout_p, need_weights, average_weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _TritonAttention.apply(q, k, v, plan)
    out, _, weights = _forward(q, k, v, plan)
    return out, weights
