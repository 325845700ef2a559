"""Shared test helpers: building torch/ours pairs, random masks, the error rule."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multihead import MultiheadAttention


def pair(
    dtype: torch.dtype = torch.float32, seed: int = 0, **config
) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """torch's module and ours with the same configuration and the same weights."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(dtype=dtype, **config)
    # give biases non-zero values so the tests see them
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    ours = MultiheadAttention.from_torch(theirs)
    return theirs, ours


def inputs(batch: int | None, q_len: int, k_len: int, e: int, kdim: int, vdim: int, batch_first: bool, dtype, seed=1):
    """Random query/key/value in the requested layout; batch None means unbatched."""
    g = torch.Generator().manual_seed(seed)

    def make(n, d):
        if batch is None:
            shape = (n, d)
        elif batch_first:
            shape = (batch, n, d)
        else:
            shape = (n, batch, d)
        return torch.randn(shape, generator=g, dtype=dtype)

    return make(q_len, e), make(k_len, kdim), make(k_len, vdim)


def cotangent(like: Tensor, g: torch.Generator) -> Tensor:
    """A random cotangent for `like`, the same numbers in every dtype: drawn in float64 on the
    generator's device, then cast (a float32 and a float64 draw from one seed differ entirely, which
    would make a gradient comparison against a float64 oracle vacuous)."""
    return torch.randn(like.shape, generator=g, dtype=torch.float64, device=g.device).to(like.dtype)


def first_error(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_flash_rule(ours: Tensor, theirs: Tensor, exact: Tensor, name: str, factor: float = 2.0, atol: float = 1e-6):
    """The flash-attn rule: our error against the float64 oracle is at most `factor` times the error
    of torch (same precision) against it, plus a small absolute floor for round-off noise."""
    ours_err = first_error(ours, exact)
    theirs_err = first_error(theirs, exact)
    assert ours_err <= factor * theirs_err + atol, f"{name}: ours err {ours_err:.3g} vs torch err {theirs_err:.3g}"


def random_bool_mask(shape, g, visible_diag=True):
    """Bool mask (True = hidden) with about 30% hidden; keeps key 0 visible so no row is empty."""
    m = torch.rand(shape, generator=g) < 0.3
    if visible_diag:
        m[..., 0] = False
    return m
