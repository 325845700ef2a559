"""`KVCache`: keys and values of earlier decoding steps, in static buffers.

One cache per attention layer. Each step the layer projects its new tokens, rotates them at
`cache.positions(L)`, and calls `cache.update(k, v)`, which writes them at each sequence's current
length, advances the lengths, and returns the buffers with a mask of what each new query may see.
Under `torch.compile` the returned shapes are static (the whole buffers) and `update` has no
Python-side branching on values, so `torch.compile(fullgraph=True)` captures a decode step once (one
graph for prefill, one for decode). In eager mode `update` returns the buffers only up to the longest
sequence (views, no copy), so attention costs what has been cached, not `max_len`.

Masking (bottom-right causal, as flash-attn with a cache): query t of sequence b sits at position
p = lengths_before[b] + t and sees key j only if j <= p (and, with window (left, right), j >= p - left;
a cache has no future keys, so right is irrelevant). Since p < lengths_after[b], stale keys past a
sequence's length are always hidden.

Sequences of different lengths: prefill the prompts right-padded to a common length L (every
sequence writes L keys; a real token only sees earlier real tokens, so its outputs are exact), then
`cache.rewind(prompt_lengths)`: each sequence continues from its own length, and later writes
overwrite the padding. Take each sequence's next-token logits at index prompt_lengths[b] - 1.

Overflow: a Python-side counter (`bound`, an upper bound on max(lengths)) is checked and advanced by
every eager `update`, so an overflow is a `ValueError` before anything is written, with no device
sync. Inside `torch.compile` the counter is not read (Dynamo would specialise and recompile on it):
a compiled step sets it to None ("unknown"), and the next eager call reads the lengths once (one
sync) to restore it. A compiled caller must keep within `max_len` itself (`check_room(n)` before a
compiled loop of n tokens); an out-of-range write there is an indexing error (CPU) or a device-side
assert (GPU), never a silent one.

Use it under `torch.no_grad()` or `torch.inference_mode()`: the buffers are written in place.

Notation: B batch, Hkv key/value heads, L new tokens, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import attend
from .masks import AttentionMask

__all__ = ["KVCache"]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class KVCache(nn.Module):
    """Static key/value buffers for incremental decoding, one per attention layer.

    Args:
        batch_size: B, sequences decoded together.
        max_len: capacity in tokens per sequence (prompt + generated).
        num_kv_heads: Hkv, the layer's key/value heads (`num_kv_heads`, or `num_heads` without GQA).
        head_dim: D = embed_dim // num_heads.
        device, dtype: of the buffers (dtype defaults to torch's default dtype); must match the
            keys/values the layer produces.

    Buffers (non-persistent: not in any state_dict): `k`, `v` (B, Hkv, max_len, D) and `lengths` (B,)
    int64, the number of tokens cached per sequence.
    """

    k: Tensor
    v: Tensor
    lengths: Tensor
    _cols: Tensor
    _rows: Tensor

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_len = _positive_int("max_len", max_len)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_cols", torch.arange(max_len, device=device), persistent=False)  # (max_len,)
        self.register_buffer("_rows", torch.arange(batch_size, device=device)[:, None], persistent=False)  # (B, 1)
        self.bound: int | None = 0  # upper bound on max(lengths) kept by eager updates; None: unknown
        self._uniform = True  # all sequences have the same length (kept through update; eager-only use)

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, max_len={self.max_len}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.k.dtype}"
        )

    # ---- bookkeeping (eager) -----------------------------------------------------------------
    def reset(self) -> None:
        """Empty the cache for a new batch of sequences (zeroes the buffers)."""
        self.k.zero_()
        self.v.zero_()
        self.lengths.zero_()
        self.bound = 0
        self._uniform = True

    def rewind(self, lengths: Tensor | Sequence[int]) -> None:
        """Set each sequence's length back to `lengths[b]` (<= its current length): keys past it are
        hidden and overwritten by later writes. After a right-padded prefill, pass the prompt
        lengths; also rolls back rejected tokens (speculative decoding). Reads the lengths (one sync)."""
        new = torch.as_tensor(lengths, dtype=torch.long).to(self.lengths.device)
        if new.shape != (self.batch_size,):
            raise ValueError(f"lengths must have shape (batch_size,) = ({self.batch_size},), got {tuple(new.shape)}")
        if bool((new < 0).any()) or bool((new > self.lengths).any()):
            raise ValueError(
                f"lengths must be between 0 and the current lengths {self.lengths.tolist()}, got {new.tolist()}"
            )
        self.lengths.copy_(new)
        low, high = (int(n) for n in new.aminmax())
        self.bound = high
        self._uniform = low == high

    def _bound(self) -> int:
        """The Python-side bound, restored from the lengths (one sync) after compiled steps."""
        if self.bound is None:
            self.bound = int(self.lengths.max())
        return self.bound

    def check_room(self, n: int) -> None:
        """Raise a ValueError unless `n` more tokens per sequence fit (by the Python-side counter)."""
        if self._bound() + n > self.max_len:
            raise ValueError(
                f"KVCache overflow: {n} new token(s) on top of up to {self.bound} cached exceed max_len={self.max_len}; "
                f"build the cache with a larger max_len, or reset() it"
            )

    def common_length(self) -> int | None:
        """The length every sequence has, when the Python side knows it (eager mode, all sequences
        of the same length): the first position of the next tokens, as an int. None otherwise."""
        if not self._uniform or torch.compiler.is_compiling():
            return None
        return self._bound()

    # ---- per step (compile-friendly) ---------------------------------------------------------
    def positions(self, length: int) -> Tensor:
        """(B, L) absolute positions of the next `length` tokens of each sequence."""
        if not 0 < length <= self.max_len:
            raise ValueError(f"length must be between 1 and max_len={self.max_len}, got {length}")
        return self.lengths[:, None] + self._cols[:length]  # (B, L)

    def update(
        self, k_new: Tensor, v_new: Tensor, window: tuple[int | None, int | None] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append k_new, v_new (B, Hkv, L, D) at each sequence's length and advance the lengths.

        Returns (k, v, hidden): the buffers (B, Hkv, S, D) and a bool mask (B, 1, L, S), True where
        query t of sequence b may not see key j: unless j <= lengths_before[b] + t (and
        j >= lengths_before[b] + t - left with `window`).

        Under torch.compile, S = max_len (static shapes) and hidden is always a tensor. In eager
        mode, S = `bound`, the longest sequence so far (views of the buffers, no copy), and hidden
        is None when it would hide nothing (one new token per sequence, all sequences of the same
        length, no window cutting in), so attention runs unmasked.
        """
        k_buf, v_buf, lengths, cols = self.k, self.v, self.lengths, self._cols  # one lookup each
        length = k_new.shape[2] if k_new.dim() == 4 else 0
        expected = (self.batch_size, self.num_kv_heads, length, self.head_dim)
        if length == 0 or k_new.shape != expected or v_new.shape != k_new.shape:
            self._explain_shapes(k_new, v_new)
        if k_new.dtype != k_buf.dtype or v_new.dtype != k_buf.dtype or k_new.device != k_buf.device:
            self._explain_dtypes(k_new, v_new)
        start = None  # where every sequence writes, when the Python side knows it (eager, equal lengths)
        if torch.compiler.is_compiling():
            self.bound = None  # a write only: no guard, no recompile; the next eager call re-reads
            keys = self.max_len
            unmasked = False
        else:
            before = self._bound()  # with equal lengths, the lengths themselves
            keys = before + length
            if keys > self.max_len:
                self.check_room(length)  # raises, saying so
            object.__setattr__(self, "bound", keys)  # a plain int: nn.Module.__setattr__ costs a decode step
            start = before if self._uniform else None
            left = None if window is None else window[0]
            unmasked = length == 1 and self._uniform and (left is None or left >= keys - 1)
        pos = None if start is not None and unmasked else lengths[:, None] + cols[:length]  # (B, L)
        if start is not None:  # a slice write: no index tensors (a decode step notices)
            k_buf[:, :, start:keys].copy_(k_new)
            v_buf[:, :, start:keys].copy_(v_new)
        else:  # index_put_ (not scatter_): inductor writes it in place into the buffer, with no copy back
            k_buf[self._rows, :, pos] = k_new.transpose(1, 2)  # indexed (B, L, Hkv, D)
            v_buf[self._rows, :, pos] = v_new.transpose(1, 2)
        lengths.add_(length)
        if keys < self.max_len:
            k_buf, v_buf, cols = k_buf[:, :, :keys], v_buf[:, :, :keys], cols[:keys]  # (B, Hkv, S, D), (S,)
        if unmasked:
            return k_buf, v_buf, None
        assert pos is not None  # computed unless unmasked
        return k_buf, v_buf, _hidden(pos, cols, None if window is None else window[0])  # (B, 1, L, S)

    def attend(self, q: Tensor, *, scale: float, window: tuple[int | None, int | None] | None = None) -> Tensor:
        """q (B, H, L, D), the queries of the tokens the last `update` wrote, attended against
        everything cached, with no weights or dropout: (B, H, L, D).

        For compiled inference on the CPU, where `update` returns the whole buffers (static shapes)
        and attention would read all `max_len` keys every step: this is one opaque op
        (`multihead::cached_attention`) that reads the lengths and attends only the keys cached so
        far, as an eager step does. (On a GPU reading the lengths would stall the stream: compiled
        steps there attend the whole buffers, masked.)"""
        left = None if window is None else window[0]
        return torch.ops.multihead.cached_attention(q, self.k, self.v, self.lengths, left, float(scale))

    def _explain_shapes(self, k_new: Tensor, v_new: Tensor) -> None:
        """Raise the ValueError that says what is wrong with the shapes."""
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be (B, Hkv, L, D), got shape {tuple(t.shape)}")
            batch, heads, length, dim = t.shape
            if batch != self.batch_size:
                raise ValueError(f"{name} has batch size {batch}, but the cache holds batch_size={self.batch_size}")
            if heads != self.num_kv_heads:
                raise ValueError(
                    f"{name} has {heads} key/value heads, but the cache holds num_kv_heads={self.num_kv_heads}"
                )
            if dim != self.head_dim:
                raise ValueError(f"{name} has head dim {dim}, but the cache holds head_dim={self.head_dim}")
            if not 0 < length <= self.max_len:
                raise ValueError(f"{name} has {length} new tokens; expected between 1 and max_len={self.max_len}")
        raise ValueError(f"k_new and v_new must have the same shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")

    def _explain_dtypes(self, k_new: Tensor, v_new: Tensor) -> None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.dtype != self.k.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}, but the cache holds {self.k.dtype}; build it with dtype=")
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device}, but the cache is on {self.k.device}; move it with .to()")


