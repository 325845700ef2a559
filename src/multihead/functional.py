"""`multi_head_attention`: validate -> project -> split heads -> attend -> merge -> project out.

Notation: B batch, L query length, S key length, E embed dim, H heads, Hkv key/value heads,
D head dim (E // H).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attend as backends
from . import varlen
from .attend import direct
from .masks import AttentionMask, build_mask
from .validation import check_cache_call, check_inputs

if TYPE_CHECKING:
    from .cache import KVCache
    from .rotary import RotaryEmbedding


class Projections(NamedTuple):
    """The module's weights, in torch's layout. Either `in_proj_weight` (E + 2*Hkv*D, E) or the three
    separate `q/k/v_proj_weight` ((E, E), (Hkv*D, kdim), (Hkv*D, vdim)) are set."""

    in_proj_weight: Tensor | None
    q_proj_weight: Tensor | None
    k_proj_weight: Tensor | None
    v_proj_weight: Tensor | None
    in_proj_bias: Tensor | None  # (E + 2*Hkv*D,)
    bias_k: Tensor | None  # (1, 1, Hkv*D)
    bias_v: Tensor | None  # (1, 1, Hkv*D)
    out_proj_weight: Tensor  # (E, E)
    out_proj_bias: Tensor | None  # (E,)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: Projections,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    add_zero_attn: bool = False,
    batch_first: bool = True,
    backend: str | None = None,
    rotary: RotaryEmbedding | None = None,
    window: tuple[int | None, int | None] | None = None,
    kv_cache: KVCache | None = None,
    out_proj: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention with `torch.nn.MultiheadAttention`'s semantics.

    query (B, L, E), key (B, S, kdim), value (B, S, vdim) when batch_first, else (L, B, E) etc.;
    2-D inputs are unbatched. Returns (out, weights): out like query; weights (B, L, S) averaged
    over heads, (B, H, L, S) with average_attn_weights=False, None with need_weights=False.

    rotary: rotary position embedding applied to q and k per head (positions 0.. or, with a cache,
        continuing each sequence). window: (left, right) keys each query may see around its
        diagonal (None = unbounded). kv_cache: keys/values of earlier steps; the new tokens are
        appended and attend causally (bottom-right) to everything cached.
    out_proj: the module's output projection, called as a module (its hooks fire, e.g. FSDP2's);
        default `F.linear` with `weights.out_proj_weight`/`out_proj_bias`.
    """
    num_kv_heads = num_kv_heads or num_heads
    if varlen.is_nested(query, key, value):  # ---- nested tensors: padded, attended, nested again (varlen.py)
        return varlen.nested_attention(
            query, key, value, weights, num_heads=num_heads, num_kv_heads=num_kv_heads,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal, dropout_p=dropout_p,
            add_zero_attn=add_zero_attn, backend=backend, rotary=rotary, window=window, kv_cache=kv_cache,
            out_proj=out_proj,
        )  # fmt: skip
    embed_dim = weights.out_proj_weight.shape[0]
    head_dim = embed_dim // num_heads
    packed = weights.in_proj_weight is not None
    kdim = vdim = embed_dim
    if not packed:  # Projections: without in_proj_weight, the three separate weights are set
        assert weights.k_proj_weight is not None and weights.v_proj_weight is not None
        kdim, vdim = weights.k_proj_weight.shape[1], weights.v_proj_weight.shape[1]
    batched = check_inputs(
        query,
        key,
        value,
        embed_dim=embed_dim,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
        param=weights.out_proj_weight,
    )
    if kv_cache is not None:
        check_cache_call(kv_cache, attn_mask, key_padding_mask, weights, add_zero_attn, batched)

    # identity is what allows one fused projection: decide it before any reshaping
    shared = "qkv" if query is key and key is value else "kv" if key is value else None
    if not batched:  # treat (L, E) as a batch of one, sequence first
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    # projections run in the inputs' own layout (no copy of a transposed input), heads split as views
    seq_first = not (batched and batch_first)  # (L, B, E), else (B, L, E)
    q_len, batch = query.shape[:2] if seq_first else query.shape[1::-1]
    k_len = key.shape[0 if seq_first else 1]

    if kv_cache is None:
        mask = build_mask(
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            batch=batch,
            heads=num_heads,
            q_len=q_len,
            k_len=k_len,
            batched=batched,
            device=query.device,
            window=window,
            batch_first=batch_first,
        )

    if kv_cache is None and varlen.serves(query, mask, backend, weights.bias_k is not None, add_zero_attn):
        # ---- a padded batch: only the valid keys are projected and attended (varlen.py)
        bf = (lambda t: t.transpose(0, 1)) if seq_first else (lambda t: t)  # varlen takes (B, L, E) views
        return varlen.packed_attention(
            bf(query), bf(key), bf(value), weights, mask, shared=shared, num_heads=num_heads,
            num_kv_heads=num_kv_heads, need_weights=need_weights, average_attn_weights=average_attn_weights,
            dropout_p=dropout_p, rotary=rotary, batched=batched, batch_first=batch_first, out_proj=out_proj,
        )  # fmt: skip
    # (B, H, L, D), (B, Hkv, S, D) x2: views of the projections' outputs
    # with weights, a call the direct backend serves runs batched GEMMs over B*H: distinct batch-first
    # q, k, v are projected in (L, B, E) layout, where (B, H) merge into one batch dimension without a copy
    merge = (
        need_weights
        and shared is None
        and not seq_first
        and direct.fits_one_tile(batch, num_heads, q_len, k_len, query.element_size(), query.device)
    )
    q, k, v = _project_heads(
        query, key, value, weights, shared, num_heads, num_kv_heads, head_dim, seq_first, merge_heads=merge
    )

    if kv_cache is not None:  # positions continue each sequence; keys/values join the cache
        if rotary is not None:  # one table lookup for both; the cache bounds positions (no read)
            start = kv_cache.common_length()  # eager, equal lengths: an int, so no position tensors
            positions = start if start is not None else kv_cache.positions(q_len)  # (B, L)
            q, k = rotary.rotate_qk(q, k, positions, max_position=kv_cache.max_len - 1)
        # S = max_len under compile, the longest cached sequence in eager; hidden None: nothing hidden
        k, v, hidden = kv_cache.update(k, v, window=window)  # (B, Hkv, S, D) x2, (B, 1, L, S) | None
        if _compiled_inference_on_cpu(q, need_weights, dropout_p, backend):
            out = kv_cache.attend(q, scale=head_dim**-0.5, window=window)  # only the filled keys (cache.py)
            return finish(out, None, weights, out_proj, batched=batched, batch_first=batch_first)
        mask = AttentionMask(batch, num_heads, q_len, k.shape[2], dense=hidden, device=query.device)
    elif rotary is not None and q_len == k_len:
        q, k = rotary.rotate_qk(q, k, 0)  # positions 0 .. L-1
    elif rotary is not None:
        q = rotary(q, torch.arange(q_len, device=q.device), max_position=q_len - 1)
        k = rotary(k, torch.arange(k_len, device=k.device), max_position=k_len - 1)
    if weights.bias_k is not None:
        assert weights.bias_v is not None  # bias_k and bias_v come together
        k = torch.cat(
            [k, _heads(weights.bias_k.to(k.dtype), num_kv_heads).expand(batch, -1, -1, -1)], dim=2
        )  # (B, Hkv, S+1, D)
        v = torch.cat([v, _heads(weights.bias_v.to(v.dtype), num_kv_heads).expand(batch, -1, -1, -1)], dim=2)
        mask = mask.pad_keys(1)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, num_kv_heads, 1, head_dim)], dim=2)  # (B, Hkv, S+1, D)
        v = torch.cat([v, v.new_zeros(batch, num_kv_heads, 1, head_dim)], dim=2)
        mask = mask.pad_keys(1)

    # a cache step's key length grows every call: nothing worth remembering
    chosen = backends.choose(q, k, v, mask, need_weights=need_weights, backend=backend, remember=kv_cache is None)
    if getattr(chosen, "contiguous_inputs", False):  # copied here, the views' projection buffer is freed
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, attn = chosen.attend(
        q,
        k,
        v,
        mask,
        scale=head_dim**-0.5,
        dropout_p=dropout_p,
        need_weights=need_weights,
        average_weights=average_attn_weights,
    )  # (B, H, L, D), (B, L, S) | (B, H, L, S) | None

    return finish(out, attn, weights, out_proj, batched=batched, batch_first=batch_first)


