"""Variable-length batches: skip padding behind `key_padding_mask`, and take nested tensors.

Two entries, each one `if` in `functional.multi_head_attention`:

- `nested_attention`: query/key/value nested tensors (strided, as `nn.TransformerEncoder` makes them
  in eval, or `layout=torch.jagged`), (B, L_i, E) each. They are padded to a dense batch with a bool
  key padding mask, attended like any padded batch (so the packed path below serves them), and the
  output is nested again in the input's layout: exactly torch's per-sequence attention.
- `packed_attention`: a dense batch whose bool `key_padding_mask` hides at least `PACK_MIN_SHARE` of
  the keys. Only the valid keys are projected (the key/value projections of padded tokens are
  skipped) and each sequence attends over its own valid keys; every query row is kept, so a padded
  query row still attends to the real keys, as in torch. Exact: dropping a key whose score is -inf
  changes nothing. A sequence with no valid key gives zero rows (and zero weights). Causal/window
  bands keep the keys' original positions (a slice shifts the band's offset; scattered padding
  gathers the band's columns), RoPE rotates each key at its original position, a dense `attn_mask`
  is sliced or gathered by columns, GQA and dropout are the backends' own. Weights come back (B, L, S)
  or (B, H, L, S) with zero columns at the padding (O(B*L*S), like the weights path).

On CUDA, fp16/bf16 calls with no band, dense mask, dropout or weights go to
`torch.nn.attention.varlen.varlen_attn` (`cu_seq_q` over every query row, `cu_seq_k` over the valid
keys); everything else loops over sequences through the ordinary dispatch table.

Notation: B batch, L query length, S key length, T valid keys in the batch, E embed dim, H heads,
Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attend as backends
from .masks import AttentionMask

if TYPE_CHECKING:
    from .functional import Projections
    from .rotary import RotaryEmbedding

__all__ = ["PACK_MIN_SHARE", "is_nested", "nested_attention", "not_supported_reasons", "packed_attention"]

#: Share of the keys (B*S) the key padding mask must hide for the packed path to serve a dense call.
#: Derivation: the padded floor's work is 4 units of projections (B*L*E*E each: q, k, v, out) plus
#: 2S/E units of attention; packing saves the share p of the k, v projections and of the attention,
#: (2 + 2S/E) / (4 + 2S/E) of the work (0.75 at S = 2E), and costs one gather of the valid key rows,
#: one concatenation of the outputs and B kernel calls instead of one, independent of p. Measured
#: (torch 2.13 CPU, one thread, B=8, E=512, H=8, L=1024, `python -m multihead bench --scenarios
#: varlen_threshold`, ours forced to pack / padded floor, median (min, max) of 5 paired rounds):
#: 0 %: 1.07 (0.96, 1.39); 3.1 %: 0.96 (0.85, 1.01); 6.25 %: 0.96 (0.89, 1.12); 12.5 %: 0.94 (0.91,
#: 1.06); 25 %: 0.83 (0.74, 0.89). Packing breaks even by ~3 %; 1/16 leaves a margin for the noise,
#: so a call with less padding stays on the padded path (never slower than it).
PACK_MIN_SHARE: float = 1 / 16

#: Below this many attention score elements (B*L*S) per call the per-sequence kernel calls cost more
#: than the padding they skip (one SDPA call's fixed cost is ~20-50 us on one core, the work of ~1e5
#: score elements at E=512); the packed path then declines.
PACK_MIN_ELEMENTS: int = 2**16


# ---- nested tensors ---------------------------------------------------------------------------------
def is_nested(query: Any, key: Any, value: Any) -> bool:
    """Whether any of the inputs is a nested tensor (then all must be: checked in nested_attention)."""
    return any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value))


def nested_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: Projections,
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    need_weights: bool,
    average_attn_weights: bool,
    kv_cache: Any,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Attention over nested query (B, L_i, E), key (B, S_i, kdim), value (B, S_i, vdim).

    Returns the output as a nested tensor of (L_i, E) in the query's layout, and with need_weights
    the weights as a strided nested tensor of (L_i, S_i) (or (H, L_i, S_i) per sequence with
    average_attn_weights=False; strided because a jagged tensor has one ragged dimension only).
    Other arguments as `functional.multi_head_attention` (is_causal: causal within each sequence).
    """
    from .functional import multi_head_attention  # functional imports this module

    _check_nested(query, key, value, key_padding_mask, attn_mask, kv_cache)
    q_lens = _lengths(query)  # (B,) python ints
    k_lens = _lengths(key)
    padded_q = query.to_padded_tensor(0.0)  # (B, L, E)
    # identity decides the fused projections: keep it through the padding
    padded_k = padded_q if key is query else key.to_padded_tensor(0.0)  # (B, S, kdim)
    padded_v = padded_k if value is key else value.to_padded_tensor(0.0)  # (B, S, vdim)
    positions = torch.arange(padded_k.shape[1], device=padded_k.device)
    padding = positions[None, :] >= torch.tensor(k_lens, device=padded_k.device)[:, None]  # (B, S) True = pad
    out, attn = multi_head_attention(
        padded_q,
        padded_k,
        padded_v,
        weights,
        key_padding_mask=padding,
        attn_mask=None,
        need_weights=need_weights,
        average_attn_weights=average_attn_weights,
        batch_first=True,
        **kwargs,
    )  # (B, L, E), (B, L, S) | (B, H, L, S) | None
    nested_out = torch.nested.as_nested_tensor([out[b, :n] for b, n in enumerate(q_lens)], layout=query.layout)
    if attn is None:
        return nested_out, None
    per_seq = [attn[b, ..., :n, :m] for b, (n, m) in enumerate(zip(q_lens, k_lens))]  # (L_i, S_i) | (H, L_i, S_i)
    return nested_out, torch.nested.as_nested_tensor(per_seq, layout=torch.strided)


