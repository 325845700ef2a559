"""The blockwise backend: attention weights in O(B*L*S) memory, with a recomputing backward.

The work is cut into tiles sized for one core's cache (`multihead.hardware`: from the per-core L2,
never a socket-wide L3; enough rows to amortise the K/V slice a tile streams): a range of query rows
of one batch element (or, for short sequences, whole sequences of several). A tile's scores (heads, r, s) come from one batched
GEMM, become probabilities in place (one softmax pass), are written to the weights (their mean over
heads, or per head) and multiplied by V, then forgotten. Nothing of size (B, H, L, S) is ever held
when the weights are averaged, and q, k, v are read where the projection left them (no copies).

The backward (an autograd.Function) saves only q, k, v and the output, and recomputes each tile's
probabilities with the same GEMM and the same softmax as the forward: a tile holds whole rows, so no
log-sum-exp needs saving (the FlashAttention recompute idea in plain torch), and the recomputed
probabilities are the forward's to the bit in practice, which keeps delta = rowsum(dO * O) consistent
with them (a log-sum-exp rebuild differs in the last bit and costs up to 7x the float32 reference's
gradient error when a float mask is present). Training with `need_weights=True` holds O(B*L*S).

- Causal and window masks (the band) are never materialised: each tile reads only the keys its band
  can reach, and masks only the few columns the band cuts through (a cached triangle).
- Dropout regenerates its keep-mask per tile from a seed drawn from the global RNG, so
  `torch.manual_seed` reproduces a run and the backward sees the mask the forward used.
- A query row with no visible key gives a zero output row, zero weights and zero gradients.
- The backward is itself differentiable (double backward): with `create_graph=True` (grad mode on
  inside backward) it runs a differentiable tile-by-tile recompute instead of the in-place one.
- On CPU, large calls share their tiles among `torch.get_num_threads()` worker threads that each run
  torch single-threaded (see `PARALLEL_MIN_ELEMENTS`).

Notation: B batch, H query heads, Hkv key/value heads, G = H // Hkv heads per group, L query length,
S key length, D head dim; a tile covers batch elements [b0, b1) (nb of them), query rows [q0, q1)
(r rows) and keys [k_lo, k_hi) (s keys). In a tile, the r rows of the G query heads of one kv head
form one (r*G, D) matrix, so one GEMM per (batch element, kv head) serves the whole group.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import threading
from dataclasses import replace

import torch
from torch import Tensor

from .. import hardware
from ..masks import AttentionMask
from .reference import safe_softmax

name = "blockwise"
#: Its tiles read contiguous q, k, v, so it copies strided ones: the caller copies them before the
#: call instead (`functional`), which frees the projection's (L, B, E + 2*Hkv*D) output meanwhile.
contiguous_inputs = True

#: Override: bytes of scores the tiles in flight may hold together (shared by the workers). None: each
#: tile holds what one core's cache holds (`tile_budget_bytes`), never a socket-wide figure.
BLOCK_BYTES: int | None = None

#: Share the tiles of a CPU call among `torch.get_num_threads()` worker threads, each running torch
#: single-threaded, when the call has at least this many score elements (B*H*L*S) and two tiles per
#: worker. Independent single-threaded GEMMs are as fast as one two-threaded GEMM per op on these
#: shapes when the machine is idle, and much faster when it is busy: no op waits for a descheduled
#: partner thread. 0 disables.
PARALLEL_MIN_ELEMENTS: int = 2**22

Tile = tuple[int, int, int, int, int, int, int]  # index, b0, b1, q0, q1, k_lo, k_hi


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> list[str]:
    reasons = []
    if not q.is_floating_point():
        reasons.append(f"needs floating-point inputs, got {q.dtype}")
    if any(p is not None and p.requires_grad for p in (mask.key_padding, mask.dense)):
        reasons.append("a float mask that requires grad (no gradient to the mask)")
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
    block_rows: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """q: (B, H, L, D), k/v: (B, Hkv, S, D) -> out (B, H, L, D), weights (B, L, S) | (B, H, L, S) | None.

    `block_rows` overrides the query rows per tile (tests; with block_rows >= L one tile takes every
    batch element); by default tiles are sized so that the tiles in flight fit in `BLOCK_BYTES`.
    """
    plan = make_plan(q, k, mask, scale, dropout_p, need_weights, average_weights, block_rows)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _BlockwiseAttention.apply(q, k, v, plan)
    return _forward(q, k, v, plan)


def make_plan(
    q: Tensor,
    k: Tensor,
    mask: AttentionMask,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    average_weights: bool,
    block_rows: int | None = None,
    seed: int | None = None,
) -> _Plan:
    """The plan of a call (tiles, mask structure, dropout seed); `seed` None draws one from the
    global RNG. (Also used by the custom op in `blockwise_op`, which passes its own seed.)"""
    B, H, L, _ = q.shape
    S = k.shape[2]
    if block_rows is None:
        batches, rows = choose_tiles(B, H, L, S, q.element_size(), q.device, kv_heads=k.shape[1], head_dim=q.shape[3])
    elif block_rows < 1:
        raise ValueError(f"block_rows must be a positive int or None, got {block_rows!r}")
    else:
        batches, rows = (1, block_rows) if block_rows < L else (B, max(L, 1))
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item()) if dropout_p > 0.0 else 0
    return _Plan(mask, scale, float(dropout_p), need_weights, average_weights, int(rows), int(batches), seed)


# ---- tile sizing -----------------------------------------------------------------------------------
def tile_budget_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes of scores one tile may hold on `device` when it runs alone: `BLOCK_BYTES` when set, else
    what one core's cache holds (`multihead.hardware.tile_budget_bytes`: a few MiB, from the per-core
    L2, read once) or 64 MiB on a GPU. A call whose B*H*L*S scores fit is served by a single tile."""
    if BLOCK_BYTES is not None:
        return BLOCK_BYTES
    topology, kind = hardware.topology(), device if isinstance(device, str) else device.type
    known = _budgets.get(kind)
    if known is None or known[0] is not topology:  # computed once per machine reading and device kind
        known = _budgets[kind] = (topology, hardware.tile_budget_bytes(topology, kind))
    return known[1]


