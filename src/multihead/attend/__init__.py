"""Backends and the dispatch table.

Every backend is a module with `name`, `not_supported_reasons(q, k, v, mask, *, need_weights)`
(an empty list when it can serve the request) and `attend(q, k, v, mask, *, scale, dropout_p,
need_weights, average_weights) -> (out, weights | None)` with q: (B, H, L, D), k/v: (B, Hkv, S, D).
Dispatch walks `PRIORITY` (`EXPORT_PRIORITY` / `TRACE_PRIORITY` while an exporter or tracer records
the call) and takes the first backend that serves the request; a user can force one by name
(`module.backend = "reference"`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ..masks import AttentionMask
from . import blockwise, blockwise_op, direct, exportable, reference, sdpa, triton, windowed

BACKENDS: dict[str, ModuleType] = {b.name: b for b in (windowed, sdpa, direct, blockwise, reference, exportable)}
# backends for CUDA tensors only: dispatch offers them nothing else; forced by name they serve what
# they declare (the triton backend: CPU tensors under TRITON_INTERPRET=1, for tests)
GPU_BACKENDS: dict[str, ModuleType] = {triton.name: triton}
# first that serves wins: windowed only takes sliding windows that pay; sdpa everything without
# weights; direct calls with weights that fit one blockwise tile; triton weights on CUDA; blockwise
# everything with weights; reference is the oracle
PRIORITY: tuple[str, ...] = ("windowed", "sdpa", "direct", "triton", "blockwise", "reference")
# under torch.export / ONNX export: plain math with symbolic shapes that zeroes fully masked rows
EXPORT_PRIORITY: tuple[str, ...] = ("exportable",)
# under torch.jit.trace: SDPA (traced shape-generic) without weights, plain math with them
TRACE_PRIORITY: tuple[str, ...] = ("sdpa", "exportable")
# under torch.compile: blockwise's tile loops run as one opaque custom op
COMPILED: dict[str, ModuleType] = {"blockwise": blockwise_op}


def names() -> list[str]:
    """Every backend a user can force by name."""
    return sorted({**BACKENDS, **GPU_BACKENDS})


def get(name: str) -> ModuleType:
    """The backend called `name`; a clear error for any other name."""
    backend = BACKENDS.get(name) or GPU_BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"backend must be one of {names()} or None, got {name!r}")
    return backend


def choose(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool, backend: str | None = None
) -> ModuleType:
    """The backend that serves this request: the forced one, or the first of `_priority()` that can."""
    chosen = _priority() if backend is None else (backend,)
    reasons: dict[str, list[str]] = {}
    for name in chosen:
        why = _reasons(name, q, k, v, mask, need_weights=need_weights, forced=backend is not None)
        if not why:
            return COMPILED.get(name, get(name)) if torch.compiler.is_compiling() else get(name)
        reasons[name] = why
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no attention backend can serve this call ({detail})")


def explain(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool) -> dict[str, list[str]]:
    """For each backend, why it cannot serve this request (an empty list: it can)."""
    return {n: _reasons(n, q, k, v, mask, need_weights=need_weights, forced=False) for n in _priority()}


def _priority() -> tuple[str, ...]:
    if torch.compiler.is_exporting():  # torch.export, and ONNX export with dynamo=True
        return EXPORT_PRIORITY
    if torch.jit.is_tracing():  # torch.jit.trace, and the TorchScript-based ONNX export
        return EXPORT_PRIORITY if torch.onnx.is_in_onnx_export() else TRACE_PRIORITY
    return PRIORITY


def _reasons(
    name: str, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, need_weights: bool, forced: bool
) -> list[str]:
    backend = get(name)
    if name in GPU_BACKENDS and not forced and q.device.type != "cuda":
        return [f"chosen only for CUDA tensors, got {q.device.type} (force it with backend={name!r})"]
    return backend.not_supported_reasons(q, k, v, mask, need_weights=need_weights)
