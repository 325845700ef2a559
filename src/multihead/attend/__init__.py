"""Backends and the dispatch table.

Every backend is a module with `name`, `not_supported_reasons(q, k, v, mask, *, need_weights)`
(an empty list when it can serve the request) and `attend(q, k, v, mask, *, scale, dropout_p,
need_weights, average_weights) -> (out, weights | None)` with q: (B, H, L, D), k/v: (B, Hkv, S, D).
Dispatch walks `PRIORITY` and takes the first backend that serves the request; a user can force one
by name (`backend="reference"`).
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from ..masks import AttentionMask
from . import blockwise, direct, reference, sdpa, windowed

BACKENDS: dict[str, ModuleType] = {b.name: b for b in (windowed, sdpa, direct, blockwise, reference)}
# first that serves wins: windowed only takes sliding windows that pay; sdpa everything without
# weights; direct calls with weights that fit one blockwise tile; blockwise everything with
# weights; reference is the oracle
PRIORITY: tuple[str, ...] = ("windowed", "sdpa", "direct", "blockwise", "reference")


def choose(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool, backend: str | None = None
) -> ModuleType:
    """The backend that serves this request: the forced one, or the first in `PRIORITY` that can."""
    names = PRIORITY if backend is None else (backend,)
    reasons: dict[str, list[str]] = {}
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
        why = BACKENDS[name].not_supported_reasons(q, k, v, mask, need_weights=need_weights)
        if not why:
            return BACKENDS[name]
        reasons[name] = why
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no attention backend can serve this call ({detail})")


def explain(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> dict[str, list[str]]:
    """For each backend, why it cannot serve this request (an empty list: it can)."""
    return {n: BACKENDS[n].not_supported_reasons(q, k, v, mask, need_weights=need_weights) for n in PRIORITY}