_budgets: dict[str, tuple[hardware.Topology, int]] = {}


#: A tile also reads its keys and values (2*Hkv*s*D elements): at long key lengths they, not the
#: scores, are what streams through the cache, so a tile takes at least as many rows as make its
#: scores as large as that K/V slice (with D=64, H=Hkv: 128 rows), up to this many bytes of scores.
KV_AMORTIZE_MAX_BYTES = 16 * 2**20


def choose_tiles(
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    itemsize: int,
    device: torch.device,
    *,
    kv_heads: int | None = None,
    head_dim: int | None = None,
) -> tuple[int, int]:
    """(batch elements, query rows) per tile. Each tile holds at most one core's tile budget of
    scores (a `BLOCK_BYTES` override is shared by the workers instead), or, given `kv_heads` and
    `head_dim`, the rows whose scores match the K/V slice the tile reads (see `KV_AMORTIZE_MAX_BYTES`);
    when workers share the call there are at least two tiles per worker where 16-row tiles allow it.
    Rows of one batch element while a whole sequence does not fit (at least 16 rows, evened out so
    the last tile is not tiny); else whole sequences of several."""
    workers = _parallel_share(batch * heads * q_len * k_len, device)
    budget = BLOCK_BYTES // workers if BLOCK_BYTES is not None else tile_budget_bytes(device)
    row_bytes = max(1, heads * k_len * max(itemsize, 4))  # one query row, every head
    rows = max(16, budget // row_bytes)
    if BLOCK_BYTES is None and kv_heads and head_dim:
        kv_rows = math.ceil(2 * kv_heads * head_dim / heads)  # rows * H * s = 2 * Hkv * s * D
        rows = max(rows, min(kv_rows, KV_AMORTIZE_MAX_BYTES // row_bytes))
    pieces = math.ceil(2 * workers / max(batch, 1))  # tiles per batch element that keep every worker busy
    if workers > 1 and pieces > 1:
        rows = min(rows, max(16, math.ceil(q_len / pieces)))
    if rows < q_len:
        return 1, math.ceil(q_len / math.ceil(q_len / rows))
    per_worker = batch if workers == 1 else max(1, batch // (2 * workers))  # whole sequences: two tiles per worker
    return max(1, min(batch, per_worker, budget // (row_bytes * max(q_len, 1)))), max(1, q_len)


def choose_block_rows(heads_total: int, q_len: int, k_len: int, itemsize: int, device: torch.device) -> int:
    """Query rows per tile for one batch element with `heads_total` heads (see `choose_tiles`)."""
    return choose_tiles(1, heads_total, q_len, k_len, itemsize, device)[1]


# ---- the plan: everything about a call that is not a tensor --------------------------------------
class _Plan:
    """The mask's structure read once (key range per tile, band, the rest as an additive part), and
    the tiling."""

    def __init__(
        self,
        mask: AttentionMask,
        scale: float,
        dropout_p: float,
        need_weights: bool,
        average: bool,
        rows: int,
        batches: int,
        seed: int,
    ) -> None:
        self.mask = mask
        self.scale = scale
        self.dropout_p = dropout_p
        self.keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        self.need_weights = need_weights
        self.average = average
        self.rows = rows
        self.batches = batches
        self.seed = seed
        self.offset = mask.offset
        self.left, self.right = mask.band_limits() if mask.has_band else (None, None)
        # everything but the band, added to the scores as a float (key padding, dense masks)
        self.rest = replace(mask, causal=False, window=None) if mask.has_band else mask
        self.has_rest = not self.rest.is_empty
        # can a row end up with no visible key? (then softmax gives NaN and needs a fix-up)
        self.may_empty = self.has_rest or self._band_may_empty()

    def _band_may_empty(self) -> bool:
        if self.left is None and self.right is None:
            return False
        m = self.mask
        left = self.left if self.left is not None else m.k_len
        right = self.right if self.right is not None else m.k_len
        # row 0 reaches no key, the last row starts past the keys, or the band is empty
        return self.offset + right < 0 or m.q_len - 1 + self.offset - left > m.k_len - 1 or left + right < 0

    def tiles(self, batch: int, q_len: int) -> list[Tile]:
        """(index, b0, b1, q0, q1, k_lo, k_hi): batch elements [b0, b1), query rows [q0, q1), keys
        [k_lo, k_hi). The index seeds the tile's dropout mask."""
        S = self.mask.k_len
        tiles: list[Tile] = []
        for b0 in range(0, batch, self.batches):
            for q0 in range(0, q_len, self.rows):
                q1 = min(q_len, q0 + self.rows)
                k_lo = 0 if self.left is None else min(S, max(0, q0 + self.offset - self.left))
                k_hi = S if self.right is None else max(0, min(S, q1 + self.offset + self.right))
                tiles.append((len(tiles), b0, min(batch, b0 + self.batches), q0, q1, k_lo, max(k_lo, k_hi)))
        return tiles

    def mask_scores(self, sc: Tensor, tile: Tile, groups: int) -> None:
        """In place on a tile's scores sc (nb*Hkv, r*G, s): -inf where the band hides a key (only the
        columns it cuts through), plus the rest of the mask."""
        _, b0, b1, q0, q1, k_lo, k_hi = tile
        r, s = q1 - q0, k_hi - k_lo
        sc4 = sc.view(-1, r, groups, s)  # (nb*Hkv, r, G, s)
        if self.right is not None:  # keys past row q0's reach are hidden for some rows
            first = q0 + self.offset + self.right + 1  # the first key row q0 cannot see
            c0 = max(k_lo, first)
            if c0 < k_hi:  # hidden where (c - first) >= (i - q0): an upper triangle
                hide = _triangle(r, k_hi - c0, first - c0, upper=True, device=sc.device)
                sc4[..., c0 - k_lo :].masked_fill_(hide[:, None, :], float("-inf"))
        if self.left is not None:  # keys before row q1-1's reach are hidden for some rows
            c1 = min(k_hi, q1 - 1 + self.offset - self.left)
            if c1 > k_lo:  # hidden where c < i + offset - left: a lower triangle
                hide = _triangle(r, c1 - k_lo, q0 + self.offset - self.left - k_lo - 1, upper=False, device=sc.device)
                sc4[..., : c1 - k_lo].masked_fill_(hide[:, None, :], float("-inf"))
        if self.has_rest:
            bias = self.rest.additive_rows(q0, q1, sc.dtype, sc.device)
            assert bias is not None  # has_rest: the rest of the mask hides something
            bias = bias[..., k_lo:k_hi]  # (1|B, 1|H, r, s)
            if bias.shape[0] > 1:
                bias = bias[b0:b1]
            bias = bias.unsqueeze(3) if bias.shape[1] == 1 else bias.unflatten(1, (-1, groups)).transpose(2, 3)
            sc.view(b1 - b0, -1, r, groups, s).add_(bias)  # (nb, Hkv, r, G, s) += (1|nb, 1|Hkv, r, 1|G, s)

    def keep(self, index: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Dropout's keep-mask for tile `index`, bool `shape`, the same every time it is asked for."""
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed + index * 0x9E3779B97F4A7C15) % 2**63)
        return torch.rand(shape, generator=gen, device=device) >= self.dropout_p


def _make_triangle(rows: int, cols: int, diagonal: int, upper: bool, device: torch.device) -> Tensor:
    full = torch.ones(rows, cols, dtype=torch.bool, device=device)
    return full.triu_(diagonal) if upper else full.tril_(diagonal)


_cached_triangle = functools.lru_cache(maxsize=32)(_make_triangle)


def _triangle(rows: int, cols: int, diagonal: int, *, upper: bool, device: torch.device) -> Tensor:
    """Bool (rows, cols): True where col - row >= diagonal (upper) or col - row <= diagonal (lower).
    Cached in eager mode: every full tile of a causal or window mask cuts the same triangle."""
    make = _make_triangle if torch.compiler.is_compiling() else _cached_triangle
    return make(rows, cols, diagonal, upper, device)


# ---- running tiles: inline, or shared by a few single-threaded workers -----------------------------
class _Workers:
    """Daemon threads, each with torch's intra-op threads set to 1 (thread-local in OpenMP and MKL)."""

    def __init__(self, n: int) -> None:
        self.size = n
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        ready = threading.Barrier(n + 1)
        saved = torch.get_num_threads()
        for _ in range(n):
            threading.Thread(target=self._loop, args=(ready,), daemon=True, name="multihead-blockwise").start()
        ready.wait()
        # torch.set_num_threads(1) in the workers also set the process default that threads starting
        # later inherit: give it back (this thread's own setting never changed)
        torch.set_num_threads(saved)

    def _loop(self, ready) -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # this thread's lazy init, while the process default is 1
        ready.wait()
        while True:
            task = self.tasks.get()
            task()
            del task  # holding it would keep the call's tensors (the weights...) alive until the next call

    def run(self, groups: list[list[Tile]], work, make_scratch, n: int, inference: bool) -> None:
        """n of the workers claim groups in turn and run work(g, tile, scratch) for each tile of group
        g, in order, with one scratch per worker. Exceptions are re-raised here."""
        done = threading.Semaphore(0)
        errors: list = []
        claim, lock = iter(range(len(groups))), threading.Lock()

        def share() -> None:
            try:
                with torch.inference_mode(inference), torch.no_grad():
                    scratch = make_scratch()
                    while not errors:
                        with lock:
                            g = next(claim, None)
                        if g is None:
                            break
                        for tile in groups[g]:
                            work(g, tile, scratch)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                errors.append(err)
            finally:
                done.release()

        for _ in range(n):
            self.tasks.put(share)
        for _ in range(n):
            done.acquire()
        if errors:
            raise errors[0]


_workers: _Workers | None = None
_workers_lock = threading.Lock()


def _forget_workers() -> None:  # threads do not survive fork()
    global _workers, _workers_lock
    _workers = None
    _workers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _parallel_share(elements: int, device: torch.device) -> int:
    """How many workers a call of `elements` score elements uses: torch's intra-op thread count for a
    large CPU call in eager mode, else 1 (inline). The workers replace torch's intra-op threads for the
    call (each runs torch single-threaded, the caller waits): never more busy threads than that count."""
    n = torch.get_num_threads()
    big = 0 < PARALLEL_MIN_ELEMENTS <= elements
    return n if (big and n > 1 and device.type == "cpu" and not torch.compiler.is_compiling()) else 1


def _cost(tile: Tile) -> int:
    _, b0, b1, q0, q1, k_lo, k_hi = tile
    return (b1 - b0) * (q1 - q0) * max(1, k_hi - k_lo)


def _greedy(groups: list[list[Tile]], n: int) -> tuple[list[list[Tile]], list[int]]:
    """Groups of tiles into n shares, largest first, each to the least loaded one."""
    shares: list[list[Tile]] = [[] for _ in range(n)]
    loads = [0] * n
    for group in sorted(groups, key=lambda g: sum(map(_cost, g)), reverse=True):
        i = loads.index(min(loads))
        shares[i] += group
        loads[i] += sum(map(_cost, group))
    return shares, loads


def _schedule(tiles: list[Tile], workers: int, *, by_batch: bool = False) -> tuple[list[list[Tile]], bool]:
    """The groups of tiles workers claim in turn (each group's tiles run in order by one thread), and
    whether the groups are whole batch elements.

    Forward (tiles write disjoint rows): one group per tile, largest first, claimed dynamically, so a
    worker the OS delays holds up only its current tile. Backward (`by_batch`, tiles of one batch
    element sum into the same dK/dV rows): whole batch elements when there are enough to keep the
    workers balanced (they then share dK/dV), else a fixed split into `workers` groups that each sum
    into their own dK/dV, added up in group order. Either way which thread runs a group changes no
    sum: results do not depend on timing."""
    if workers == 1 or len(tiles) < 2 * workers:
        return [tiles], True
    if not by_batch:
        return [[t] for t in sorted(tiles, key=_cost, reverse=True)], False
    per_batch: dict[int, list[Tile]] = {}
    for tile in tiles:
        per_batch.setdefault(tile[1], []).append(tile)
    if len(per_batch) >= workers:
        loads = _greedy(list(per_batch.values()), workers)[1]
        if max(loads) <= 1.15 * sum(loads) / workers:
            return sorted(per_batch.values(), key=lambda g: sum(map(_cost, g)), reverse=True), True
    return _greedy([[t] for t in tiles], workers)[0], False


def _run_groups(groups: list[list[Tile]], workers: int, work, make_scratch) -> None:
    """work(g, tile, scratch) for each tile of each group g: inline (one scratch) for one worker, else
    shared by `workers` pool threads."""
    global _workers
    if workers == 1 or len(groups) == 1:
        scratch = make_scratch()
        for g, group in enumerate(groups):
            for tile in group:
                work(g, tile, scratch)
        return
    with _workers_lock:
        if _workers is None or _workers.size < workers:
            _workers = _Workers(workers)  # a smaller pool's threads stay idle
        pool = _workers
    pool.run(groups, work, make_scratch, workers, torch.is_inference_mode_enabled())


# ---- operands of a tile, views where the layout allows -----------------------------------------------
# The operands are made contiguous once per call (K also transposed): a tile's GEMMs then read plain
# batched matrices, which the BLAS runs up to 1.7x faster than the projection's strided views.
def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _transposed(t: Tensor) -> Tensor:
    """(B, Hkv, S, D) -> contiguous (B, Hkv, D, S). From the projection's strided view, a copy to
    contiguous first: transposing contiguous rows is about 3x faster than gathering the strided ones."""
    return _contiguous(t).transpose(2, 3).contiguous()


def _rows(t: Tensor, b0: int, b1: int, q0: int, q1: int, hkv: int) -> Tensor:
    """Contiguous (B, H, L, D) -> the tile's (nb*Hkv, r*G, D): a view when G == 1, else a small copy
    (the rows of a group's heads interleaved)."""
    B, H, L, D = t.shape
    block = t[b0:b1, :, q0:q1]  # (nb, H, r, D)
    if H == hkv:
        return block.flatten(0, 1)  # a view: nb > 1 only with whole sequences
    return block.unflatten(1, (hkv, H // hkv)).transpose(2, 3).reshape((b1 - b0) * hkv, (q1 - q0) * (H // hkv), D)


def _keys(t: Tensor, b0: int, b1: int, k_lo: int, k_hi: int) -> Tensor:
    """Contiguous (B, Hkv, S, D) -> the tile's (nb*Hkv, s, D), a view."""
    return t[b0:b1, :, k_lo:k_hi].flatten(0, 1)


def _keys_t(t: Tensor, b0: int, b1: int, k_lo: int, k_hi: int) -> Tensor:
    """Contiguous (B, Hkv, D, S) -> the tile's (nb*Hkv, D, s), a view."""
    return t[b0:b1, :, :, k_lo:k_hi].flatten(0, 1)


def _scores_to_probs(plan: _Plan, sc: Tensor, tile: Tile, groups: int) -> None:
    """In place on a tile's raw scores sc (nb*Hkv, r*G, s): mask, softmax, zero rows that see no key.
    The backward calls this too, after the same GEMM on the same inputs: it gets the forward's
    probabilities (bit for bit in practice), so rowsum(dO * O) from the forward's output matches them."""
    plan.mask_scores(sc, tile, groups)
    empty = torch.isneginf(sc.amax(-1, keepdim=True)) if plan.may_empty else None  # (nb*Hkv, r*G, 1)
    torch.ops.aten._softmax.out(sc, -1, False, out=sc)  # in place: one pass, row by row
    if empty is not None:
        sc.masked_fill_(empty, 0.0)  # rows with no visible key: NaN -> 0


def _scratch_sizes(plan: _Plan, B: int, H: int, L: int, S: int, D: int) -> tuple[int, int]:
    """Elements of the largest tile's scores, and of its (rows, D) result."""
    nb, r = min(plan.batches, B), min(plan.rows, L)
    return nb * H * r * S, nb * H * r * D


# ---- the in-place forward ------------------------------------------------------------------------
def _forward(q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """Returns out (B, H, L, D) and the weights (or None)."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    out = q.new_empty(L, B, Hkv, G, D)  # returned as (B, H, L, D), a view of (L, B, H, D): torch's layout
    weights = None
    if plan.need_weights:
        # each tile writes its rows whole, zeros where its band hides the keys: a first touch of
        # fresh memory (its page faults) shared by the workers, instead of a zero fill up front
        weights = q.new_empty((B, L, S) if plan.average else (B, H, L, S))
    n_scores, n_rows = _scratch_sizes(plan, B, H, L, S, D)
    q, kt, v = _contiguous(q), _transposed(k), _contiguous(v)  # (B, H, L, D), (B, Hkv, D, S), (B, Hkv, S, D)

    def make_scratch():
        return q.new_empty(n_scores), q.new_empty(n_rows)  # scores then probabilities; P @ V

    def work(_: int, tile: Tile, scratch) -> None:
        index, b0, b1, q0, q1, k_lo, k_hi = tile
        nb, r, s = b1 - b0, q1 - q0, k_hi - k_lo
        if s == 0:  # no key visible from any row of the tile
            out[q0:q1, b0:b1].zero_()
            if weights is not None:
                _weight_rows(weights, plan.average, b0, b1, q0, q1).zero_()
            return
        sc = scratch[0][: nb * H * r * s].view(nb * Hkv, r * G, s)
        qb = _rows(q, b0, b1, q0, q1, Hkv)
        torch.baddbmm(sc, qb, _keys_t(kt, b0, b1, k_lo, k_hi), beta=0, alpha=plan.scale, out=sc)
        _scores_to_probs(plan, sc, tile, G)
        if plan.dropout_p > 0.0:
            sc.mul_(plan.keep(index, sc.shape, sc.device)).mul_(plan.keep_scale)
        if weights is not None:
            _write_weights(weights, sc, plan.average, tile, Hkv, G)
        pv = scratch[1][: nb * H * r * D].view(nb * Hkv, r * G, D)
        torch.bmm(sc, _keys(v, b0, b1, k_lo, k_hi), out=pv)
        out[q0:q1, b0:b1].copy_(pv.view(nb, Hkv, r, G, D).permute(2, 0, 1, 3, 4))

    workers = _parallel_share(B * H * L * S, q.device)
    _run_groups(_schedule(plan.tiles(B, L), workers)[0], workers, work, make_scratch)
    return out.view(L, B, H, D).permute(1, 2, 0, 3), weights


def _weight_rows(weights: Tensor, average: bool, b0: int, b1: int, q0: int, q1: int) -> Tensor:
    """The (nb, r, S) or (nb, H, r, S) rows of the weights a tile owns."""
    return weights[b0:b1, q0:q1] if average else weights[b0:b1, :, q0:q1]


def _write_weights(weights: Tensor, p: Tensor, average: bool, tile: Tile, Hkv: int, G: int) -> None:
    """Write a tile's probabilities p (nb*Hkv, r*G, s) into the weights: their mean over heads
    (B, L, S) or per head (B, H, L, S); zeros for the keys outside the tile's [k_lo, k_hi)."""
    _, b0, b1, q0, q1, k_lo, k_hi = tile
    nb, r, s = b1 - b0, q1 - q0, k_hi - k_lo
    rows = _weight_rows(weights, average, b0, b1, q0, q1)
    rows[..., :k_lo].zero_()
    rows[..., k_hi:].zero_()
    if not average:
        dst = weights[b0:b1, :, q0:q1, k_lo:k_hi].unflatten(1, (Hkv, G))
        dst.copy_(p.view(nb, Hkv, r, G, s).transpose(2, 3))
    elif G == 1:
        torch.mean(p.view(nb, Hkv, r, s), dim=1, out=weights[b0:b1, q0:q1, k_lo:k_hi])
    else:
        torch.mean(p.view(nb, Hkv, r, G, s), dim=(1, 3), out=weights[b0:b1, q0:q1, k_lo:k_hi])


# ---- the in-place backward -----------------------------------------------------------------------
def _backward_fast(q, k, v, out, d_out, d_weights, plan: _Plan):
    """In-place tile-by-tile backward: each tile's probabilities P are recomputed exactly as the
    forward made them (same GEMM, same softmax), then dV += P^T dO, dS = P * (dO V^T - delta),
    dQ = dS K, dK += dS^T Q (times the scale), with delta = rowsum(P * dP), which is rowsum(dO * O)
    when the weights get no gradient. Workers that own whole batch elements share dK and dV; else
    each sums into its own, added up at the end (see `_schedule`)."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    neg_delta = None  # -delta, (B, H, L, 1), when it does not depend on the weights' gradient
    if d_weights is None:
        neg_delta = (d_out * out).sum(-1, keepdim=True).neg_()
    dq = q.new_empty(B, H, L, D)
    n_scores, n_rows = _scratch_sizes(plan, B, H, L, S, D)
    q, k, d_out = _contiguous(q), _contiguous(k), _contiguous(d_out)  # (B, H, L, D), (B, Hkv, S, D), (B, H, L, D)
    kt, vt = _transposed(k), _transposed(v)  # (B, Hkv, D, S)
    plain = d_weights is None and plan.dropout_p == 0.0  # the common case
    workers = _parallel_share(B * H * L * S, q.device)
    groups, whole_batches = _schedule(plan.tiles(B, L), workers, by_batch=True)
    # groups of whole batch elements share dK and dV; others sum into their own, added up after
    sums = [(q.new_zeros(B, Hkv, S, D), q.new_zeros(B, Hkv, S, D)) for _ in range(1 if whole_batches else len(groups))]

    def make_scratch():
        return (
            q.new_empty(n_scores),  # P
            q.new_empty(n_scores),  # dP, then dS
            None if plain else q.new_empty(n_scores),
            q.new_empty(n_rows) if G > 1 else None,  # a tile's dQ, to reorder
        )

    def work(g: int, tile: Tile, scratch) -> None:
        index, b0, b1, q0, q1, k_lo, k_hi = tile
        buf, dp_buf, extra, dq_buf = scratch
        dk, dv = sums[0 if whole_batches else g]
        nb, r, s = b1 - b0, q1 - q0, k_hi - k_lo
        if s == 0:
            dq[b0:b1, :, q0:q1].zero_()
            return
        n = nb * H * r * s
        qb, dob = _rows(q, b0, b1, q0, q1, Hkv), _rows(d_out, b0, b1, q0, q1, Hkv)  # (nb*Hkv, r*G, D)
        kb, ktb, vtb = _keys(k, b0, b1, k_lo, k_hi), _keys_t(kt, b0, b1, k_lo, k_hi), _keys_t(vt, b0, b1, k_lo, k_hi)
        dkb = dk[b0:b1, :, k_lo:k_hi].view(nb * Hkv, s, D)  # views of this worker's sums
        dvb = dv[b0:b1, :, k_lo:k_hi].view(nb * Hkv, s, D)
        p = buf[:n].view(nb * Hkv, r * G, s)
        torch.baddbmm(p, qb, ktb, beta=0, alpha=plan.scale, out=p)
        _scores_to_probs(plan, p, tile, G)  # the forward's P
        dp = dp_buf[:n].view(nb * Hkv, r * G, s)
        if plain:  # dS = P * (dO @ V^T - delta), delta as the GEMM's initial value
            assert neg_delta is not None  # plain: the weights get no gradient
            torch.baddbmm(_rows(neg_delta, b0, b1, q0, q1, Hkv), dob, vtb, out=dp)
            dvb.baddbmm_(p.transpose(1, 2), dob)
            dp.mul_(p)
        else:
            torch.bmm(dob, vtb, out=dp)  # dL/d(dropped P), from the output
            if d_weights is not None:  # ... and from the weights
                dp5 = dp.view(nb, Hkv, r, G, s)
                if plan.average:
                    dp5.add_(d_weights[b0:b1, None, q0:q1, None, k_lo:k_hi], alpha=1.0 / H)
                else:
                    dp5.add_(d_weights[b0:b1, :, q0:q1, k_lo:k_hi].unflatten(1, (Hkv, G)).transpose(2, 3))
            keep = plan.keep(index, p.shape, p.device) if plan.dropout_p > 0.0 else None
            pd = p if keep is None else torch.mul(p, keep, out=extra[:n].view_as(p)).mul_(plan.keep_scale)
            dvb.baddbmm_(pd.transpose(1, 2), dob)
            if keep is not None:
                dp.mul_(keep).mul_(plan.keep_scale)  # dL/dP
            if neg_delta is None:  # delta = rowsum(P * dP)
                delta = torch.mul(p, dp, out=extra[:n].view_as(p)).sum(-1, keepdim=True)
                dp.sub_(delta).mul_(p)
            else:
                dp.add_(_rows(neg_delta, b0, b1, q0, q1, Hkv)).mul_(p)
        ds = dp  # dL/dS, S = scale * q @ k^T
        if G == 1:  # straight into dq: a (nb*H, r, D) view of (B, H, L, D)
            dqb = dq[b0:b1, :, q0:q1].view(nb * H, r, D)
            torch.baddbmm(dqb, ds, kb, beta=0, alpha=plan.scale, out=dqb)
        else:
            dqb = dq_buf[: nb * H * r * D].view(nb * Hkv, r * G, D)  # the group's heads interleaved by row
            torch.baddbmm(dqb, ds, kb, beta=0, alpha=plan.scale, out=dqb)
            dq[b0:b1, :, q0:q1].unflatten(1, (Hkv, G)).copy_(dqb.view(nb, Hkv, r, G, D).transpose(2, 3))
        dkb.baddbmm_(ds.transpose(1, 2), qb, alpha=plan.scale)

    _run_groups(groups, workers, work, make_scratch)
    dk, dv = sums[0]
    for other_dk, other_dv in sums[1:]:
        dk.add_(other_dk)
        dv.add_(other_dv)
    return dq, dk, dv


# ---- the differentiable backward (create_graph=True) ---------------------------------------------
def _backward_differentiable(q, k, v, d_out, d_weights, plan: _Plan):
    """The same gradients as `_backward_fast`, in out-of-place ops autograd can differentiate again;
    probabilities are recomputed per tile by a (differentiable) safe softmax over the tile's keys."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for index, b0, b1, q0, q1, k_lo, k_hi in plan.tiles(B, L):
        nb, r, s = b1 - b0, q1 - q0, k_hi - k_lo
        if s == 0:
            continue
        qb = q[b0:b1, :, q0:q1].unflatten(1, (Hkv, G))  # (nb, Hkv, G, r, D)
        kb = k[b0:b1, :, None, k_lo:k_hi]  # (nb, Hkv, 1, s, D)
        vb = v[b0:b1, :, None, k_lo:k_hi]
        dob = d_out[b0:b1, :, q0:q1].unflatten(1, (Hkv, G))  # (nb, Hkv, G, r, D)
        scores = (qb @ kb.transpose(-1, -2)) * plan.scale  # (nb, Hkv, G, r, s)
        bias = plan.mask.additive_rows(q0, q1, scores.dtype, scores.device)  # (1|B, 1|H, r, S)
        if bias is not None:
            bias = bias[..., k_lo:k_hi] if bias.shape[0] == 1 else bias[b0:b1, ..., k_lo:k_hi]
            scores = scores + (bias.unsqueeze(1) if bias.shape[1] == 1 else bias.unflatten(1, (Hkv, G)))
        p = safe_softmax(scores)
        d_pd = dob @ vb.transpose(-1, -2)  # (nb, Hkv, G, r, s)
        if d_weights is not None:
            if plan.average:
                d_pd = d_pd + d_weights[b0:b1, None, None, q0:q1, k_lo:k_hi] / H
            else:
                d_pd = d_pd + d_weights[b0:b1, :, q0:q1, k_lo:k_hi].unflatten(1, (Hkv, G))
        if plan.dropout_p > 0.0:
            keep = plan.keep(index, (nb * Hkv, r * G, s), q.device).view(nb, Hkv, r, G, s).transpose(2, 3)
            pd = p * keep * plan.keep_scale
            dp = d_pd * keep * plan.keep_scale
        else:
            pd, dp = p, d_pd
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        batches = (b0, B - b1)
        dq = dq + _pad(((ds @ kb) * plan.scale).flatten(1, 2), batches, (q0, L - q1))  # (B, H, L, D)
        dk = dk + _pad(((ds.transpose(-1, -2) @ qb) * plan.scale).sum(2), batches, (k_lo, S - k_hi))
        dv = dv + _pad((pd.transpose(-1, -2) @ dob).sum(2), batches, (k_lo, S - k_hi))
    return dq, dk, dv


def _pad(t: Tensor, batches: tuple[int, int], rows: tuple[int, int]) -> Tensor:
    """Zero-pad a tile's (nb, heads, rows, D) gradient to (B, heads, L or S, D), differentiably."""
    return torch.nn.functional.pad(t, (0, 0, *rows, 0, 0, *batches))


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan):
        out, weights = _forward(q, k, v, plan)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out)
        ctx.set_materialize_grads(False)
        return out, weights

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_weights: Tensor | None):
        q, k, v, out = ctx.saved_tensors
        plan = ctx.plan
        if d_out is None and d_weights is None:
            return None, None, None, None
        if d_out is None:
            d_out = torch.zeros_like(out)
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            dq, dk, dv = _backward_differentiable(q, k, v, d_out, d_weights, plan)
        else:
            dq, dk, dv = _backward_fast(q, k, v, out, d_out, d_weights, plan)
        return dq, dk, dv, None
