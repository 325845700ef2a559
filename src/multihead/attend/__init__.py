"""Backends and the dispatch table.

Every backend is a module with `name`, `not_supported_reasons(q, k, v, mask, *, need_weights)`
(an empty list when it can serve the request) and `attend(q, k, v, mask, *, scale, dropout_p,
need_weights, average_weights) -> (out, weights | None)` with q: (B, H, L, D), k/v: (B, Hkv, S, D).
Dispatch walks `PRIORITY` and takes the first backend that serves the request; a user can force one
by name (`backend="reference"`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ..masks import AttentionMask
from . import blockwise, blockwise_op, exportable, reference, sdpa, triton, windowed

BACKENDS: dict[str, ModuleType] = {b.name: b for b in (windowed, sdpa, triton, blockwise, reference, exportable)}
# first that serves wins: windowed only takes sliding windows that pay; sdpa everything without
# weights; triton weights on CUDA (CPU tensors only under TRITON_INTERPRET=1, for tests); blockwise
# everything with weights; reference is the oracle
PRIORITY: tuple[str, ...] = ("windowed", "sdpa", "triton", "blockwise", "reference")
# backends that dispatch offers only tensors on these devices (elsewhere they serve only when forced)
AUTO_DEVICES: dict[str, tuple[str, ...]] = {"triton": ("cuda",)}
# under torch.export / ONNX export: plain math with symbolic shapes that zeroes fully masked rows
EXPORT_PRIORITY: tuple[str, ...] = ("exportable",)
# under torch.jit.trace: SDPA (traced shape-generic) without weights, plain math with them
TRACE_PRIORITY: tuple[str, ...] = ("sdpa", "exportable")
# under torch.compile: blockwise's tile loops run as one opaque custom op
COMPILED: dict[str, ModuleType] = {"blockwise": blockwise_op}


def choose(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool, backend: str | None = None
) -> ModuleType:
    """The backend that serves this request: the forced one, or the first in `PRIORITY` that can
    (`EXPORT_PRIORITY` / `TRACE_PRIORITY` while an exporter or tracer records the call)."""
    names = _priority() if backend is None else (backend,)
    reasons: dict[str, list[str]] = {}
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
        why = _reasons(name, q, k, v, mask, need_weights=need_weights, forced=backend is not None)
        if not why:
            return COMPILED.get(name, BACKENDS[name]) if torch.compiler.is_compiling() else BACKENDS[name]
        reasons[name] = why
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no attention backend can serve this call ({detail})")


def explain(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> dict[str, list[str]]:
    """For each backend, why it cannot serve this request (an empty list: it can)."""
    return {n: _reasons(n, q, k, v, mask, need_weights=need_weights, forced=False) for n in _priority()}


def _priority() -> tuple[str, ...]:
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return EXPORT_PRIORITY
    return TRACE_PRIORITY if torch.jit.is_tracing() else PRIORITY


def _reasons(
    name: str, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool, forced: bool
) -> list[str]:
    devices = AUTO_DEVICES.get(name)
    if not forced and devices is not None and q.device.type not in devices:
        return [f"chosen only for {'/'.join(devices)} tensors, got {q.device.type} (force it with backend={name!r})"]
    return BACKENDS[name].not_supported_reasons(q, k, v, mask, need_weights=need_weights)