def finish(
    out: Tensor,
    attn: Tensor | None,
    weights: Projections,
    out_proj: Callable[[Tensor], Tensor] | None,
    *,
    batched: bool,
    batch_first: bool,
) -> tuple[Tensor, Tensor | None]:
    """The attention output (B, H, L, D) -> the module's output in the caller's layout, and the
    weights (unbatched: without their batch dimension). Every path ends here (this function, the
    packed varlen path, the decoder layer's `memory_kv`)."""
    batch, heads, q_len, head_dim = out.shape
    embed_dim = heads * head_dim
    # torch's memory layout, (L, B, E) whatever batch_first says: a dropout applied to our output
    # (as in nn.TransformerEncoderLayer) then draws its mask in the same order as torch's
    out = out.permute(2, 0, 1, 3).reshape(q_len * batch, embed_dim)  # (L*B, E)
    if out_proj is not None:  # called on (L*B, E) as torch does: its output is not a view (FSDP2 hooks it)
        out = out_proj(out).view(q_len, batch, embed_dim)
    else:
        out_bias = _bias_like(weights.out_proj_bias, weights.out_proj_weight)
        out = F.linear(out, weights.out_proj_weight, out_bias).view(q_len, batch, embed_dim)
    # the returned output is never a view (in-place ops on it stay safe, FSDP2 included): clone
    # keeps the (L, B, E) strides
    if not batched:
        return out.squeeze(1).clone(), attn.squeeze(0) if attn is not None else None  # (L, E)
    if batch_first:
        out = out.transpose(0, 1)  # (B, L, E), (L, B, E) strides
    return out.clone(), attn


