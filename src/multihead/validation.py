"""Checks on user input, run before any work. Each error names the argument, what it got and what
was expected (ValueError for values and shapes, TypeError for types and dtypes, like torch).

Where `torch.nn.MultiheadAttention` raises `AssertionError` (malformed shapes), we raise
`MultiheadAttentionShapeError`, a `ValueError` and an `AssertionError` at once, so code that catches
either keeps working; its message is ours, then torch's own phrase in brackets.
"""

from __future__ import annotations

import torch
from torch import Tensor


class MultiheadAttentionShapeError(ValueError, AssertionError):
    """A malformed shape where torch's module raises `AssertionError`: catch it as `ValueError` (ours)
    or `AssertionError` (torch's). The message is our explanation followed by torch's wording."""


def shape_error(ours: str, torchs: str | None = None) -> MultiheadAttentionShapeError:
    """`MultiheadAttentionShapeError` with our message and, when torch has one, torch's phrase."""
    return MultiheadAttentionShapeError(ours if torchs is None else f"{ours} [torch: {torchs}]")


def layout_hint(batch_first: bool) -> str:
    """The hint for a shape that the other layout explains (seq-first inputs by habit)."""
    return f"; did you mean batch_first={not batch_first}?"


def check_module_args(
    embed_dim: int, num_heads: int, dropout: float, kdim: int | None, vdim: int | None, num_kv_heads: int | None
) -> None:
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than 0, got {name}={value}")
    for name, optional in (("kdim", kdim), ("vdim", vdim), ("num_kv_heads", num_kv_heads)):
        if optional is not None and (not isinstance(optional, int) or isinstance(optional, bool) or optional <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {optional!r}")
    if embed_dim % num_heads != 0:  # torch: AssertionError("embed_dim must be divisible by num_heads")
        raise MultiheadAttentionShapeError(
            f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and num_heads={num_heads} "
            f"(embed_dim / num_heads = {embed_dim / num_heads:g}); pick num_heads among the divisors of {embed_dim}"
        )
    if num_kv_heads is not None and num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_kv_heads must divide num_heads, got num_heads={num_heads} and num_kv_heads={num_kv_heads}"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    embed_dim: int,
    kdim: int,
    vdim: int,
    batch_first: bool,
    param: Tensor,
) -> bool:
    """Validate query/key/value; return whether they are batched (3-D) rather than unbatched (2-D)."""
    if _well_formed(query, key, value, embed_dim, kdim, vdim, batch_first, param):
        return query.dim() == 3
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if query.dim() not in (2, 3):
        raise shape_error(
            f"query must be 3-D {'(B, L, E)' if batch_first else '(L, B, E)'} or 2-D (L, E) unbatched, "
            f"got {query.dim()}-D with shape {tuple(query.shape)}",
            f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor",
        )
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            kind = "batched (3-D)" if query.dim() == 3 else "unbatched (2-D)"
            raise shape_error(
                f"query, key and value must have the same number of dimensions, got query "
                f"{tuple(query.shape)} ({query.dim()}-D) and {name} {tuple(t.shape)} ({t.dim()}-D)",
                f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found {key.dim()}-D "
                f"and {value.dim()}-D tensors respectively",
            )
    batched = query.dim() == 3
    if batched:
        b = 0 if batch_first else 1
        layout = "(B, L, E)" if batch_first else "(L, B, E)"
        for name, t in (("key", key), ("value", value)):
            if t.shape[b] != query.shape[b]:
                # the other layout's batch dim agrees: seq-first inputs to a batch-first module (or back)
                hint = layout_hint(batch_first) if t.shape[1 - b] == query.shape[1 - b] else ""
                raise ValueError(
                    f"query and {name} must have the same batch size (dim {b} of {layout} with "
                    f"batch_first={batch_first}), got query {tuple(query.shape)} and {name} {tuple(t.shape)}{hint}"
                )
    for name, t, dim in (("query", query, embed_dim), ("key", key, kdim), ("value", value, vdim)):
        if t.shape[-1] != dim:
            what = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
            ours = f"{name}'s last dimension must be {what}={dim}, got {name} of shape {tuple(t.shape)}"
            theirs = f"was expecting embedding dimension of {dim}, but got {t.shape[-1]}" if name == "query" else None
            raise shape_error(ours, theirs)
    s = -2 if not batched or batch_first else 0
    if key.shape[s] != value.shape[s]:
        theirs = f"key shape {key.shape} does not match value shape {value.shape}"
        if kdim != embed_dim or vdim != embed_dim:
            theirs = f"key's sequence and batch dims {key.shape[:-1]} do not match value's {value.shape[:-1]}"
        raise shape_error(
            f"key and value must have the same sequence length, got key {tuple(key.shape)} and value {tuple(value.shape)}",
            theirs,
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.device != param.device:
            raise ValueError(
                f"{name} is on device {t.device} but the module's parameters are on {param.device}; "
                f"move one of them (module.to({str(t.device)!r}) or {name}.to({str(param.device)!r}))"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(
                f"{name} has dtype {t.dtype} but the module's parameters have dtype {param.dtype}; "
                f"cast one of them (module.to({t.dtype}) or {name}.to({param.dtype})), or run under torch.autocast"
            )
    return batched


def _well_formed(query, key, value, embed_dim: int, kdim: int, vdim: int, batch_first: bool, param: Tensor) -> bool:
    """The common case in one expression (small calls notice the cost of the checks): tensors of 2 or 3
    dimensions with the expected feature sizes, matching batch and key lengths, and the parameters'
    dtype and device. False sends the call through the checks that say what is wrong (or that let
    autocast's dtypes through)."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return False
    qs, ks, vs = query.shape, key.shape, value.shape
    n = len(qs)
    batch = 0 if batch_first else 1  # of 3-D inputs
    seq = -2 if n == 2 or batch_first else 0
    dtype, device = param.dtype, param.device
    return (
        (n == 3 or n == 2)
        and len(ks) == n
        and len(vs) == n
        and (qs[-1], ks[-1], vs[-1]) == (embed_dim, kdim, vdim)
        and ks[seq] == vs[seq]
        and (n == 2 or qs[batch] == ks[batch] == vs[batch])
        and query.dtype == key.dtype == value.dtype == dtype
        and dtype.is_floating_point
        and query.device == key.device == value.device == device
    )


def check_cache_call(kv_cache, attn_mask, key_padding_mask, weights, add_zero_attn: bool, batched: bool) -> None:
    """With a KV cache the cache decides what each query sees (causal over everything cached)."""
    if attn_mask is not None or key_padding_mask is not None:
        raise ValueError(
            "attn_mask and key_padding_mask are not supported with kv_cache: the cache attends causally over "
            "each sequence's cached keys; set per-sequence lengths on the cache instead"
        )
    if weights.bias_k is not None or add_zero_attn:
        raise ValueError("kv_cache does not support add_bias_kv or add_zero_attn (they add a key at every step)")
    if not batched:
        raise ValueError("kv_cache needs batched inputs (B, L, E); got unbatched 2-D inputs")


def check_window(window) -> tuple[int | None, int | None] | None:
    """Normalise `window`: an int w means (w, 0), a look-back of w keys; (left, right) with None for
    an unbounded side."""
    if window is None:
        return None
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, 0)
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0) for w in window)
    ):
        raise ValueError(f"window must be an int >= 0 or a pair (left, right) of ints >= 0 or None, got {window!r}")
    return (window[0], window[1])
