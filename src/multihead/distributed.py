"""Beyond one device: context-parallel (ring) attention and tensor-parallel heads over `torch.distributed`.

Context parallel (`context_parallel`, `shard_sequence`, `unshard_sequence`): each of the W ranks of a
process group holds a shard of the sequence. Its queries stay put; key/value blocks travel around the
ring with `dist.batch_isend_irecv` (the next block is in flight while the current one is attended);
each rank merges its partial results by log-sum-exp in float32 (float64 for float64 inputs), so the
result is exact, not approximate. The backward sends the blocks around once more, and each block's
dK/dV accumulator travels with it until it is home.

Sharding: the sequence is cut into 2W chunks (`torch.tensor_split` sizes, so any length works: chunks
differ by at most one token) and rank r holds chunks r and 2W-1-r (`load_balance=True`), so under a
causal mask every rank does the same work; with `load_balance=False`, W contiguous chunks. Shards may
differ in length by a token or two; nothing is padded on the caller's side, and `unshard_sequence`
gives back exactly the full tensor.

Tensor parallel (`tensor_parallel`): heads are split across a 1-D device mesh; activations in and out
are full (replicated); `out_proj` is split by columns and summed with one all-reduce.

The CPU flash op's quirks are guarded in one place, `_block_forward`/`_block_backward`: a query row
that sees no key gets log-sum-exp 0 from it (we set -inf), a -inf log-sum-exp fed to its backward gives
NaN (we pass 0: such a row's probabilities are exp(-inf - 0) = 0 anyway), and a zero-length block kills
the process (empty blocks are skipped before the call). On other devices (CUDA) the block kernel is
plain math in the accumulation dtype, materialising one (n, m) chunk pair of scores at a time; it is
tested on CPU (`_force_math`), not on a GPU.

Notation: B batch, L query length, S key length, E embed dim, H heads, Hkv key/value heads, D head
dim, W ranks, n/m a rank's (or a chunk's) query/key length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import _project_heads
from .module import MultiheadAttention
from .validation import check_inputs

__all__ = [
    "ContextParallel",
    "TensorParallel",
    "context_parallel",
    "shard_sequence",
    "tensor_parallel",
    "unshard_sequence",
]

# Seconds spent launching and waiting for ring transfers in this process (read by the benchmark).
comm_seconds = [0.0]
# Tests set this to run the plain-math block kernel (what non-CPU devices use) on CPU.
_force_math = False

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ---- the sharding layout ------------------------------------------------------------------------
def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "multihead.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group(...) first"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _layout(length: int, world: int, load_balance: bool) -> list[list[tuple[int, int]]]:
    """Per rank, its chunks as (global start, size), in the order the rank stores them."""
    parts = 2 * world if load_balance else world
    base, extra = divmod(length, parts)
    sizes = [base + (i < extra) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    owned = [[r, parts - 1 - r] if load_balance else [r] for r in range(world)]
    return [[(starts[c], sizes[c]) for c in chunks] for chunks in owned]


def _shard_lengths(length: int, world: int, load_balance: bool) -> list[int]:
    return [sum(size for _, size in chunks) for chunks in _layout(length, world, load_balance)]


def shard_sequence(
    x: Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1, load_balance: bool = True
) -> Tensor:
    """This rank's shard of the full tensor `x` along `dim` (the sequence; 1 for (B, L, E)): chunks r
    and 2W-1-r of 2W with `load_balance` (the layout `context_parallel` expects), else chunk r of W.
    Any length works; shards then differ by a token or two. Returns a new tensor (not a view)."""
    world, rank = _world(group)
    dim = dim % x.dim()
    chunks = _layout(x.shape[dim], world, load_balance)[rank]
    return torch.cat([x.narrow(dim, start, size) for start, size in chunks], dim=dim)


def unshard_sequence(
    y: Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1, load_balance: bool = True
) -> Tensor:
    """The full tensor from every rank's shard `y` (the inverse of `shard_sequence`), on every rank.
    A collective: every rank of the group must call it. Not differentiable."""
    world, _ = _world(group)
    dim = dim % y.dim()
    lengths = _gather_lengths([y.shape[dim]], group, y.device)
    return _unshard(y, dim, [n[0] for n in lengths], group, load_balance)


def _gather_lengths(values: list[int], group: dist.ProcessGroup | None, device: torch.device) -> list[list[int]]:
    """Every rank's `values` (small ints), one all-gather."""
    world, _ = _world(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [t.tolist() for t in every]


def _check_lengths(lengths: list[int], load_balance: bool, what: str) -> int:
    """The global length, after checking the shards are the ones `shard_sequence` makes."""
    total = sum(lengths)
    expected = _shard_lengths(total, len(lengths), load_balance)
    if lengths != expected:
        raise ValueError(
            f"{what}: the ranks' shard lengths {lengths} are not a sharding of length {total} "
            f"(shard_sequence(..., load_balance={load_balance}) gives {expected}); shard inputs with shard_sequence"
        )
    return total


def _unshard(y: Tensor, dim: int, lengths: list[int], group, load_balance: bool) -> Tensor:
    world = len(lengths)
    total = _check_lengths(lengths, load_balance, "unshard_sequence")
    longest = max(lengths)
    pad = list(y.shape)
    pad[dim] = longest - y.shape[dim]
    padded = torch.cat([y, y.new_zeros(pad)], dim=dim).contiguous()
    every = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(every, padded, group=group)
    pieces: list[tuple[int, Tensor]] = []
    for r, chunks in enumerate(_layout(total, world, load_balance)):
        local = 0
        for start, size in chunks:
            pieces.append((start, every[r].narrow(dim, local, size)))
            local += size
    return torch.cat([p for _, p in sorted(pieces, key=lambda sp: sp[0])], dim=dim)


# ---- one block: out, log-sum-exp and their backward (the op's quirks live here) ------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_cpu_op(q: Tensor) -> bool:
    return q.device.type == "cpu" and not _force_math


def _dead_rows(bias: Tensor | None) -> Tensor | None:
    """(B|1, 1, n) True where a query row sees no key of this block."""
    return None if bias is None else torch.isneginf(bias).all(-1)


def _block_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float):
    """q (B, H, n, D), k/v (B, Hkv, m, D), n, m > 0; bias additive (B|1, 1, n|1, m) or None; causal
    top-left (used only when n == m on the same positions). -> out (B, H, n, D) and lse (B, H, n) in
    the accumulation dtype (float32, float64 for float64: half inputs are attended in float32), lse
    -inf for rows that see no key."""
    acc = _acc_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    bias = None if bias is None else bias.to(acc)
    if _use_cpu_op(q):
        out, lse = _cpu_flash(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        dead = _dead_rows(bias)
        if dead is not None:  # quirk: a row that sees nothing gets lse 0 from the op
            lse = lse.masked_fill(dead, float("-inf"))
        return out, lse
    scores = _scores(q, k, bias, causal, scale)  # (B, H, n, m)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
    return torch.matmul(probs, _expand(v, q.shape[1])), lse


def _block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias, causal: bool, scale: float
):
    """Gradients of one block given the *global* out and lse of these query rows -> dq (B, H, n, D),
    dk/dv (B, Hkv, m, D), in the accumulation dtype."""
    acc = lse.dtype
    dout, q, k, v, out = (t.to(acc) for t in (dout, q, k, v, out))
    bias = None if bias is None else bias.to(acc)
    lse = _finite(lse)  # quirk: -inf into the op's backward gives NaN; such rows have p = 0 anyway
    if _use_cpu_op(q):
        return _cpu_flash_backward(dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    heads, kv_heads = q.shape[1], k.shape[1]
    probs = torch.exp(_scores(q, k, bias, causal, scale) - lse.unsqueeze(-1))  # (B, H, n, m)
    dv = torch.matmul(probs.transpose(-2, -1), dout)  # (B, H, m, D)
    dp = torch.matmul(dout, _expand(v, heads).transpose(-2, -1))
    delta = (dout * out).sum(-1, keepdim=True)
    ds = probs * (dp - delta) * scale
    dq = torch.matmul(ds, _expand(k, heads))
    dk = torch.matmul(ds.transpose(-2, -1), q)
    if kv_heads != heads:  # sum each group's heads into its kv head
        dk = dk.unflatten(1, (kv_heads, -1)).sum(2)
        dv = dv.unflatten(1, (kv_heads, -1)).sum(2)
    return dq, dk, dv


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    scores = torch.matmul(q * scale, _expand(k, q.shape[1]).transpose(-2, -1))  # (B, H, n, m)
    if causal:
        n, m = scores.shape[-2:]
        hidden = torch.ones(n, m, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if bias is not None:
        scores = scores + bias
    return scores


def _expand(x: Tensor, heads: int) -> Tensor:
    """(B, Hkv, m, D) -> (B, H, m, D) for grouped-query attention."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _finite(lse: Tensor) -> Tensor:
    return lse.masked_fill(torch.isneginf(lse), 0.0)


# ---- the ring -----------------------------------------------------------------------------------
@dataclass
class _Pair:
    """One (query chunk, key chunk) computation: local query rows [q0, q0+n) against rows
    [k0, k0+m) of the block in hand."""

    q0: int
    n: int
    k0: int
    m: int
    causal: bool
    bias: Tensor | None  # (B|1, 1, n|1, m) additive


@dataclass
class _Ring:
    group: dist.ProcessGroup | None
    world: int
    rank: int
    peers: tuple[int, int]  # global ranks of (next, previous)
    block_len: int  # every travelling block is padded to this many keys
    pairs: list[list[_Pair]]  # per source rank (of the block in hand), what this rank computes
    scale: float


def _plan(
    q_chunks: list[tuple[int, int]],
    k_layout: list[list[tuple[int, int]]],
    *,
    causal: bool,
    key_bias: Tensor | None,
    q_len_local: int,
    device: torch.device,
) -> list[list[_Pair]]:
    """What this rank computes against each source rank's block. key_bias: (B, S) additive, global."""
    plans = []
    for k_chunks in k_layout:
        block_len = sum(size for _, size in k_chunks)
        if not causal:  # one call: all my queries against the whole block
            bias = None
            if key_bias is not None and block_len:
                bias = torch.cat([key_bias[:, s : s + m] for s, m in k_chunks], dim=1)[:, None, None, :]
            plans.append([_Pair(0, q_len_local, 0, block_len, False, bias)] if q_len_local and block_len else [])
            continue
        pairs = []
        q0 = 0
        for qs, n in q_chunks:
            k0 = 0
            for ks, m in k_chunks:
                if n and m and ks <= qs + n - 1:  # some key of this chunk is visible to some row
                    bias = None if key_bias is None else key_bias[:, None, None, ks : ks + m]  # (B, 1, 1, m)
                    full = ks + m - 1 <= qs
                    diagonal = ks == qs and m == n
                    flag = not full and diagonal and bias is None
                    if not full and not flag:  # the causal part as an explicit mask
                        rows = torch.arange(qs, qs + n, device=device).unsqueeze(1)
                        cols = torch.arange(ks, ks + m, device=rows.device).unsqueeze(0)
                        dtype = torch.float32 if key_bias is None else key_bias.dtype
                        tri = torch.zeros(n, m, dtype=dtype, device=rows.device).masked_fill_(
                            cols > rows, float("-inf")
                        )
                        bias = tri[None, None] if bias is None else bias + tri
                    pairs.append(_Pair(q0, n, k0, m, flag, bias))
                k0 += m
            q0 += n
        plans.append(pairs)
    return plans


def _exchange(ring: _Ring, send: Tensor, recv: Tensor | None = None) -> tuple[Tensor, tuple]:
    """Start sending `send` to the next rank and receiving the previous rank's into `recv` (a free
    buffer like `send`; a new one if None)."""
    start = time.perf_counter()
    recv = torch.empty_like(send) if recv is None else recv
    nxt, prev = ring.peers
    ops = [dist.P2POp(dist.isend, send, nxt, ring.group), dist.P2POp(dist.irecv, recv, prev, ring.group)]
    works = dist.batch_isend_irecv(ops)
    comm_seconds[0] += time.perf_counter() - start
    return recv, (works, send)  # the sent tensor stays alive until waited on


def _wait(pending: tuple) -> None:
    start = time.perf_counter()
    for w in pending[0]:
        w.wait()
    comm_seconds[0] += time.perf_counter() - start


def _pad_keys(x: Tensor, length: int) -> Tensor:
    """(B, Hkv, m, D) -> (B, Hkv, length, D), zeros after m."""
    if x.shape[2] == length:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:2], length - x.shape[2], x.shape[3])], dim=2)