def _lengths(x: Tensor) -> list[int]:
    """Per-sequence lengths of a nested (B, L_i, ·) tensor."""
    if x.layout == torch.jagged:
        return x.offsets().diff().tolist()  # type: ignore[attr-defined]
    return x._nested_tensor_size()[:, 0].tolist()


def _check_nested(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Any, attn_mask: Any, kv_cache: Any
) -> None:
    names = ("query", "key", "value")
    tensors = (query, key, value)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    nested = [n for n, t in zip(names, tensors) if t.is_nested]
    if len(nested) != 3:
        dense = [n for n in names if n not in nested]
        raise ValueError(
            f"query, key and value must be all nested tensors or all dense: {', '.join(nested)} nested, "
            f"{', '.join(dense)} dense; convert with torch.nested.as_nested_tensor(...) or .to_padded_tensor(0.0) "
            "(then pass key_padding_mask)"
        )
    layouts = {t.layout for t in tensors}
    if len(layouts) != 1:
        raise ValueError(
            f"query, key and value must be nested tensors of one layout, got {[str(t.layout) for t in tensors]}"
        )
    for name, t in zip(names, tensors):
        if t.dim() != 3:
            raise ValueError(f"{name} must be a nested tensor of (B, L_i, E) sequences (3 dims), got {t.dim()} dims")
    if len({t.size(0) for t in tensors}) != 1:
        raise ValueError(
            f"query, key and value must hold the same number of sequences, got {[t.size(0) for t in tensors]}"
        )
    if _lengths(key) != _lengths(value):
        raise ValueError(
            f"key and value must have the same sequence lengths, got {_lengths(key)} and {_lengths(value)}"
        )
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask must be None with nested inputs: a nested tensor holds only the real tokens "
            "(pass the padded dense batch instead to use a key_padding_mask)"
        )
    if attn_mask is not None:
        raise ValueError(
            "attn_mask must be None with nested inputs (sequences differ in length; is_causal=True gives a causal "
            "mask within each sequence); pass the padded dense batch with key_padding_mask to use an attn_mask"
        )
    if kv_cache is not None:
        raise ValueError("kv_cache must be None with nested inputs; decode with dense (B, L, E) inputs")


