"""`AttentionMask`: the one internal mask form.

Every user-facing mask argument (`attn_mask`, `key_padding_mask`, `is_causal`, and later `window`)
is validated and turned into an `AttentionMask` here, once, at the boundary. Backends read only
this object. It keeps structure so backends can take fast paths:

- `causal`: query i may see key j only if j <= i + offset (top-left aligned when offset == 0, as
  `F.scaled_dot_product_attention(is_causal=True)`; a KV cache uses offset = S - L, bottom-right).
- `window`: (left, right) as flash-attn: query i sees keys i + offset - left ... i + offset + right
  (None on a side means unbounded; causal forces right = 0).
- `key_padding`: (B, S), bool (True = padding, may not be attended) or float (added to scores).
- `dense`: at most one dense part, bool (True = may not attend) or float (added to the scores),
  shaped (1, 1, L, S) or (B, H, L, S).

Notation: B batch, H heads, L query length, S key length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .validation import layout_hint, shape_error

__all__ = ["AttentionMask", "build_mask"]


@dataclass(frozen=True)
class AttentionMask:
    batch: int
    heads: int
    q_len: int
    k_len: int
    causal: bool = False
    offset: int = 0
    window: tuple[int | None, int | None] | None = None
    key_padding: Tensor | None = None  # (B, S) bool or float
    dense: Tensor | None = None  # (1 | B, 1 | H, L, S) bool or float
    device: torch.device = torch.device("cpu")

    # ---- what backends ask -------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        """No key is hidden from any query."""
        return not self.causal and self.window is None and self.key_padding is None and self.dense is None

    @property
    def is_plain_causal(self) -> bool:
        """Exactly SDPA's `is_causal=True` pattern (top-left aligned), nothing else."""
        return (
            self.causal and self.offset == 0 and self.window is None and self.key_padding is None and self.dense is None
        )

    @property
    def has_band(self) -> bool:
        return self.causal or self.window is not None

    def band_limits(self) -> tuple[int | None, int | None]:
        """(left, right) reach of each query relative to its diagonal; None = unbounded."""
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    def band(self, q_start: int, q_stop: int, device: torch.device) -> Tensor | None:
        """Bool (q_stop - q_start, S) mask, True = hidden, of the causal/window part for a block of
        query rows; None when there is no band."""
        if not self.has_band:
            return None
        left, right = self.band_limits()
        return _band(q_start + self.offset, q_stop + self.offset, self.k_len, left, right, None, device)

    def additive(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """The whole mask as one float tensor broadcastable to (B, H, L, S): 0 where visible,
        -inf where hidden, plus any float parts. None when nothing is masked. (The reference.)"""
        return self.additive_rows(0, self.q_len, dtype, device)

    def additive_rows(self, q_start: int, q_stop: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """`additive()` restricted to query rows [q_start, q_stop)."""
        total = None
        if self.has_band:
            left, right = self.band_limits()
            row0, row1 = q_start + self.offset, q_stop + self.offset
            total = _band(row0, row1, self.k_len, left, right, dtype, device).view(1, 1, row1 - row0, self.k_len)
        if self.key_padding is not None:
            kp = _to_additive(self.key_padding, dtype).view(self.batch, 1, 1, self.k_len)  # (B, 1, 1, S)
            total = kp if total is None else total + kp
        if self.dense is not None:
            dense = self.dense if (q_start, q_stop) == (0, self.q_len) else self.dense[:, :, q_start:q_stop]
            dense = _to_additive(dense, dtype)  # (1|B, 1|H, l, S)
            total = dense if total is None else total + dense
        return total

    def hidden(self) -> Tensor | None:
        """The whole mask as one bool tensor (True = hidden), broadcastable to (B, H, L, S), when
        every part is bool; None when nothing is masked. Raises if a part is float."""
        total = self.band(0, self.q_len, self.device)
        if total is not None:
            total = total[None, None]
        for part in (self._padding4d(), self.dense):
            if part is None:
                continue
            assert part.dtype == torch.bool, "hidden() needs bool parts"
            total = part if total is None else total | part
        return total

    @property
    def is_bool(self) -> bool:
        return all(p is None or p.dtype == torch.bool for p in (self.key_padding, self.dense))

    def for_sdpa(self, dtype: torch.dtype) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for `F.scaled_dot_product_attention`: SDPA's bool convention is
        True = may attend, so bool masks are inverted; float masks are passed as additive."""
        if self.is_empty:
            return None, False
        if self.is_plain_causal:
            return None, True
        if self.is_bool:
            hidden = self.hidden()
            assert hidden is not None  # not empty, so some part is masked
            return ~hidden, False
        return self.additive(dtype, self.device), False

    # ---- transformations ---------------------------------------------------------------------
    def pad_keys(self, n: int) -> AttentionMask:
        """Append `n` always-visible keys (for `bias_k`/`bias_v` and `add_zero_attn`)."""
        if self.is_empty:
            return replace(self, k_len=self.k_len + n)
        dense = self.dense
        if self.has_band:  # the band does not extend to the extra columns: make it dense
            band = self.band(0, self.q_len, self.device)
            assert band is not None  # has_band
            band = band[None, None]
            if dense is None:
                dense = band
            elif dense.dtype == torch.bool:
                dense = dense | band
            else:
                dense = dense + _to_additive(band, dense.dtype)
        key_padding = self.key_padding
        if key_padding is not None:
            key_padding = torch.nn.functional.pad(key_padding, (0, n), value=_zero_of(key_padding))
        if dense is not None:
            dense = torch.nn.functional.pad(dense, (0, n), value=_zero_of(dense))
        return replace(self, k_len=self.k_len + n, causal=False, window=None, key_padding=key_padding, dense=dense)

    def _padding4d(self) -> Tensor | None:
        return None if self.key_padding is None else self.key_padding[:, None, None, :]


def _zero_of(t: Tensor) -> bool | float:
    return False if t.dtype == torch.bool else 0.0


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask if mask.dtype == dtype else mask.to(dtype)


def _make_band(
    row0: int, row1: int, k_len: int, left: int | None, right: int | None, dtype: torch.dtype | None, device
) -> Tensor:
    """(row1 - row0, k_len) mask of the band around the diagonal of query rows [row0, row1) (offset
    included): bool True = hidden with dtype None, else additive (0 visible, -inf hidden)."""
    with torch.inference_mode(False):  # a cached tensor must also serve calls that record autograd
        rows = torch.arange(row0, row1, device=device).unsqueeze(1)
        cols = torch.arange(k_len, device=device).unsqueeze(0)
        hidden = torch.zeros(row1 - row0, k_len, dtype=torch.bool, device=device)
        if right is not None:
            hidden |= cols > rows + right
        if left is not None:
            hidden |= cols < rows - left
        return hidden if dtype is None else _to_additive(hidden, dtype)


_cached_band = functools.lru_cache(maxsize=16)(_make_band)
_CACHED_BAND_BYTES = 2**20  # small calls, where building a band costs more than using it, reuse one


def _band(row0, row1, k_len, left, right, dtype, device) -> Tensor:
    """`_make_band`, cached up to `_CACHED_BAND_BYTES` in eager mode (shared: callers never write to it)."""
    itemsize = 1 if dtype is None else dtype.itemsize
    small = (row1 - row0) * k_len * itemsize <= _CACHED_BAND_BYTES
    make = _cached_band if small and not torch.compiler.is_compiling() else _make_band
    return make(row0, row1, k_len, left, right, dtype, device)


def _is_causal_pattern(mask: Tensor) -> bool:
    """Is this 2-D user mask exactly the top-left causal pattern (bool: True above the diagonal;
    float: 0 on and below it, -inf above)? Skipped under torch.compile / torch.export and
    torch.jit.trace (value-dependent: a trace would bake the answer in) and for non-CPU masks (would
    sync the device).

    One read of the mask and no temporary of its size (a long causal mask is hundreds of MB): each
    block of `_CAUSAL_CHECK_ROWS` rows [r0, r1) must hide no key before r0, every key from r1 on, and
    cut the band's triangle (a small cached one) in between."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or mask.device.type != "cpu" or mask.requires_grad:
        return False
    dtype = None if mask.dtype == torch.bool else mask.dtype
    q_len, k_len = mask.shape
    if mask.numel() * mask.element_size() <= _CACHED_BAND_BYTES:  # small: one comparison with the cached band
        return torch.equal(mask, _band(0, q_len, k_len, None, 0, dtype, mask.device))
    for r0 in range(0, q_len, _CAUSAL_CHECK_ROWS):
        r1 = min(q_len, r0 + _CAUSAL_CHECK_ROWS)
        c1 = max(r0, min(k_len, r1))  # the block's triangle spans keys [r0, c1)
        triangle = _band(0, r1 - r0, c1 - r0, None, 0, dtype, mask.device)
        if not (
            _all_visible(mask[r0:r1, :r0])
            and _all_hidden(mask[r0:r1, c1:])
            and torch.equal(mask[r0:r1, r0:c1], triangle)
        ):
            return False
    return True


_CAUSAL_CHECK_ROWS = 256  # its triangles, 256 x 256, are small enough to be cached (`_band`)


def _all_visible(part: Tensor) -> bool:
    """Every entry False (bool) or 0 (float); NaN is not. (A bool mask is read as uint8: torch's
    min/max run about 10x faster than any/all on bool.)"""
    if part.numel() == 0:
        return True
    low, high = torch.aminmax(part.view(torch.uint8) if part.dtype == torch.bool else part)
    return bool(low == 0) and bool(high == 0)


def _all_hidden(part: Tensor) -> bool:
    """Every entry True (bool) or -inf (float); NaN is not."""
    if part.numel() == 0:
        return True
    if part.dtype == torch.bool:
        return bool(part.view(torch.uint8).min() == 1)
    return bool(part.max() == float("-inf"))


# ---- building from user arguments ------------------------------------------------------------
def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")


def build_mask(
    *,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    batched: bool,
    device: torch.device,
    window: tuple[int | None, int | None] | None = None,
    offset: int = 0,
    batch_first: bool | None = None,
) -> AttentionMask:
    """Validate the user's masks and return the structured form.

    attn_mask: (L, S), or (B*H, L, S) batched / (H, L, S) unbatched; bool (True = may not attend)
        or float (added to the scores).
    key_padding_mask: (B, S) batched / (S,) unbatched; bool (True = padding) or float.
    is_causal: a hint; with no attn_mask it means causal attention; with one, the mask wins.
    batch_first: the layout the inputs came in (only for error messages: a mask shaped for the other
        layout gets "did you mean batch_first=...?").
    """
    # the shapes the masks would have if the inputs meant the other layout (self-attention shapes
    # only: L == S); B <-> L swap, so a seq-first caller's masks match these
    hint = ""
    if batched and batch_first is not None and q_len == k_len:
        hint = layout_hint(batch_first)
    kind = "batched (3-D)" if batched else "unbatched (2-D)"
    causal = False
    dense = None
    if attn_mask is not None:
        _check_mask_dtype("attn_mask", attn_mask)
        _check_device("attn_mask", attn_mask, device)
        lead = batch * heads if batched else heads
        lead_name = "batch_size * num_heads" if batched else "num_heads"
        if attn_mask.dim() == 2:
            if attn_mask.shape != (q_len, k_len):
                raise ValueError(
                    f"attn_mask of 2 dimensions must have shape (L, S) = ({q_len}, {k_len}), "
                    f"got {tuple(attn_mask.shape)}" + (hint if attn_mask.shape == (batch, batch) else "")
                )
            if _is_causal_pattern(attn_mask):
                causal = True
            else:
                dense = attn_mask[None, None]  # (1, 1, L, S)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (lead, q_len, k_len):
                ours = (
                    f"attn_mask of 3 dimensions must have shape ({lead_name}, L, S) = "
                    f"({lead}, {q_len}, {k_len}), got {tuple(attn_mask.shape)}"
                )
                if not batched:  # torch asserts here (batched: torch's RuntimeError; ours a ValueError)
                    raise shape_error(
                        ours, f"Expected `attn_mask` shape to be {(lead, q_len, k_len)} but got {attn_mask.shape}"
                    )
                raise ValueError(ours + (hint if attn_mask.shape == (q_len * heads, batch, batch) else ""))
            dense = attn_mask.view(batch, heads, q_len, k_len)
        else:
            raise shape_error(
                f"attn_mask must have 2 dimensions (L, S) or 3 dimensions ({lead_name}, L, S), "
                f"got {attn_mask.dim()} dimensions with shape {tuple(attn_mask.shape)}",
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                f"{attn_mask.dim()}-D tensor instead",
            )
    elif is_causal:
        causal = True

    key_padding = None
    if key_padding_mask is not None:
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_device("key_padding_mask", key_padding_mask, device)
        expected = (batch, k_len) if batched else (k_len,)
        if tuple(key_padding_mask.shape) != expected:
            want = "(B, S)" if batched else "(S,)"
            ours = f"key_padding_mask must have shape {want} = {expected}, got {tuple(key_padding_mask.shape)}"
            if key_padding_mask.dim() != len(expected):  # torch asserts on the number of dimensions
                raise shape_error(
                    ours,
                    f"For {kind} `query`, expected `key_padding_mask` to be `None` or {len(expected)}-D but found "
                    f"{key_padding_mask.dim()}-D tensor instead",
                )
            raise ValueError(ours + (hint if tuple(key_padding_mask.shape) == (q_len, batch) else ""))
        key_padding = key_padding_mask if batched else key_padding_mask.view(batch, k_len)

    return AttentionMask(
        batch=batch,
        heads=heads,
        q_len=q_len,
        k_len=k_len,
        causal=causal,
        offset=offset,
        window=window,
        key_padding=key_padding,
        dense=dense,
        device=device,
    )


def _check_device(name: str, mask: Tensor, device: torch.device) -> None:
    if mask.device != device:
        raise ValueError(
            f"{name} is on device {mask.device}, but the inputs are on {device}; move it with .to({str(device)!r})"
        )