class _RingAttention(torch.autograd.Function):
    """q (B, H, n, D) local queries; k/v (B, Hkv, m, D) local keys -> out (B, H, n, D).

    Memory, in units of this rank's (B, n, E) activation: saved for backward are q (1, a copy, so the
    fused projection output is freed), the stacked k/v that starts the ring (2 with full heads) and
    out (1, laid out (B, n, H, D) so the output projection reads it without a copy). The forward
    overlaps each transfer with the block in hand (two kv buffers). The backward does not overlap:
    it computes, then passes kv and the travelling dK/dV accumulator on, one after the other, so it
    holds one spare buffer at a time (transfers are a few % of a step on CPU; memory is the point)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> Tensor:
        acc = _acc_dtype(q.dtype)
        batch, heads, n, dim = q.shape
        out_acc = torch.zeros(batch, n, heads, dim, dtype=acc, device=q.device).transpose(1, 2)  # (B, H, n, D)
        # (B, H, n): in float64, cheap at this size, so the merged lse rounds once (to `acc`), not per merge:
        # the backward's p = exp(s - lse) carries any error of lse, scaled by nothing
        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64, device=q.device)
        own = torch.stack([_pad_keys(k, ring.block_len), _pad_keys(v, ring.block_len)])  # (2, B, Hkv, M, D)
        kv, spare = own, None
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            if step < ring.world - 1:
                incoming, works = _exchange(ring, kv, spare)
            for p in ring.pairs[source]:
                rows = slice(p.q0, p.q0 + p.n)
                keys = slice(p.k0, p.k0 + p.m)
                out_b, lse_b = _block_forward(
                    q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys], p.bias, p.causal, ring.scale
                )
                _merge(out_acc[:, :, rows], lse_acc[:, :, rows], out_b, lse_b)
            if step < ring.world - 1:
                _wait(works)
                # the block just sent is free (the next receive lands there), unless it is our own
                spare, kv = (None if kv is own else kv), incoming
        out = out_acc.to(q.dtype)
        ctx.ring, ctx.m = ring, k.shape[2]
        ctx.save_for_backward(q.contiguous(), own, out, lse_acc.to(acc))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, kv, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # the block in hand's dK/dV, accumulated by the ranks that held it before
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # (2, B, Hkv, M, D)
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            for p in ring.pairs[source]:
                rows = slice(p.q0, p.q0 + p.n)
                keys = slice(p.k0, p.k0 + p.m)
                dq_b, dk_b, dv_b = _block_backward(
                    dout[:, :, rows], q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys],
                    out[:, :, rows], lse[:, :, rows], p.bias, p.causal, ring.scale,
                )  # fmt: skip
                dq[:, :, rows] += dq_b
                dkv[0, :, :, keys] += dk_b
                dkv[1, :, :, keys] += dv_b
                del dq_b, dk_b, dv_b
            if ring.world > 1:  # pass the accumulator on; after the last step it arrives home
                dkv = _swap(ring, dkv)
            if step < ring.world - 1:
                kv = _swap(ring, kv)
        m = ctx.m
        return dq.to(q.dtype), dkv[0, :, :, :m].to(kv.dtype), dkv[1, :, :, :m].to(kv.dtype), None


def _swap(ring: _Ring, send: Tensor) -> Tensor:
    """Send `send` to the next rank, receive the previous rank's; blocking."""
    recv, pending = _exchange(ring, send)
    _wait(pending)
    return recv


