"""`RotaryEmbedding`: rotary position embedding (RoPE) for queries and keys, per head.

Each pair of features (a, b) of a head is rotated by the angle `position * theta_i`, with
theta_i = base ** (-2i / D), i = 0 .. D/2 - 1, so that after rotation q . k depends on the positions
of q and k only through their difference. Two pairing conventions:

- half-split (default; GPT-NeoX, Llama, `rotate_half`): pair i is (x[i], x[i + D/2]);
- interleaved (`interleaved=True`; GPT-J, the RoFormer paper): pair i is (x[2i], x[2i + 1]).

The cos/sin table is computed in float64 and stored in float32 (float64 for float64 inputs) as a
non-persistent buffer, so it never appears in a state_dict. It is applied in the input's dtype (the
table is cast once per dtype and cached). It grows on demand in eager mode when a position exceeds it.
Under `torch.compile` it cannot grow: build the module with `max_seq_len` above every position the
compiled code will see (or call `reserve(n)` before compiling); positions outside the table are an
indexing error there.

Notation: B batch, H heads, T sequence length, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for (B, H, T, D) tensors.

    Args:
        head_dim: D, the feature size of one head; must be even.
        base: the frequency base (10000 in the paper; Llama 3 uses 500000).
        interleaved: pair features (2i, 2i+1) as GPT-J instead of (i, i + D/2) as GPT-NeoX / Llama.
        max_seq_len: initial size of the cos/sin table (positions 0 .. max_seq_len - 1). Eager calls
            grow it as needed; compiled calls require it to be large enough.
        device: where the table lives (it follows `module.to(device)` afterwards).

    Call: `rope(x, positions)` with x (B, H, T, D) and positions an integer tensor of absolute
    positions, (T,) shared by the batch or (B, T) per sequence, or a Python int p: positions p .. p+T-1
    for every sequence (a slice of the table, no gather). Returns x rotated, same shape and dtype.
    `rope.rotate_qk(q, k, positions)` rotates queries and keys at the same positions with one table
    lookup. Pass `max_position=` (a bound the caller knows) to spare eager calls reading the positions.
    """

    table: Tensor  # (N, 2, D): [:, 0] cos, [:, 1] sin with the rotation's sign folded in

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (features are rotated in pairs), got {head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1.0:
            raise ValueError(f"base must be a number greater than 1, got {base!r}")
        if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self._table_dtype = torch.float32  # the dtype the table was computed for (see _table)
        self.register_buffer("table", self._build(max_seq_len, torch.float32, device), persistent=False)
        self._cast: tuple[Tensor, Tensor] | None = None  # (source table, table cast to another dtype)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cast"] = None  # a cache: not worth saving
        return state

    @property
    def max_seq_len(self) -> int:
        """Positions 0 .. max_seq_len - 1 are in the table now."""
        return self.table.shape[0]

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base:g}, interleaved={self.interleaved}, "
            f"max_seq_len={self.max_seq_len}"
        )

    # ---- the table ---------------------------------------------------------------------------
    def _build(self, n: int, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
        """(n, 2, D) table in `dtype`: angles and cos/sin in float64, then rounded once."""
        half = self.head_dim // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / self.head_dim)
        angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq  # (n, D/2)
        cos, sin = angles.cos(), angles.sin()
        if self.interleaved:  # x' = x * [c0, c0, c1, c1, ..] + [x1, x0, x3, x2, ..] * [-s0, s0, -s1, s1, ..]
            cos = cos.repeat_interleave(2, dim=-1)
            sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
        else:  # x' = x * [c, c] + [x2, x1] * [-s, s]   (x = [x1, x2] halves)
            cos = torch.cat([cos, cos], dim=-1)
            sin = torch.cat([-sin, sin], dim=-1)
        return torch.stack([cos, sin], dim=1).to(dtype)  # (n, 2, D)

    def reserve(self, n: int) -> None:
        """Make sure positions 0 .. n - 1 are in the table (eager only; call before compiling)."""
        if n > self.max_seq_len:
            self._rebuild(max(n, 2 * self.max_seq_len), self._table_dtype)

    def _rebuild(self, n: int, dtype: torch.dtype) -> None:
        self.table = self._build(n, dtype, self.table.device)  # a registered buffer: stays one
        self._table_dtype = dtype
        self._cast = None

    def _table(self, x: Tensor, needed: int) -> Tensor:
        """The table on x's device, in x's dtype, with at least `needed` rows (eager only)."""
        table = self.table  # one module attribute lookup: this runs every decode step
        want = torch.float64 if x.dtype == torch.float64 else torch.float32
        if table.device != x.device or table.dtype != want or self._table_dtype != want or needed > table.shape[0]:
            table = self._refresh(x.device, want, needed)
        if x.dtype == want:
            return table
        cast = self._cast
        if cast is None or cast[0] is not table or cast[1].dtype != x.dtype:
            cast = self._cast = (table, table.to(x.dtype))
        return cast[1]

    def _refresh(self, device: torch.device, want: torch.dtype, needed: int) -> Tensor:
        """Move the table to `device`; rebuild it if it is too short, or if its rows were rounded
        in another dtype than `want` (module.to(dtype) casts buffers)."""
        if self.table.device != device:
            self.table = self.table.to(device)
            self._cast = None
        if self.table.dtype != self._table_dtype or self._table_dtype != want:
            self._rebuild(max(self.max_seq_len, needed), want)
        elif needed > self.max_seq_len:
            self._rebuild(max(needed, 2 * self.max_seq_len), want)
        return self.table

    # ---- the rotation ------------------------------------------------------------------------
    def forward(self, x: Tensor, positions: Tensor | int, *, max_position: int | None = None) -> Tensor:
        """Rotate x (B, H, T, D) by absolute `positions`, (T,) or (B, T) integers, or an int p for
        positions p .. p + T - 1 (a constant under torch.compile: pass a tensor for positions that
        change from call to call there).

        max_position: an upper bound on `positions` known to the caller (e.g. T - 1, or a KV cache's
        max_len - 1). Eager calls use it to grow the table without reading the positions; without it
        they read `positions.min()/max()`, which is a device sync on accelerators. Ignored under compile.
        """
        cos, sin = self._cos_sin(x, positions, max_position)
        return self._rotate(x, cos, sin)

    def rotate_qk(
        self, q: Tensor, k: Tensor, positions: Tensor | int, *, max_position: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(self(q, positions), self(k, positions))` for q (B, H, T, D) and k (B, Hkv, T, D) at the
        same positions, looking the table up once (fewer ops per decode step)."""
        cos, sin = self._cos_sin(q, positions, max_position)
        if not torch.compiler.is_compiling():
            self._check(k, positions)
        if q.shape[2] == 1 and q.shape[0] == k.shape[0] and q.dtype == k.dtype:
            # one position (a decode step), where each op costs more than its work: rotate q and k as
            # one tensor (B, H + Hkv, 1, D), three ops fewer for one small copy
            qk = self._rotate(torch.cat([q, k], dim=1), cos, sin)
            return qk[:, : q.shape[1]], qk[:, q.shape[1] :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _cos_sin(self, x: Tensor, positions: Tensor | int, max_position: int | None) -> tuple[Tensor, Tensor]:
        """cos and signed sin at `positions`, in x's dtype: (T, D) or (B, 1, T, D) each."""
        if isinstance(positions, int):  # p .. p+T-1: a slice of the table
            self._check(x, positions)
            end = positions + x.shape[2]
            table = self._table(x, end) if not torch.compiler.is_compiling() else self.table.to(x.device, x.dtype)
            cos, sin = table[positions:end].unbind(-2)
            return cos, sin
        if torch.compiler.is_compiling():  # no checks on values, no growth, no Python-side cache
            table = self.table.to(device=x.device, dtype=x.dtype)
        else:
            self._check(x, positions)
            if max_position is None and positions.numel():
                low, max_position = (int(p) for p in positions.aminmax())
                if low < 0:
                    raise ValueError(f"positions must be >= 0, got a minimum of {low}")
            table = self._table(x, (max_position or 0) + 1)
        table = table[positions]  # (T, 2, D) | (B, T, 2, D)
        if positions.dim() == 2:
            table = table.unsqueeze(1)  # (B, 1, T, 2, D)
        cos, sin = table.unbind(-2)
        return cos, sin

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return torch.addcmul(x * cos, self._swap(x), sin)  # x * cos + swap(x) * sin

    def _swap(self, x: Tensor) -> Tensor:
        """Swap the two members of each pair (signs live in the sin table)."""
        if self.interleaved:
            # [x1, x0, x3, x2, ..] (reshape, not unflatten: a decode step notices unflatten's Python wrapper)
            return x.reshape(*x.shape[:-1], -1, 2).flip(-1).flatten(-2)
        return x.roll(self.head_dim // 2, dims=-1)  # [x2, x1] halves

    def _check(self, x: Tensor, positions: Tensor | int) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a (B, H, T, D) tensor with D = head_dim = {self.head_dim}, got {got}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if isinstance(positions, int) and not isinstance(positions, bool):
            if positions < 0:
                raise ValueError(f"positions must be >= 0, got the first position {positions}")
            return
        if (
            not isinstance(positions, Tensor)
            or positions.dtype == torch.bool
            or positions.is_floating_point()
            or positions.is_complex()
        ):
            what = positions.dtype if isinstance(positions, Tensor) else type(positions).__name__
            raise TypeError(f"positions must be an integer tensor or a first position (int), got {what}")
        batch, _, length, _ = x.shape
        if positions.shape not in ((length,), (batch, length)):
            raise ValueError(
                f"positions must have shape (T,) = ({length},) or (B, T) = ({batch}, {length}) for x of shape "
                f"{tuple(x.shape)}, got {tuple(positions.shape)}"
            )
        if positions.device != x.device:
            raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
