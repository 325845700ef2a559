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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    need_weights: bool,
    backend: str | None = None,
    remember: bool = True,
) -> ModuleType:
    """The backend that serves this request: the forced one, or the first of `_priority()` that can.

    In eager mode the choice is remembered by everything it depends on (`_choice_key`): walking the
    table costs a small call more than some of its ops. remember=False for requests whose shapes
    change every call (a KV-cache step's key length): building their key costs more than the walk,
    and each would add an entry."""
    key = _choice_key(q, k, v, mask, need_weights) if backend is None and remember else None
    name = _choices.get(key) if key is not None else None
    if name is None:
        name = _first_serving(_priority() if backend is None else (backend,), q, k, v, mask, need_weights, backend)
        if key is not None:
            if len(_choices) >= _MAX_CHOICES:
                _choices.clear()
            _choices[key] = name
    return COMPILED.get(name, get(name)) if torch.compiler.is_compiling() else get(name)


def _first_serving(
    names: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, need_weights: bool, forced: str | None
) -> str:
    reasons: dict[str, list[str]] = {}
    for name in names:
        why = _reasons(name, q, k, v, mask, need_weights=need_weights, forced=forced is not None)
        if not why:
            return name
        reasons[name] = why
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no attention backend can serve this call ({detail})")


_choices: dict[tuple, str] = {}  # eager dispatch decisions by `_choice_key`
_MAX_CHOICES = 4096  # a program calling with ever new shapes starts over rather than grow without end


def _choice_key(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, need_weights: bool) -> tuple | None:
    """Everything a backend's `not_supported_reasons` reads, or None where nothing is remembered (while
    compiling, tracing or exporting: there the shapes may be symbolic and the table is another).
    Shapes, dtype and device; the mask's structure (not its values); and the settings the reasons read,
    so that changing one (a test, a benchmark) is seen at once. A backend whose reasons read something
    new must add it here."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return None
    kp, dense = mask.key_padding, mask.dense
    return (
        q.shape,
        k.shape,
        v.shape,
        q.dtype,
        q.device,
        need_weights,
        mask.causal,
        mask.offset,
        mask.window,
        None if kp is None else (kp.dtype, kp.requires_grad),
        None if dense is None else (dense.shape, dense.dtype, dense.requires_grad),
        PRIORITY,
        torch.get_num_threads(),
        blockwise.tile_budget_bytes(q.device),  # BLOCK_BYTES, or the machine's budget
        blockwise.PARALLEL_MIN_ELEMENTS,
        windowed.MIN_CHUNK,
        windowed.MAX_CHUNK,
        windowed.MAX_SHARE,
        triton.MAX_HEAD_DIM,
    )


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
