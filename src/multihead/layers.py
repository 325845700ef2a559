"""Transformer layers built on our `MultiheadAttention`, with `torch.nn.Transformer*Layer`'s interface.

`TransformerEncoderLayer` is the reference page's example 4 as a class: self-attention + residual +
LayerNorm, then a feed-forward block + residual + LayerNorm (post-norm; `norm_first=True` for
pre-norm). `TransformerDecoderLayer` adds cross-attention over an encoder's output (`memory`) and,
for incremental decoding, a `KVCache` for its self-attention and the memory's keys/values projected
once (`project_memory`).

Parameter names, shapes and the order of operations are torch's (`self_attn.*`, `linear1`,
`dropout`, `linear2`, `norm1`, `norm2`, `dropout1`, `dropout2`, and for the decoder
`multihead_attn.*`, `norm3`, `dropout3`), so a state_dict moves both ways and, with the same weights,
the outputs are torch's (where torch's are not NaN: a fully masked row gives zeros here). These are
their own classes, not subclasses of torch's: torch's `TransformerEncoder` would otherwise hand them
nested tensors and run its fused kernel on their weights. Defaults are torch's except
`batch_first=True`, as the reference page documents.

Notation: B batch, L target length, S source (memory) length, E = d_model, H heads, Hkv key/value
heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attend as backends
from .cache import KVCache
from .functional import finish
from .masks import build_mask
from .module import MultiheadAttention
from .rotary import RotaryEmbedding

__all__ = ["MemoryKV", "TransformerDecoderLayer", "TransformerEncoderLayer"]

Activation = str | Callable[[Tensor], Tensor]
Window = int | tuple[int | None, int | None] | None


def _activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(f'activation must be "relu", "gelu" or a callable, got {activation!r}')
    if not callable(activation):
        raise TypeError(f'activation must be "relu", "gelu" or a callable, got {type(activation).__name__}')
    return activation


class _FeedForward:
    """The feed-forward block and the torch-layer conventions both layers share."""

    linear1: nn.Linear
    linear2: nn.Linear
    dropout: nn.Dropout
    activation: Callable[[Tensor], Tensor]

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))  # (B, L, E)

    def __setstate__(self, state: dict) -> None:
        nn.Module.__setstate__(self, state)  # type: ignore[arg-type]
        if not hasattr(self, "activation"):  # like torch: old pickles lack it (a module one is in _modules)
            self.activation = F.relu


class TransformerEncoderLayer(_FeedForward, nn.Module):
    """The reference page's encoder layer (example 4) with `torch.nn.TransformerEncoderLayer`'s interface.

    Post-norm (the page's and torch's default): `x = norm1(x + SA(x)); x = norm2(x + FF(x))`.
    Pre-norm with `norm_first=True`: `x = x + SA(norm1(x)); x = x + FF(norm2(x))`.
    FF is `linear2(dropout(activation(linear1(x))))`; SA is our `MultiheadAttention`.

    Args:
        d_model: E, the model width.
        nhead: H, attention heads (E must be divisible by H).
        dim_feedforward: the feed-forward block's hidden width.
        dropout: dropout probability (attention weights, feed-forward, residual branches).
        activation: "relu", "gelu" or a callable (e.g. `F.silu`, `nn.GELU()`).
        layer_norm_eps: LayerNorm's epsilon.
        batch_first: inputs are (B, L, E) when True (the default here, as the reference page
            documents; torch's default is False), else (L, B, E).
        norm_first: pre-norm instead of post-norm.
        bias: biases in the linear layers, the attention projections and the LayerNorms.
        device, dtype: factory kwargs for the parameters.
        num_kv_heads, rotary, window: passed to the self-attention (grouped-query heads, a
            `RotaryEmbedding`, a sliding window); see `MultiheadAttention`.

    A state_dict of `torch.nn.TransformerEncoderLayer` (same sizes) loads into this layer and back.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
        window: Window = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            d_model,
            nhead,
            dropout=dropout,
            bias=bias,
            batch_first=batch_first,
            num_kv_heads=num_kv_heads,
            rotary=rotary,
            window=window,
            **factory,
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    @property
    def batch_first(self) -> bool:
        return self.self_attn.batch_first

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """src (B, L, E) with batch_first, (L, B, E) without, or unbatched (L, E).

        src_mask: (L, S) or (B*H, L, S), bool (True = may not attend) or float (added to the scores).
        src_key_padding_mask: (B, L), bool (True = padding) or float.
        is_causal: causal attention when no src_mask is given (torch's layer needs the mask too);
            with a mask, the mask wins.

        Returns a tensor shaped like src.
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self.dropout2(self._ff_block(self.norm2(x)))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self.dropout2(self._ff_block(x)))
        return x

    def _sa_block(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        out, _ = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )
        return self.dropout1(out)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
        """Ours with `layer`'s configuration and weights; keeps its batch_first, device, dtype and mode."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"from_torch expects a torch.nn.TransformerEncoderLayer, got {type(layer).__name__}")
        ours = cls(**_torch_config(layer))
        ours.load_state_dict(layer.state_dict())
        return ours.train(layer.training)


class MemoryKV(NamedTuple):
    """The memory's keys and values after the cross-attention's projections, (B, Hkv, S, D) each.

    Made by `TransformerDecoderLayer.project_memory(memory)`; pass it as `memory_kv=` to every decode
    step so the memory is projected once, not once per step.
    """

    k: Tensor
    v: Tensor


class TransformerDecoderLayer(_FeedForward, nn.Module):
    """A decoder layer with `torch.nn.TransformerDecoderLayer`'s interface, on our attention.

    Post-norm (default): `x = norm1(x + SA(x)); x = norm2(x + CA(x, memory)); x = norm3(x + FF(x))`;
    pre-norm with `norm_first=True`: `x = x + SA(norm1(x)); x = x + CA(norm2(x), memory); x = x + FF(norm3(x))`.

    Args are those of `TransformerEncoderLayer`. `num_kv_heads` applies to both attentions;
    `rotary` and `window` to the self-attention only (the memory has no positions relative to the
    target's).

    Incremental decoding: give the self-attention a `KVCache` (`layer.new_cache(B, max_len)`) and
    feed the new tokens only; project the memory once with `project_memory` and pass the result as
    `memory_kv`:

        cache = layer.new_cache(batch_size=B, max_len=T)
        memory_kv = layer.project_memory(memory)
        for t in range(T):
            y = layer(tgt[:, t : t + 1], None, kv_cache=cache, memory_kv=memory_kv)  # (B, 1, E)

    gives, step by step, what `layer(tgt, memory, tgt_is_causal=True)` gives at once.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
        window: Window = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        common: dict[str, Any] = {
            "dropout": dropout,
            "bias": bias,
            "batch_first": batch_first,
            "num_kv_heads": num_kv_heads,
        }
        self.self_attn = MultiheadAttention(d_model, nhead, rotary=rotary, window=window, **common, **factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, **common, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    @property
    def batch_first(self) -> bool:
        return self.self_attn.batch_first

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor | None,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        kv_cache: KVCache | None = None,
        memory_kv: MemoryKV | None = None,
    ) -> Tensor:
        """tgt (B, L, E) and memory (B, S, E) with batch_first, (L, B, E) and (S, B, E) without.

        tgt_mask (L, L) / memory_mask (L, S), or (B*H, L, ·): bool (True = may not attend) or float.
        tgt_key_padding_mask (B, L), memory_key_padding_mask (B, S): bool (True = padding) or float.
        tgt_is_causal / memory_is_causal: causal attention when the matching mask is not given.
        kv_cache: incremental decoding: tgt holds only the new tokens; their keys/values join the
            cache and they attend causally to every cached token (no tgt_mask or
            tgt_key_padding_mask then).
        memory_kv: the memory projected once by `project_memory`; memory is then not read (pass
            None). memory_mask rows are the current tgt tokens'.

        Returns a tensor shaped like tgt.
        """
        if kv_cache is not None and (tgt_mask is not None or tgt_key_padding_mask is not None):
            raise ValueError(
                "tgt_mask and tgt_key_padding_mask are not supported with kv_cache: the cache attends causally "
                "over each sequence's cached tokens (pass None; rewind the cache for sequences of different lengths)"
            )
        if memory is None and memory_kv is None:
            raise ValueError("memory is None: pass the encoder's output, or memory_kv=layer.project_memory(memory)")
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, kv_cache)
            x = x + self._mha_block(
                self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal, memory_kv
            )
            x = x + self.dropout3(self._ff_block(self.norm3(x)))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, kv_cache))
            x = self.norm2(
                x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal, memory_kv)
            )
            x = self.norm3(x + self.dropout3(self._ff_block(x)))
        return x

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> Tensor:
        out, _ = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
            kv_cache=kv_cache,
        )
        return self.dropout1(out)

    def _mha_block(
        self,
        x: Tensor,
        memory: Tensor | None,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        memory_kv: MemoryKV | None,
    ) -> Tensor:
        if memory_kv is not None:
            return self.dropout2(self._cross_attend(x, memory_kv, attn_mask, key_padding_mask, is_causal))
        out, _ = self.multihead_attn(
            x,
            memory,
            memory,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )
        return self.dropout2(out)

    # ---- incremental decoding ----------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A `KVCache` for this layer's self-attention (its heads, head dim, device and dtype)."""
        attn = self.self_attn
        ref = attn.out_proj.weight
        return KVCache(batch_size, max_len, attn.num_kv_heads, attn.head_dim, device=ref.device, dtype=ref.dtype)

    def project_memory(self, memory: Tensor) -> MemoryKV:
        """The memory's cross-attention keys and values, (B, Hkv, S, D) each, computed once.

        memory: (B, S, E) with batch_first, else (S, B, E). The projection is the one
        `multihead_attn` runs on every call (one fused matmul for key and value).
        """
        attn = self.multihead_attn
        if memory.dim() != 3 or memory.shape[-1] != attn.embed_dim:
            layout = "(B, S, E)" if attn.batch_first else "(S, B, E)"
            raise ValueError(f"memory must be {layout} with E = {attn.embed_dim}, got shape {tuple(memory.shape)}")
        mem = memory if attn.batch_first else memory.transpose(0, 1)  # (B, S, E)
        w = attn.projections()
        embed_dim, kv_dim = attn.embed_dim, attn.num_kv_heads * attn.head_dim
        bias = None if w.in_proj_bias is None else w.in_proj_bias[embed_dim:]  # (2*Hkv*D,)
        if w.in_proj_weight is not None:  # as functional's key-is-value projection
            k, v = F.linear(mem, w.in_proj_weight[embed_dim:], bias).split([kv_dim, kv_dim], dim=-1)
        else:
            b_k, b_v = (None, None) if bias is None else bias.split([kv_dim, kv_dim])
            assert w.k_proj_weight is not None and w.v_proj_weight is not None  # separate weights, as not packed
            k, v = F.linear(mem, w.k_proj_weight, b_k), F.linear(mem, w.v_proj_weight, b_v)  # (B, S, Hkv*D)
        k = k.unflatten(-1, (attn.num_kv_heads, attn.head_dim)).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.unflatten(-1, (attn.num_kv_heads, attn.head_dim)).transpose(1, 2)
        return MemoryKV(k, v)

    def _cross_attend(
        self,
        x: Tensor,
        memory_kv: MemoryKV,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        """`multihead_attn(x, memory, memory)` on keys/values projected beforehand (hooks on
        multihead_attn do not run here)."""
        attn = self.multihead_attn
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("memory_kv does not support a cross-attention with add_bias_kv or add_zero_attn")
        if x.dim() != 3:
            raise ValueError(f"memory_kv needs batched tgt (3-D), got shape {tuple(x.shape)}")
        query = x if attn.batch_first else x.transpose(0, 1)  # (B, L, E)
        batch, q_len, embed_dim = query.shape
        k, v = memory_kv
        expected = (batch, attn.num_kv_heads, k.shape[2], attn.head_dim)
        if k.shape != expected or v.shape != expected:
            raise ValueError(
                f"memory_kv must hold (B, Hkv, S, D) = {expected[:2]} + (S, {attn.head_dim}) keys and values "
                f"for this tgt, got {tuple(k.shape)} and {tuple(v.shape)}; make it with layer.project_memory(memory)"
            )
        mask = build_mask(
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            batch=batch,
            heads=attn.num_heads,
            q_len=q_len,
            k_len=k.shape[2],
            batched=True,
            device=x.device,
        )
        w = attn.projections()
        w_q = w.in_proj_weight[:embed_dim] if w.in_proj_weight is not None else w.q_proj_weight  # (E, E)
        assert w_q is not None  # Projections: in_proj_weight or the three separate weights are set
        b_q = None if w.in_proj_bias is None else w.in_proj_bias[:embed_dim]
        q = F.linear(query, w_q, b_q).unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)  # (B, H, L, D)
        backend = backends.choose(q, k, v, mask, need_weights=False, backend=attn.backend)
        out, _ = backend.attend(
            q,
            k,
            v,
            mask,
            scale=attn.head_dim**-0.5,
            dropout_p=attn.dropout if attn.training else 0.0,
            need_weights=False,
            average_weights=True,
        )  # (B, H, L, D)
        return finish(out, None, w, attn.out_proj, batched=True, batch_first=attn.batch_first)[0]

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> TransformerDecoderLayer:
        """Ours with `layer`'s configuration and weights; keeps its batch_first, device, dtype and mode."""
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise TypeError(f"from_torch expects a torch.nn.TransformerDecoderLayer, got {type(layer).__name__}")
        ours = cls(**_torch_config(layer))
        ours.load_state_dict(layer.state_dict())
        return ours.train(layer.training)


def _torch_config(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> dict:
    """The constructor arguments of a torch encoder or decoder layer, read from its parts."""
    ref = layer.linear1.weight
    return {
        "d_model": layer.linear1.in_features,
        "nhead": layer.self_attn.num_heads,
        "dim_feedforward": layer.linear1.out_features,
        "dropout": layer.dropout.p,
        "activation": layer.activation,
        "layer_norm_eps": layer.norm1.eps,
        "batch_first": layer.self_attn.batch_first,
        "norm_first": layer.norm_first,
        "bias": layer.linear1.bias is not None,
        "device": ref.device,
        "dtype": ref.dtype,
    }
