"""`MultiheadAttention`: a drop-in for `torch.nn.MultiheadAttention`.

Parameters, names, shapes, registration order and initialisation are torch's, so state_dicts (and
optimizer states, which index parameters by position) move both ways. The one documented default
that differs is `batch_first=True`, as the reference page documents.

The class subclasses `torch.nn.MultiheadAttention`, so code that dispatches on `isinstance` calls it,
but none of torch's implementation runs in place of ours (see the class body: each method torch's
class defines is ours or torch's on purpose). `type(m) is torch.nn.MultiheadAttention` is the one
check that tells torch's module and ours apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import attend
from .functional import Projections, multi_head_attention
from .validation import check_module_args, check_window

if TYPE_CHECKING:
    from .cache import KVCache
    from .explain import Explanation
    from .rotary import RotaryEmbedding

__all__ = ["MultiheadAttention"]


def _our_forward_runs(module: nn.Module, args: tuple) -> None:
    """The do-nothing forward pre-hook that `FusedKernelOff` carries (it never runs: see there)."""
    return None


class FusedKernelOff(nn.Module):
    """A child of every module of ours that is never called; it carries one do-nothing forward pre-hook.

    torch's `nn.TransformerEncoderLayer` runs its own fused kernel (`torch._transformer_encoder_layer_fwd`)
    on `self_attn`'s weights in eval unless, among other things, a forward hook is attached to one of
    its modules (torch/nn/modules/transformer.py: "forward pre-/hooks are attached to the module").
    That is the one condition that says truthfully what we need: this module's forward must run. Every
    other condition torch reads (`_qkv_same_embed_dim`, `in_proj_bias`, `batch_first`, ...) describes
    the weights and stays true to them. The hook sits on this child, not on the attention module: a
    module with a hook takes `nn.Module.__call__`'s slower path on every call (about 15 µs, which a
    small call notices), and this child is never called. It has no parameters or buffers, so state
    dicts are unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_our_forward_runs)


class MultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention with the interface and numbers of `torch.nn.MultiheadAttention`.

    A subclass of `torch.nn.MultiheadAttention` (torch's `__init__` never runs), so `isinstance`
    holds, with grouped-query heads, rotary or a window too: code that checks `isinstance` and then
    calls the module gets our forward, with every feature. Code that instead reads the weights by
    name and runs attention itself would run torch's attention on them: with grouped-query heads
    `_qkv_same_embed_dim` is False and `k_proj_weight`/`v_proj_weight` are (Hkv*D, kdim)/(Hkv*D, vdim),
    so torch's functional form refuses them loudly; rotary and window leave no trace in the weights,
    so check `m.rotary`/`m.window` (or `type(m) is torch.nn.MultiheadAttention`, the one check that
    tells the two classes apart) before reading weights. Inside torch's encoder layer our forward
    runs in eval too (see `FusedKernelOff`).

    Args:
        embed_dim: E, model width; must be divisible by `num_heads`.
        num_heads: H, number of attention heads (head dim D = E // H).
        dropout: dropout probability on the attention weights, in [0, 1); active in train mode.
        bias: add biases to the input and output projections.
        add_bias_kv: append a learned key and value (one extra key position).
        add_zero_attn: append a zero key and value (one extra key position).
        kdim, vdim: feature sizes of key and value (default E).
        batch_first: inputs are (B, L, E) when True (the default here, as the reference page
            documents; torch's default is False), else (L, B, E).
        num_kv_heads: Hkv key/value heads for grouped-query attention (must divide H; default H).
        rotary: a `RotaryEmbedding` applied to queries and keys per head (no parameters).
        window: sliding-window attention: query i sees keys i - left ... i + right, given as
            (left, right) (None = unbounded on that side) or an int `left` meaning (left, 0).
        device, dtype: factory kwargs for the parameters.

    Shapes: query (B, L, E), key (B, S, kdim), value (B, S, vdim) with batch_first; 2-D inputs are
    unbatched. Output (B, L, E); weights (B, L, S), or (B, H, L, S) with average_attn_weights=False.
    """

    __constants__ = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
        window: int | tuple[int | None, int | None] | None = None,
    ) -> None:
        check_module_args(embed_dim, num_heads, dropout, kdim, vdim, num_kv_heads)
        window = check_window(window)
        if rotary is not None and rotary.head_dim != embed_dim // num_heads:
            raise ValueError(
                f"rotary.head_dim must equal embed_dim // num_heads = {embed_dim // num_heads}, got {rotary.head_dim}"
            )
        # torch's __init__ would register torch's parameters and initialise them; ours does both,
        # in torch's order, for every layout (grouped-query heads included)
        nn.Module.__init__(self)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.backend = None  # force a backend by name (debugging, benchmarks); validated on assignment
        self.rotary = rotary
        self.window = window
        kv_dim = self.num_kv_heads * self.head_dim
        packed = self.kdim == embed_dim and self.vdim == embed_dim and kv_dim == embed_dim
        # true to the weights, as in torch: packed `in_proj_weight` or separate q/k/v weights
        self._qkv_same_embed_dim = packed

        # registration order is torch's: optimizer checkpoints index parameters by position
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # torch's class: quantize_dynamic leaves it alone (our forward reads its weight); state dict as nn.Linear
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_dim, **factory))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self._fused_kernel_off = FusedKernelOff()  # our forward runs inside torch's encoder layer too
        self._reset_parameters()

    # ---- torch's methods: each is ours or torch's on purpose ------------------------------------
    # __init__: ours (above); torch's never runs (nn.Module.__init__ is called directly).
    # _reset_parameters: ours; torch's knows no grouped-query shapes. Same order, same numbers.
    # __setstate__: ours, then torch's (which defaults `_qkv_same_embed_dim` for torch-1.1 pickles).
    # forward: ours. torch's never runs, also not from torch's layers (see `FusedKernelOff`).
    # merge_masks: torch's, inherited on purpose: pure mask arithmetic for torch's fused encoder
    #     kernel, which does not run on our module; kept so code that calls it gets torch's answer.

    def _reset_parameters(self) -> None:
        """torch's initialisation, in torch's order (so a seed gives torch's numbers)."""
        if self.in_proj_weight is not None:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            assert self.bias_v is not None  # bias_k and bias_v are registered together
            xavier_normal_(self.bias_k)
            xavier_normal_(self.bias_v)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (out_proj as nn.Linear, then torch's MHA init)."""
        self.out_proj.reset_parameters()
        self._reset_parameters()

    def __setstate__(self, state: dict) -> None:
        # older pickles of ours lack these; torch's __setstate__ (called next) defaults the flag
        state.setdefault("num_kv_heads", state.get("num_heads"))
        state.setdefault("_backend", state.pop("backend", None))
        state.setdefault("window", None)
        hooks = state.get("_forward_pre_hooks", {})  # pickles before FusedKernelOff carried its hook themselves
        for key in [key for key, hook in hooks.items() if hook is _our_forward_runs]:
            del hooks[key]
        super().__setstate__(state)
        if "_fused_kernel_off" not in self._modules:
            self._fused_kernel_off = FusedKernelOff()

    @property
    def backend(self) -> str | None:
        """The backend forced by name (see `multihead.attend.names()`), or None to let dispatch choose."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None:
            attend.get(name)  # a clear error for an unknown name
        self._backend = name

    def projections(self) -> Projections:
        """The weights this call uses, read from `_parameters`, where `torch.func.functional_call` and
        FSDP2 put the tensors they swap in (a dict read per weight costs less than `nn.Module.__getattr__`,
        which small calls notice); as attributes when a parametrization or `weight_norm` moved one out."""
        p, out = self._parameters, self.out_proj
        try:
            return Projections(
                p["in_proj_weight"], p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"], p["in_proj_bias"],
                p["bias_k"], p["bias_v"], out._parameters["weight"], out._parameters["bias"],  # type: ignore[arg-type]
            )  # fmt: skip
        except KeyError:
            return Projections(
                self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, out.weight, out.bias,
            )  # fmt: skip

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:  # ours: torch's forward never runs
        """query (B, L, E), key (B, S, kdim), value (B, S, vdim) (batch_first), or (L, B, ·), or
        unbatched (L, E)/(S, ·). key_padding_mask (B, S) bool (True = padding) or float;
        attn_mask (L, S) or (B*H, L, S), bool (True = may not attend) or float (added).
        is_causal: with no attn_mask, causal attention; with one, the mask wins.
        kv_cache: decoding: the new tokens' keys/values are appended to the cache and every query
        attends causally to all cached keys of its sequence (no attn_mask/key_padding_mask then).

        Returns (out like query, weights): weights (B, L, S) averaged over heads, (B, H, L, S) with
        average_attn_weights=False, None with need_weights=False; after dropout, like torch's.
        """
        if isinstance(query, torch.fx.Proxy):  # symbolic_trace: one call_module node, like torch's leaf
            options = dict(
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
            return _fx_leaf(
                self, (query, key, value), options if kv_cache is None else {**options, "kv_cache": kv_cache}
            )
        return multi_head_attention(
            query,
            key,
            value,
            self.projections(),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            add_zero_attn=self.add_zero_attn,
            batch_first=self.batch_first,
            backend=self.backend,
            rotary=self.rotary,
            window=self.window,
            kv_cache=kv_cache,
            out_proj=self.out_proj,
        )

    def explain(self, query: Tensor, key: Tensor, value: Tensor, **forward_kwargs) -> Explanation:
        """What `forward(query, key, value, **forward_kwargs)` would do, without doing it: the backend
        that serves the call, why each other backend does not (with its threshold), and the call's
        estimated FLOPs and peak bytes, ours and torch's. `print(module.explain(q, k, v))` reads well."""
        from .explain import explain_call

        return explain_call(self, query, key, value, **forward_kwargs)

    def __prepare_scriptable__(self) -> NoReturn:
        """torch.jit.script calls this before compiling a module (also for one nested in a model):
        fail at once, saying what to use instead, rather than deep in TorchScript's parser."""
        raise TypeError(
            "multihead.MultiheadAttention does not support torch.jit.script: TorchScript cannot compile the "
            "Python it is written in (dataclasses, `X | None` annotations, backends chosen per call). Use "
            "torch.compile(model) to speed it up, torch.export.export(model, args) or "
            "torch.onnx.export(model, args, dynamo=True) to deploy it, or torch.jit.trace(model, example_inputs) "
            "if you need a TorchScript module."
        )

    # ---- conversion ------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """Ours with `module`'s configuration and weights; keeps its batch_first, device, dtype and
        training mode."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__name__}")
        ref = module.out_proj.weight
        ours = cls(**torch_config(module), device=ref.device, dtype=ref.dtype)
        ours.load_state_dict(module.state_dict())
        return ours.train(module.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """A `torch.nn.MultiheadAttention` with this module's configuration, weights, device, dtype
        and training mode (only for configurations torch has: no grouped-query heads)."""
        extras = {
            "num_kv_heads": self.num_kv_heads != self.num_heads,
            "rotary": self.rotary is not None,
            "window": self.window is not None,
        }
        if any(extras.values()):
            raise ValueError(
                f"to_torch: torch.nn.MultiheadAttention has no {', '.join(k for k, v in extras.items() if v)}; "
                "only a module without them converts"
            )
        ref = self.out_proj.weight
        theirs = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        theirs.load_state_dict(self.state_dict())
        return theirs.train(self.training)

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        parts += [f"dropout={self.dropout}", f"batch_first={self.batch_first}"]
        if self.bias_k is not None:
            parts.append("add_bias_kv=True")
        if self.add_zero_attn:
            parts.append("add_zero_attn=True")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def torch_config(module: nn.MultiheadAttention) -> dict[str, Any]:
    """The constructor arguments that rebuild torch's `module` as ours (no device, dtype)."""
    return {
        "embed_dim": module.embed_dim,
        "num_heads": module.num_heads,
        "dropout": module.dropout,
        "bias": module.in_proj_bias is not None,
        "add_bias_kv": module.bias_k is not None,
        "add_zero_attn": module.add_zero_attn,
        "kdim": module.kdim,
        "vdim": module.vdim,
        "batch_first": module.batch_first,
    }


def safe_globals() -> list:
    """Classes (and `FusedKernelOff`'s hook function) to allow-list for `torch.load(path, weights_only=True)`
    of a whole module: `torch.serialization.add_safe_globals(multihead.safe_globals())`."""
    from .rotary import RotaryEmbedding

    return [
        MultiheadAttention,
        NonDynamicallyQuantizableLinear,
        nn.Linear,
        RotaryEmbedding,
        FusedKernelOff,
        _our_forward_runs,
    ]


def _fx_leaf(module: MultiheadAttention, args: tuple, kwargs: dict):
    """Under `torch.fx.symbolic_trace` torch's module is a leaf (its `__module__` is torch.nn); ours
    records the same single `call_module` node instead of being traced through."""
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)