def _hidden(pos: Tensor, cols: Tensor, left: int | None) -> Tensor:
    """(B, 1, L, S) bool, True where the query at position pos[b, t] may not see key cols[j]: a
    later key, or (with a window) one more than `left` keys back."""
    pos = pos[:, :, None]  # (B, L, 1)
    hidden = cols > pos  # (B, L, S)
    if left is not None:
        hidden |= cols < pos - left
    return hidden[:, None]


# ---- `KVCache.attend` as one op (compiled CPU inference) ----------------------------------------------
# A `torch.library.Library` op rather than `torch.library.custom_op`: a decode step calls it once per
# layer per token, and the plain dispatcher call costs a fraction of custom_op's Python wrapper. It has
# no autograd formula: `functional` calls it only with gradients off.
_LIBRARY = torch.library.Library("multihead", "FRAGMENT")
_LIBRARY.define("cached_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, int? left, float scale) -> Tensor")


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, left: int | None, scale: float) -> Tensor:
    """q (B, H, L, D) of the last L tokens of each sequence against keys/values k, v (B, Hkv, max_len, D)
    of which lengths[b] are filled: bottom-right causal, as `KVCache.update` masks (eager, outside the
    graph, so the dispatch table and the lengths are read as in an eager step)."""
    batch, heads, length, _ = q.shape
    low, high = (int(n) for n in lengths.aminmax())
    k, v = k[:, :, :high], v[:, :, :high]
    unmasked = length == 1 and low == high and (left is None or left >= high - 1)
    hidden = None
    if not unmasked:
        cols = torch.arange(high, device=q.device)
        hidden = _hidden((lengths - length)[:, None] + cols[:length], cols, left)
    mask = AttentionMask(batch, heads, length, high, dense=hidden, device=q.device)
    # SDPA serves every call without weights; with a window the table may prefer its windowed backend
    backend = attend.sdpa if left is None else attend.choose(q, k, v, mask, need_weights=False)
    out, _ = backend.attend(q, k, v, mask, scale=scale, dropout_p=0.0, need_weights=False, average_weights=False)
    return out.contiguous()


_LIBRARY.impl("cached_attention", _cached_attention, "CPU")


@torch.library.register_fake("multihead::cached_attention")
def _cached_attention_fake(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, left: int | None, scale: float) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