def _merge(out_acc: Tensor, lse_acc: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """In place: (out_acc, lse_acc) <- the log-sum-exp merge with one block's (out_b, lse_b)."""
    lse_b = lse_b.to(lse_acc.dtype)
    lse = torch.logaddexp(lse_acc, lse_b)
    safe = _finite(lse)  # rows that saw nothing so far keep weights 0, not NaN
    out_acc.mul_(torch.exp(lse_acc - safe).unsqueeze(-1).to(out_acc.dtype))
    out_acc.add_(out_b * torch.exp(lse_b - safe).unsqueeze(-1).to(out_acc.dtype))
    lse_acc.copy_(lse)


# ---- the context-parallel module ---------------------------------------------------------------
class ContextParallel(nn.Module):
    """Ring attention over a process group with the weights of a `MultiheadAttention` (`self.module`,
    shared, not copied). Each rank calls it on its own shard of the sequence (`shard_sequence`) and
    gets its shard of the output; forward and backward are exact.

    Served: self- and cross-attention (keys sharded like queries), `is_causal` (top-left, on global
    positions), `key_padding_mask` (sharded like the keys), grouped-query heads, rotary embeddings at
    global positions, packed or separate projection weights, bias. Refused with an error: attn_mask,
    need_weights=True, dropout in training mode, sliding windows, add_bias_kv, add_zero_attn, unbatched
    inputs.
    """

    def __init__(
        self, module: MultiheadAttention, group: dist.ProcessGroup | None = None, *, load_balance: bool = True
    ):
        super().__init__()
        if not isinstance(module, MultiheadAttention):
            raise TypeError(
                f"context_parallel expects a multihead.MultiheadAttention, got {type(module).__name__}; "
                "convert torch's module with MultiheadAttention.from_torch(m)"
            )
        unsupported = {
            "window": module.window is not None,
            "add_bias_kv": module.bias_k is not None,
            "add_zero_attn": module.add_zero_attn,
        }
        if any(unsupported.values()):
            raise ValueError(
                f"context_parallel does not support {', '.join(k for k, v in unsupported.items() if v)} "
                "(the extra keys / window would need their own ring logic); build the module without them"
            )
        _world(group)
        self.module = module
        self.group = group
        self.load_balance = load_balance

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """query (B, n, E), key (B, m, kdim), value (B, m, vdim): this rank's shards (batch_first;
        (n, B, E) otherwise); key_padding_mask (B, m), this rank's shard. Returns (out shard like
        query, None). need_weights defaults to False here (True is refused)."""
        mod = self.module
        if need_weights:
            raise ValueError(
                "context_parallel does not return attention weights (no rank holds a full row of them); "
                "call with need_weights=False"
            )
        if attn_mask is not None:
            raise ValueError(
                "context_parallel does not take attn_mask (a dense (L, S) mask would have to be sharded both "
                "ways); use is_causal=True and/or key_padding_mask"
            )
        if mod.training and mod.dropout > 0.0:
            raise ValueError(
                f"context_parallel does not apply attention dropout (module.dropout = {mod.dropout} in training "
                "mode): set module.dropout = 0.0 or call module.eval()"
            )
        w = mod.projections()
        check_inputs(
            query, key, value, embed_dim=mod.embed_dim, kdim=mod.kdim, vdim=mod.vdim,
            batch_first=mod.batch_first, param=w.out_proj_weight,
        )  # fmt: skip
        if query.dim() != 3:
            raise ValueError(f"context_parallel needs batched 3-D inputs, got query of shape {tuple(query.shape)}")
        shared = "qkv" if query is key and key is value else "kv" if key is value else None
        if not mod.batch_first:  # (n, B, E) -> (B, n, E) views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, n, _ = query.shape
        m = key.shape[1]
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or (
                key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point()
            ):
                raise TypeError("key_padding_mask must be a bool or floating-point tensor (this rank's (B, m) shard)")
            if tuple(key_padding_mask.shape) != (batch, m):
                raise ValueError(
                    f"key_padding_mask must be this rank's shard, shape (B, m) = ({batch}, {m}), "
                    f"got {tuple(key_padding_mask.shape)}; shard it with shard_sequence(mask, dim=1)"
                )
        world, rank = _world(self.group)

        lengths = _gather_lengths([n, m], self.group, query.device)
        q_len = _check_lengths([x[0] for x in lengths], self.load_balance, "context_parallel query")
        k_len = _check_lengths([x[1] for x in lengths], self.load_balance, "context_parallel key")
        q_layout = _layout(q_len, world, self.load_balance)
        k_layout = _layout(k_len, world, self.load_balance)
        key_bias = None
        if key_padding_mask is not None:  # (B, S) additive, every rank's shard (small: B * S values)
            full = _unshard(key_padding_mask, 1, [x[1] for x in lengths], self.group, self.load_balance)
            key_bias = full.to(query.dtype) if full.is_floating_point() else _additive(full, query.dtype)

        # (B, H, n, D), (B, Hkv, m, D) x2
        q, k, v = _project_heads(query, key, value, w, shared, mod.num_heads, mod.num_kv_heads, mod.head_dim, False)
        if mod.rotary is not None:  # each token at its global position
            q_pos = _positions(q_layout[rank], query.device)
            k_pos = _positions(k_layout[rank], query.device)
            q = mod.rotary(q, q_pos, max_position=max(q_len - 1, 0))
            k = mod.rotary(k, k_pos, max_position=max(k_len - 1, 0))

        group_ranks = [dist.get_global_rank(self.group, r) if self.group is not None else r for r in range(world)]
        ring = _Ring(
            group=self.group,
            world=world,
            rank=rank,
            peers=(group_ranks[(rank + 1) % world], group_ranks[(rank - 1) % world]),
            block_len=max(x[1] for x in lengths),
            pairs=_plan(
                q_layout[rank], k_layout, causal=is_causal, key_bias=key_bias, q_len_local=n, device=query.device
            ),
            scale=mod.head_dim**-0.5,
        )
        out = _RingAttention.apply(q, k, v, ring)  # (B, H, n, D)
        if mod.batch_first:
            out = out.transpose(1, 2).reshape(batch, n, mod.embed_dim)  # (B, n, E), a view of the ring's output
        else:
            out = out.permute(2, 0, 1, 3).reshape(n, batch, mod.embed_dim)  # (n, B, E)
        return mod.out_proj(out), None  # called as a module: its hooks (FSDP2 on out_proj) fire


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _positions(chunks: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Global positions (n,) of a rank's tokens."""
    if not chunks:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(s, s + size, device=device) for s, size in chunks])


