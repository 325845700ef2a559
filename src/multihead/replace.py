"""`replace_attention(model)`: put our module wherever a model holds torch's.

The README's recipe `layer.self_attn = MultiheadAttention.from_torch(layer.self_attn)` does nothing
to an `nn.TransformerEncoder` that is already built (it deep-copied its layer), and torch decides some
things at construction from its own module. This walks the model once and fixes both.
"""

from __future__ import annotations

import warnings

from torch import nn

from .module import MultiheadAttention, torch_config

__all__ = ["replace_attention"]


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap every `torch.nn.MultiheadAttention` in `model` (type exactly torch's, not a subclass) for
    ours, in place, and return `model` (a bare torch module: its replacement).

    Each replacement keeps the replaced module's configuration, `batch_first`, training mode and its
    very parameters and `out_proj` (same tensors, device and dtype: weight ties and optimizers built
    over the model stay valid; nothing is copied). A module shared by several parents is replaced by
    one shared module. Hooks registered on a replaced module are not carried over (a warning says so).

    Then it undoes what torch decided at construction from its own module: an `nn.TransformerEncoder`
    (also inside `nn.Transformer`) whose layers now hold ours stops converting padded input to nested
    tensors in eval (`use_nested_tensor = False`; `enable_nested_tensor` still records what was asked).
    Call it on a model built around our module from the start for the same fix.
    """
    if type(model) is nn.MultiheadAttention:
        return _adopt(model, "model")
    done: dict[int, MultiheadAttention] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(parent._modules.items()):  # every name, shared children too
            if type(child) is nn.MultiheadAttention:
                if id(child) not in done:
                    done[id(child)] = _adopt(child, f"{parent_name}.{name}".lstrip("."))
                setattr(parent, name, done[id(child)])
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in module.layers
        ):
            # torch would hand our module a strided nested tensor in eval whenever padding is given
            module.use_nested_tensor = False
    return model


def _adopt(theirs: nn.MultiheadAttention, where: str) -> MultiheadAttention:
    """Ours with `theirs`'s configuration, wrapped around `theirs`'s own parameters and out_proj."""
    # placeholders on the meta device only: torch's parameters replace them below
    ours = MultiheadAttention(**torch_config(theirs), device="meta")
    for name, param in theirs._parameters.items():
        placeholder = ours._parameters[name]
        if (param is None) != (placeholder is None) or (
            param is not None and placeholder is not None and param.shape != placeholder.shape
        ):
            raise ValueError(f"replace_attention: {where}.{name} has an unexpected shape or presence; not replaced")
        ours._parameters[name] = param
    ours.out_proj = theirs.out_proj
    ours.train(theirs.training)
    hooks = [
        kind
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        if getattr(theirs, kind)
    ]
    if hooks:
        warnings.warn(
            f"replace_attention: {where} has hooks ({', '.join(hooks)}) that are not carried over to the "
            "new module; register them on it",
            stacklevel=3,
        )
    return ours