def _project_heads(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    w: Projections,
    shared: str | None,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seq_first: bool,
    *,
    merge_heads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Input projections, fused where the inputs allow (one matmul for self-attention, two when key
    is value), with heads split as views: (B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D).

    merge_heads: the projections of distinct batch-first inputs run on (L, B, ·) copies of them, as torch's
    module does, so each of q, k, v is laid out as (L, B, E) in memory, where a (B, H, L, D) view's B
    and H merge (`reshape(B*H, L, D)` is a view). That copies each input (rows of E elements) where
    the direct backend would copy each split head (rows of D): measured 3-4 % faster on the page's
    example 1 with weights. (The fused self-attention projection gains nothing from it: it stays.)"""
    embed_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    weight = w.in_proj_weight if w.in_proj_weight is not None else w.q_proj_weight
    assert weight is not None  # Projections: in_proj_weight or the three separate weights are set
    bias = _bias_like(w.in_proj_bias, weight)  # mixed parameter dtypes: the weights' dtype
    if w.in_proj_weight is not None and shared == "qkv" and kv_heads == heads:  # the common self-attention
        qkv = F.linear(query, w.in_proj_weight, bias)  # (L, B, 3E) seq first, else (B, L, 3E)
        qkv = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, head_dim)
        q, k, v = (qkv.permute(2, 1, 3, 0, 4) if seq_first else qkv.permute(2, 0, 3, 1, 4)).unbind(0)
        return q, k, v
    if merge_heads and shared is None and not seq_first:  # (B, L, ·) -> (L, B, ·): projections come out seq first
        # (copied here, not inside F.linear: on a strided input its kernel depends on requires_grad)
        query, key, value = (t.transpose(0, 1).contiguous() for t in (query, key, value))
        seq_first = True
    sizes = [embed_dim, kv_dim, kv_dim]
    b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(sizes)
    if w.in_proj_weight is not None and shared == "qkv":
        q, k, v = F.linear(query, w.in_proj_weight, bias).split(sizes, dim=-1)
    elif w.in_proj_weight is not None and shared == "kv":
        b_kv = None if bias is None else bias[embed_dim:]
        k, v = F.linear(key, w.in_proj_weight[embed_dim:], b_kv).split([kv_dim, kv_dim], dim=-1)
        q = F.linear(query, w.in_proj_weight[:embed_dim], b_q)
    else:
        if w.in_proj_weight is not None:
            w_q, w_k, w_v = w.in_proj_weight.split(sizes)
        else:  # Projections: without in_proj_weight, the three separate weights are set
            assert w.q_proj_weight is not None and w.k_proj_weight is not None and w.v_proj_weight is not None
            w_q, w_k, w_v = w.q_proj_weight, w.k_proj_weight, w.v_proj_weight
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    return (
        _split_heads(q, heads, head_dim, seq_first),
        _split_heads(k, kv_heads, head_dim, seq_first),
        _split_heads(v, kv_heads, head_dim, seq_first),
    )


def _compiled_inference_on_cpu(q: Tensor, need_weights: bool, dropout_p: float, backend: str | None) -> bool:
    """A cache call `KVCache.attend` serves: under torch.compile (not an exporter, which needs plain
    ops), on the CPU, gradients off, no weights, no dropout, no forced backend."""
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and q.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not need_weights
        and dropout_p == 0.0
        and backend is None
    )


def _bias_like(bias: Tensor | None, weight: Tensor) -> Tensor | None:
    """A bias in its weight's dtype (a float64 module with a float16 bias works in both layouts)."""
    return bias if bias is None or bias.dtype == weight.dtype else bias.to(weight.dtype)


def _split_heads(t: Tensor, heads: int, head_dim: int, seq_first: bool) -> Tensor:
    """(L, B, heads*D) when seq_first, else (B, L, heads*D) -> (B, heads, L, D), a view."""
    t = t.view(t.shape[0], t.shape[1], heads, head_dim)
    return t.permute(1, 2, 0, 3) if seq_first else t.transpose(1, 2)


def _heads(bias: Tensor, num_kv_heads: int) -> Tensor:
    """(1, 1, Hkv*D) learned key/value bias -> (1, Hkv, 1, D)."""
    return bias.view(1, num_kv_heads, 1, -1)