def context_parallel(
    module: MultiheadAttention, group: dist.ProcessGroup | None = None, *, load_balance: bool = True
) -> ContextParallel:
    """A module each rank of `group` calls on its shard of the sequence (from `shard_sequence` with
    the same `load_balance`), returning its shard of the output: exact ring attention over the
    whole sequence, with `module`'s weights (shared, so optimisers, DDP and FSDP see one set)."""
    return ContextParallel(module, group, load_balance=load_balance)


# ---- tensor parallel: heads across a mesh ------------------------------------------------------
class _CopyToRanks(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: the sum of every rank's gradient (each
    rank's heads contribute a part)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRanks(torch.autograd.Function):
    """Forward: the sum of every rank's partial result (replicated after). Backward: identity (every
    rank holds the same, replicated, gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # the all-reduce writes in place
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherHeads(torch.autograd.Function):
    """(B, H_local, L, S) per rank -> (B, H, L, S) on every rank; backward keeps this rank's heads."""

    @staticmethod
    def forward(ctx, x: Tensor, group, world: int, rank: int) -> Tensor:
        ctx.rank, ctx.heads = rank, x.shape[1]
        every = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(every, x.contiguous(), group=group)
        return torch.cat(every, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[:, ctx.rank * ctx.heads : (ctx.rank + 1) * ctx.heads], None, None, None


class TensorParallel(nn.Module):
    """A `MultiheadAttention` with its heads split across the ranks of a 1-D device mesh.

    Rank r holds query heads [r H/W, (r+1) H/W) (rows of q's weight and bias), the key/value heads they
    read (rows of k/v; split when W divides Hkv, else kept whole on every rank with gradients summed
    over ranks), and the matching columns of `out_proj.weight` (its bias whole). Activations in and
    out are full (replicated): each rank attends with its heads, and one all-reduce sums the partial
    output projections. `state_dict()` is in torch's layout with full tensors (gathered);
    `load_state_dict()` takes full tensors and keeps this rank's shard. Dropout (training mode) draws
    each rank's masks from that rank's RNG for its own heads: the same distribution as one process,
    not the same numbers.
    """

    def __init__(self, module: MultiheadAttention, device_mesh=None):
        super().__init__()
        if not isinstance(module, MultiheadAttention):
            raise TypeError(
                f"tensor_parallel expects a multihead.MultiheadAttention, got {type(module).__name__}; "
                "convert torch's module with MultiheadAttention.from_torch(m)"
            )
        if module.bias_k is not None:
            raise ValueError("tensor_parallel does not support add_bias_kv; build the module without it")
        group = _mesh_group(device_mesh)
        world, rank = _world(group)
        heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
        if heads % world:
            raise ValueError(
                f"tensor_parallel splits heads evenly: num_heads = {heads} must be divisible by the mesh size {world}"
            )
        self.group, self.world, self.rank = group, world, rank
        self.embed_dim, self.kdim, self.vdim = module.embed_dim, module.kdim, module.vdim
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, dim
        self.local_heads = heads // world
        self.packed = module.in_proj_weight is not None
        self.batch_first, self.add_zero_attn = module.batch_first, module.add_zero_attn
        self.dropout, self.backend, self.window = module.dropout, module.backend, module.window
        self.rotary = module.rotary
        q0, q1 = rank * self.local_heads, (rank + 1) * self.local_heads
        group_size = heads // kv_heads
        self.kv_split = kv_heads % world == 0
        self.kv_range = (q0 // group_size, (q1 - 1) // group_size + 1)  # kv heads this rank reads
        # local kv head for each local query head
        self.kv_index = [(q0 + i) // group_size - self.kv_range[0] for i in range(self.local_heads)]

        w = module.projections()
        kv_dim = kv_heads * dim
        if w.in_proj_weight is not None:  # self.packed
            w_q, w_k, w_v = w.in_proj_weight.split([self.embed_dim, kv_dim, kv_dim])
        else:  # Projections: without in_proj_weight, the three separate weights are set
            assert w.q_proj_weight is not None and w.k_proj_weight is not None and w.v_proj_weight is not None
            w_q, w_k, w_v = w.q_proj_weight, w.k_proj_weight, w.v_proj_weight
        b = None if w.in_proj_bias is None else w.in_proj_bias.split([self.embed_dim, kv_dim, kv_dim])
        with torch.no_grad():
            self.q_weight = nn.Parameter(self._rows_q(w_q).clone())  # (H_l*D, E)
            self.k_weight = nn.Parameter(self._rows_kv(w_k).clone())  # (Hkv_l*D, kdim) | (Hkv*D, kdim)
            self.v_weight = nn.Parameter(self._rows_kv(w_v).clone())
            self.has_bias = b is not None
            self.q_bias = nn.Parameter(self._rows_q(b[0]).clone()) if b is not None else None
            self.k_bias = nn.Parameter(self._rows_kv(b[1]).clone()) if b is not None else None
            self.v_bias = nn.Parameter(self._rows_kv(b[2]).clone()) if b is not None else None
            self.out_weight = nn.Parameter(w.out_proj_weight[:, q0 * dim : q1 * dim].clone())  # (E, H_l*D)
            self.out_bias = nn.Parameter(w.out_proj_bias.clone()) if w.out_proj_bias is not None else None

    # ---- shards of full tensors ----
    def _rows_q(self, t: Tensor) -> Tensor:
        n = self.local_heads * self.head_dim
        return t[self.rank * n : (self.rank + 1) * n]

    def _rows_kv(self, t: Tensor) -> Tensor:
        if not self.kv_split:  # kept whole: several ranks read the same kv heads
            return t
        n = self.num_kv_heads // self.world * self.head_dim
        return t[self.rank * n : (self.rank + 1) * n]

    def _gather(self, t: Tensor, dim: int = 0) -> Tensor:
        every = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(every, t.detach().contiguous(), group=self.group)
        return torch.cat(every, dim=dim)

    def _full(self) -> dict[str, Tensor]:
        """Every parameter as one full tensor in torch's layout (collective: all ranks call it)."""
        q = self._gather(self.q_weight)
        k = self._gather(self.k_weight) if self.kv_split else self.k_weight.detach()
        v = self._gather(self.v_weight) if self.kv_split else self.v_weight.detach()
        full = {"in_proj_weight": torch.cat([q, k, v])} if self.packed else {}
        if not self.packed:
            full.update(q_proj_weight=q, k_proj_weight=k, v_proj_weight=v)
        if self.has_bias:
            assert self.q_bias is not None and self.k_bias is not None and self.v_bias is not None  # has_bias
            kb = self._gather(self.k_bias) if self.kv_split else self.k_bias.detach()
            vb = self._gather(self.v_bias) if self.kv_split else self.v_bias.detach()
            full["in_proj_bias"] = torch.cat([self._gather(self.q_bias), kb, vb])
        full["out_proj.weight"] = self._gather(self.out_weight, dim=1)
        if self.out_bias is not None:
            full["out_proj.bias"] = self.out_bias.detach()
        return full

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self._full().items():
            destination[prefix + name] = t.clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = list(self._full_names())
        for name in names:
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
        if any(prefix + n not in state_dict for n in names):
            return
        get = lambda n: state_dict[prefix + n]  # noqa: E731
        kv_dim = self.num_kv_heads * self.head_dim
        if self.packed:
            w_q, w_k, w_v = get("in_proj_weight").split([self.embed_dim, kv_dim, kv_dim])
        else:
            w_q, w_k, w_v = get("q_proj_weight"), get("k_proj_weight"), get("v_proj_weight")
        pieces = [
            (self.q_weight, self._rows_q(w_q)),
            (self.k_weight, self._rows_kv(w_k)),
            (self.v_weight, self._rows_kv(w_v)),
        ]
        if self.has_bias:
            b_q, b_k, b_v = get("in_proj_bias").split([self.embed_dim, kv_dim, kv_dim])
            pieces += [
                (self.q_bias, self._rows_q(b_q)),
                (self.k_bias, self._rows_kv(b_k)),
                (self.v_bias, self._rows_kv(b_v)),
            ]
        q0 = self.rank * self.local_heads * self.head_dim
        pieces.append((self.out_weight, get("out_proj.weight")[:, q0 : q0 + self.local_heads * self.head_dim]))
        if self.out_bias is not None:
            pieces.append((self.out_bias, get("out_proj.bias")))
        for param, value in pieces:
            if param.shape != value.shape:
                error_msgs.append(
                    f"tensor_parallel: shard of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}"
                )
                return
        with torch.no_grad():
            for param, value in pieces:
                param.copy_(value)
        own = set(names)
        for k in state_dict:
            rest = k[len(prefix) :]
            if k.startswith(prefix) and rest not in own and rest.split(".")[0] not in self._modules:
                unexpected_keys.append(k)

    def _full_names(self):
        yield from ("in_proj_weight",) if self.packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        if self.has_bias:
            yield "in_proj_bias"
        yield "out_proj.weight"
        if self.out_bias is not None:
            yield "out_proj.bias"

    # ---- forward ----
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As `MultiheadAttention.forward`, on full (replicated) inputs; returns full outputs and,
        with need_weights, full weights (averaged over all heads, or every head)."""
        from . import attend as backends
        from .masks import build_mask

        batched = check_inputs(
            query, key, value, embed_dim=self.embed_dim, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, param=self.q_weight,
        )  # fmt: skip
        shared = "qkv" if query is key and key is value else "kv" if key is value else None
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, q_len, _ = query.shape
        k_len = key.shape[1]
        heads, dim = self.local_heads, self.head_dim
        if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] == batch * self.num_heads:
            h0 = self.rank * heads  # this rank's heads of a per-head mask
            attn_mask = attn_mask.view(batch, self.num_heads, q_len, k_len)[:, h0 : h0 + heads].reshape(
                -1, q_len, k_len
            )
        mask = build_mask(
            attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, batch=batch, heads=heads,
            q_len=q_len, k_len=k_len, batched=True, device=query.device, window=self.window,
        )  # fmt: skip

        # replicated inputs: each rank's heads add a part of their gradient
        query = _CopyToRanks.apply(query, self.group)
        key = query if shared == "qkv" else _CopyToRanks.apply(key, self.group)
        value = key if shared is not None else _CopyToRanks.apply(value, self.group)
        w_k, w_v, b_k, b_v = self.k_weight, self.v_weight, self.k_bias, self.v_bias
        if not self.kv_split:  # whole on every rank: take the heads we read, sum gradients over ranks
            rows = slice(self.kv_range[0] * dim, self.kv_range[1] * dim)
            w_k, w_v = (_CopyToRanks.apply(t, self.group)[rows] for t in (w_k, w_v))
            if self.has_bias:
                b_k, b_v = (_CopyToRanks.apply(t, self.group)[rows] for t in (b_k, b_v))
        q = torch.nn.functional.linear(query, self.q_weight, self.q_bias)  # (B, L, H_l*D)
        k = torch.nn.functional.linear(key, w_k, b_k)  # (B, S, Hkv_l*D)
        v = torch.nn.functional.linear(value, w_v, b_v)
        q = q.unflatten(-1, (heads, dim)).transpose(1, 2)  # (B, H_l, L, D)
        k = k.unflatten(-1, (-1, dim)).transpose(1, 2)  # (B, Hkv_l, S, D)
        v = v.unflatten(-1, (-1, dim)).transpose(1, 2)
        kv_heads = k.shape[1]
        uniform = heads % kv_heads == 0 and self.kv_index == [i // (heads // kv_heads) for i in range(heads)]
        if not uniform:  # this rank's query heads straddle kv groups unevenly: one kv head per query head
            index = torch.tensor(self.kv_index, device=k.device)
            k, v = k[:, index], v[:, index]
        if self.rotary is not None:
            q = self.rotary(q, torch.arange(q_len, device=q.device), max_position=max(q_len - 1, 0))
            k = self.rotary(k, torch.arange(k_len, device=k.device), max_position=max(k_len - 1, 0))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, k.shape[1], 1, dim)], dim=2)  # (B, Hkv_l, S+1, D)
            v = torch.cat([v, v.new_zeros(batch, v.shape[1], 1, dim)], dim=2)
            mask = mask.pad_keys(1)
        chosen = backends.choose(q, k, v, mask, need_weights=need_weights, backend=self.backend)
        out, attn = chosen.attend(
            q, k, v, mask, scale=dim**-0.5, dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights, average_weights=False,
        )  # fmt: skip  # (B, H_l, L, D), (B, H_l, L, S) | None
        out = out.permute(2, 0, 1, 3).reshape(q_len, batch, heads * dim)  # (L, B, H_l*D), torch's layout
        out = _ReduceFromRanks.apply(torch.nn.functional.linear(out, self.out_weight), self.group)  # (L, B, E)
        if self.out_bias is not None:
            out = out + self.out_bias
        if attn is not None:
            if average_attn_weights:
                attn = _ReduceFromRanks.apply(attn.sum(1), self.group) / self.num_heads  # (B, L, S)
            else:
                attn = _GatherHeads.apply(attn, self.group, self.world, self.rank)  # (B, H, L, S)
        if not batched:
            return out.squeeze(1), attn.squeeze(0) if attn is not None else None
        if self.batch_first:
            out = out.transpose(0, 1).clone()  # (B, L, E) with (L, B, E) strides, not a view
        return out, attn


def _mesh_group(device_mesh) -> dist.ProcessGroup | None:
    if device_mesh is None or isinstance(device_mesh, dist.ProcessGroup):
        return device_mesh
    if getattr(device_mesh, "ndim", 1) != 1:
        raise ValueError(f"tensor_parallel needs a 1-D device mesh, got {device_mesh.ndim} dimensions")
    return device_mesh.get_group()


def tensor_parallel(module: MultiheadAttention, device_mesh=None) -> TensorParallel:
    """`module` with its heads sharded across `device_mesh` (a 1-D `DeviceMesh`; a process group or None
    for the default group also work): full activations in and out, one all-reduce per call,
    `state_dict()` in torch's layout. Every rank must call it with the same module weights."""
    return TensorParallel(module, device_mesh)