# ---- the packed path for dense padded batches ---------------------------------------------------------
def not_supported_reasons(
    query: Tensor,
    mask: AttentionMask,
    *,
    backend: str | None,
    has_bias_kv: bool,
    add_zero_attn: bool,
    kv_cache: Any,
) -> list[str]:
    """Why the packed path does not serve this call (empty: it does). query (B, L, E) dense."""
    kp = mask.key_padding
    if kp is None:
        return ["no key_padding_mask"]
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # before any shape test: no guard, no recompile
        return ["under torch.compile, export or tracing (the lengths are values, read on the host)"]
    reasons = []
    if kp.dtype != torch.bool:
        reasons.append("key_padding_mask is float (only a bool mask says which keys to drop)")
    if backend is not None:
        reasons.append(f"backend {backend!r} is forced")
    if kv_cache is not None:
        reasons.append("decoding with a kv_cache")
    if has_bias_kv or add_zero_attn:
        reasons.append("add_bias_kv/add_zero_attn append keys")
    if not query.is_floating_point():
        reasons.append(f"needs floating-point inputs, got {query.dtype}")
    if mask.dense is not None and mask.dense.requires_grad:
        reasons.append("a float attn_mask that requires grad")
    elements = mask.batch * mask.q_len * mask.k_len
    if elements < PACK_MIN_ELEMENTS:
        reasons.append(f"B*L*S = {elements} score elements < PACK_MIN_ELEMENTS = {PACK_MIN_ELEMENTS}")
    if reasons:
        return reasons
    share = float(kp.sum()) / kp.numel()  # one read of the mask (a device sync on accelerators)
    if share < PACK_MIN_SHARE:
        reasons.append(f"the key padding hides {share:.1%} of the keys < PACK_MIN_SHARE = {PACK_MIN_SHARE:.1%}")
    return reasons


def serves(query: Tensor, mask: AttentionMask, backend: str | None, has_bias_kv: bool, add_zero_attn: bool) -> bool:
    """Whether `packed_attention` takes this dense call (see `not_supported_reasons`)."""
    kp = mask.key_padding
    if kp is None or kp.dtype != torch.bool or mask.batch * mask.q_len * mask.k_len < PACK_MIN_ELEMENTS:
        return False  # the common cases, decided without building reasons (small calls stay cheap)
    return not not_supported_reasons(
        query, mask, backend=backend, has_bias_kv=has_bias_kv, add_zero_attn=add_zero_attn, kv_cache=None
    )


def packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: Projections,
    mask: AttentionMask,
    *,
    shared: str | None,
    num_heads: int,
    num_kv_heads: int,
    need_weights: bool,
    average_attn_weights: bool,
    dropout_p: float,
    rotary: RotaryEmbedding | None,
    batched: bool,
    batch_first: bool,
    out_proj: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The whole attention of a padded batch over its valid keys only: query (B, L, E),
    key (B, S, kdim), value (B, S, vdim) (views, batch first), `mask` built from the user's masks.
    Returns what `multi_head_attention` returns (out in the caller's layout, weights | None); the
    output projection as there (`out_proj`, called as a module)."""
    B, L, E = query.shape
    S = key.shape[1]
    D = E // num_heads
    kv_dim = num_kv_heads * D
    assert mask.key_padding is not None  # serves() checked it
    valid = ~mask.key_padding  # (B, S) True = a key to keep
    counts = valid.sum(1).tolist()  # S_b per sequence, on the host
    rows, cols = valid.nonzero(as_tuple=True)  # (T,) each, row-major: sequences in order
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    # contiguous padding (right, left, or both ends): a slice [lo, lo + S_b); else a gather
    index = torch.arange(S, device=valid.device)
    first = torch.where(valid, index, S).amin(1).tolist()  # (B,) first valid key
    last = torch.where(valid, index, -1).amax(1).tolist()  # (B,) last valid key
    spans = [(lo, hi + 1) if n and hi + 1 - lo == n else None for lo, hi, n in zip(first, last, counts)]

    # ---- projections: every query row, only the valid keys ----
    w_q, w_k, w_v, b_q, b_k, b_v = _split_weights(weights, E, kv_dim)
    q = F.linear(query, w_q, b_q)  # (B, L, E)
    keys = _pack(key, rows, cols, spans, counts)  # (T, kdim): the valid tokens, packed
    if shared in ("qkv", "kv"):  # one matmul for key and value
        w_kv = torch.cat([w_k, w_v]) if weights.in_proj_weight is None else weights.in_proj_weight[E:]
        b_kv = None if b_k is None else torch.cat([b_k, b_v])
        k, v = F.linear(keys, w_kv, b_kv).split([kv_dim, kv_dim], dim=-1)  # (T, Hkv*D) x2
    else:
        k, v = F.linear(keys, w_k, b_k), F.linear(_pack(value, rows, cols, spans, counts), w_v, b_v)
    q = q.unflatten(-1, (num_heads, D)).transpose(1, 2)  # (B, H, L, D)
    k = k.unflatten(-1, (num_kv_heads, D)).transpose(0, 1).unsqueeze(0)  # (1, Hkv, T, D)
    v = v.unflatten(-1, (num_kv_heads, D)).transpose(0, 1).unsqueeze(0)
    if rotary is not None:  # keys keep their positions in the padded sequence
        q = rotary(q, torch.arange(L, device=q.device), max_position=L - 1)
        k = rotary(k, cols, max_position=S - 1)

    if _varlen_kernel_serves(q, mask, dropout_p, need_weights, counts):
        out = _varlen_kernel(q, k, v, counts, scale=D**-0.5)  # (B, H, L, D)
        attn = None
    else:
        out, attn = _per_sequence(
            q, k, v, mask, counts, starts, spans, cols, dropout_p, need_weights, average_attn_weights
        )

    from .functional import finish  # functional imports this module

    return finish(out, attn, weights, out_proj, batched=batched, batch_first=batch_first)


def _pack(x: Tensor, rows: Tensor, cols: Tensor, spans: list[tuple[int, int] | None], counts: list[int]) -> Tensor:
    """The valid rows of x (B, S, F) packed to (T, F): slices when every sequence's keys are
    contiguous (a cheap backward), one gather otherwise."""
    if any(counts) and all(span is not None or n == 0 for span, n in zip(spans, counts)):
        return torch.cat([x[b, span[0] : span[1]] for b, span in enumerate(spans) if span is not None])
    return x[rows, cols]


def _per_sequence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    counts: list[int],
    starts: list[int],
    spans: list[tuple[int, int] | None],
    cols: Tensor,
    dropout_p: float,
    need_weights: bool,
    average_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """Each sequence over its own keys through the dispatch table. q (B, H, L, D), k/v (1, Hkv, T, D)
    -> out (B, H, L, D), weights (B, L, S) | (B, H, L, S) | None with zero columns at the padding."""
    B, H, L, D = q.shape
    S = mask.k_len
    band = mask.band(0, L, q.device) if mask.has_band else None  # (L, S) bool, for gathered columns
    outs = []
    attn = None
    if need_weights:
        attn = q.new_zeros((B, L, S) if average_weights else (B, H, L, S))
    for b in range(B):
        n = counts[b]
        if n == 0:  # no valid key: zero rows (the CPU flash op would crash on S = 0)
            outs.append(q.new_zeros(1, H, L, D))
            continue
        q_b = q[b : b + 1]  # (1, H, L, D)
        k_b = k[:, :, starts[b] : starts[b + 1]]  # (1, Hkv, S_b, D)
        v_b = v[:, :, starts[b] : starts[b + 1]]
        m_b = _sequence_mask(mask, b, spans[b], cols[starts[b] : starts[b + 1]], band, H, L, n)
        chosen = backends.choose(q_b, k_b, v_b, m_b, need_weights=need_weights)
        o_b, w_b = chosen.attend(
            q_b,
            k_b,
            v_b,
            m_b,
            scale=D**-0.5,
            dropout_p=dropout_p,
            need_weights=need_weights,
            average_weights=average_weights,
        )  # (1, H, L, D), (1, L, S_b) | (1, H, L, S_b) | None
        outs.append(o_b)
        if attn is not None:
            span = spans[b]
            if span is not None:
                attn[b, ..., span[0] : span[1]] = w_b[0]
            else:
                attn[b, ..., cols[starts[b] : starts[b + 1]]] = w_b[0]
    return torch.cat(outs), attn


def _sequence_mask(
    mask: AttentionMask,
    b: int,
    span: tuple[int, int] | None,
    cols: Tensor,
    band: Tensor | None,
    heads: int,
    q_len: int,
    k_len: int,
) -> AttentionMask:
    """The mask of sequence b over its kept keys: structured (band offset shifted) for a slice,
    dense (band columns gathered) otherwise."""
    dense = mask.dense
    if dense is not None:
        dense = dense[b : b + 1] if dense.shape[0] > 1 else dense  # (1, 1|H, L, S)
        dense = dense[..., span[0] : span[1]] if span is not None else dense[..., cols]  # (1, 1|H, L, S_b)
    if span is not None:
        return AttentionMask(
            1,
            heads,
            q_len,
            k_len,
            causal=mask.causal,
            offset=mask.offset - span[0],
            window=mask.window,
            dense=dense,
            device=mask.device,
        )
    if band is not None:  # the band at the kept columns, merged into the dense part
        hidden = band[:, cols][None, None]  # (1, 1, L, S_b)
        if dense is None:
            dense = hidden
        elif dense.dtype == torch.bool:
            dense = dense | hidden
        else:
            dense = dense.masked_fill(hidden, float("-inf"))
    return AttentionMask(1, heads, q_len, k_len, dense=dense, device=mask.device)


def _split_weights(w: Projections, embed_dim: int, kv_dim: int) -> tuple[Any, ...]:
    """(w_q, w_k, w_v, b_q, b_k, b_v), biases cast to the weights' dtype (None without bias)."""
    if w.in_proj_weight is not None:
        w_q, w_k, w_v = w.in_proj_weight.split([embed_dim, kv_dim, kv_dim])
    else:
        w_q, w_k, w_v = w.q_proj_weight, w.k_proj_weight, w.v_proj_weight
    if w.in_proj_bias is None:
        return w_q, w_k, w_v, None, None, None
    b_q, b_k, b_v = w.in_proj_bias.to(w_q.dtype).split([embed_dim, kv_dim, kv_dim])
    return w_q, w_k, w_v, b_q, b_k, b_v


# ---- CUDA: flash-attn's varlen kernel ---------------------------------------------------------------
def _varlen_kernel_serves(
    q: Tensor, mask: AttentionMask, dropout_p: float, need_weights: bool, counts: list[int]
) -> bool:
    """`varlen_attn` applies: CUDA, fp16/bf16, no band (its causal is bottom-right per sequence, ours
    keeps the padded positions), no dense mask, no dropout, no weights, every sequence with a key."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and not mask.has_band
        and mask.dense is None
        and dropout_p == 0.0
        and not need_weights
        and min(counts, default=0) > 0
    )


def _varlen_kernel(q: Tensor, k: Tensor, v: Tensor, counts: list[int], *, scale: float) -> Tensor:
    """q (B, H, L, D), k/v (1, Hkv, T, D) -> out (B, H, L, D) via `varlen_attn` (CUDA only)."""
    from torch.nn.attention.varlen import varlen_attn

    B, H, L, D = q.shape
    q_packed = q.transpose(1, 2).reshape(B * L, H, D)  # (B*L, H, D): every query row
    k_packed = k[0].transpose(0, 1).contiguous()  # (T, Hkv, D)
    v_packed = v[0].transpose(0, 1).contiguous()
    cu_q = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=q.device)  # (B+1,)
    cu_k = F.pad(torch.tensor(counts, device=q.device).cumsum(0), (1, 0)).to(torch.int32)  # (B+1,)
    out = varlen_attn(
        q_packed, k_packed, v_packed, cu_q, cu_k, L, max(counts), scale=scale, enable_gqa=k.shape[1] != H
    )  # (B*L, H, D)
    assert isinstance(out, Tensor)
    return out.view(B, L, H, D).transpose(1, 2)
