"""Attention heatmaps: one panel per head plus their mean, on one colour scale.

matplotlib is the optional `viz` extra (`pip install multihead[viz]`); it is imported only when a
function here is called. Figures are built with `matplotlib.figure.Figure` directly (no pyplot, no
global state, no window ever opens) and saved through the Agg (PNG) or SVG backend.

Notation: B batch, H heads, L query length, S key length.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["main", "plot_attention"]

#: File types `plot_attention(path=...)` writes, by suffix.
FORMATS = {".png": "png", ".svg": "svg"}
#: Maps with at most this many rows and columns get their values written in the cells.
ANNOTATE_MAX = 10
#: Panels per row of the figure.
COLUMNS = 4


def _import_matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("multihead.viz needs matplotlib: install the viz extra (pip install 'multihead[viz]')") from e
    return Figure


def _as_array(weights: Any) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        return weights.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"weights must be a tensor or array of numbers, got {type(weights).__name__}") from e


def _per_head(weights: np.ndarray, averaged: bool, batch: int) -> np.ndarray:
    """Any accepted layout -> (H, L, S), H = 1 for weights already averaged over heads."""
    shape = tuple(weights.shape)
    layouts = "(L, S), (H, L, S), (B, L, S) with averaged=True, or (B, H, L, S)"
    if weights.ndim not in (2, 3, 4):
        raise ValueError(f"weights must be {layouts}; got {weights.ndim}-D shape {shape}")
    if weights.ndim == 4 and averaged:
        raise ValueError(
            f"weights of shape {shape} are (B, H, L, S), per head; averaged=True means a 3-D (B, L, S) "
            "tensor: drop averaged=True, or pass the module's averaged weights"
        )
    if weights.ndim == 4 or (weights.ndim == 3 and averaged):
        if isinstance(batch, bool) or not isinstance(batch, int) or not -shape[0] <= batch < shape[0]:
            raise ValueError(f"batch must be an int in [0, {shape[0]}) for weights of shape {shape}, got {batch!r}")
        weights = weights[batch]  # (H, L, S) or (L, S)
    if weights.ndim == 2:
        weights = weights[None]  # (1, L, S)
    if weights.shape[1] == 0 or weights.shape[2] == 0:
        raise ValueError(f"weights have no query or no key positions: shape {shape}")
    return weights


def _labels(name: str, labels: Sequence[str] | None, n: int, axis: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"{name} must be a sequence of labels (one per position), got a single str {labels!r}")
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels, but the weights have {n} {axis} positions")
    return labels


def _pick_heads(heads: int | Sequence[int] | None, num_heads: int) -> list[int]:
    if heads is None:
        return list(range(num_heads))
    picked = [heads] if isinstance(heads, int) else list(heads)
    bad = [h for h in picked if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads]
    if bad or not picked:
        raise ValueError(
            f"heads must be indices in [0, {num_heads}) (the weights have {num_heads} heads), got {heads!r}"
        )
    return picked


def plot_attention(
    weights: Any,
    *,
    tokens: Sequence[str] | None = None,
    query_tokens: Sequence[str] | None = None,
    heads: int | Sequence[int] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
    averaged: bool = False,
    batch: int = 0,
    annotate: bool | None = None,
) -> Figure:
    """Heatmaps of attention weights: one panel per head, then their mean, on one colour scale.

    Args:
        weights: a tensor or array, `(L, S)`, `(H, L, S)`, `(B, H, L, S)` (e.g. from
            `average_attn_weights=False`), or `(B, L, S)` with `averaged=True` (the module's default,
            averaged over heads). Each row is what one query attends to.
        tokens: S labels for the keys (x axis); also used for the queries when L == S and
            `query_tokens` is not given.
        query_tokens: L labels for the queries (y axis).
        heads: the heads to draw (an index or a list); the mean is over all heads.
        title: a title above the panels.
        path: write the figure there; `.png` or `.svg`.
        averaged: read a 3-D tensor as `(B, L, S)` weights averaged over heads, not `(H, L, S)`.
        batch: the batch element drawn from 4-D (or averaged 3-D) weights.
        annotate: write each value in its cell; by default only when L and S are at most 10.

    Returns:
        The `matplotlib.figure.Figure` (panels are titled "head h" and "mean of H heads"; one colorbar).
    """
    Figure = _import_matplotlib()
    array = _as_array(weights)
    already_mean = array.ndim == 2 or (array.ndim == 3 and averaged)
    maps = _per_head(array, averaged, batch)  # (H, L, S); H = 1 when already averaged
    num_heads, q_len, k_len = maps.shape
    x_labels = _labels("tokens", tokens, k_len, "key")
    y_labels = _labels("query_tokens", query_tokens, q_len, "query")
    if y_labels is None and x_labels is not None and q_len == k_len:
        y_labels = x_labels
    chosen = _pick_heads(heads, num_heads)
    file_format = None
    if path is not None:
        file_format = FORMATS.get(Path(path).suffix.lower())
        if file_format is None:
            raise ValueError(f"path must end in one of {sorted(FORMATS)}, got {str(path)!r}")

    if already_mean:
        panels = [("mean over heads", maps[0])]
    else:
        panels = [(f"head {h}", maps[h]) for h in chosen]
        if num_heads > 1:
            panels.append((f"mean of {num_heads} heads", maps.mean(axis=0)))
    low = min(0.0, float(np.nanmin(maps)))
    high = max(float(np.nanmax(maps)), low + 1e-12)  # shared scale: the maps' mean lies within it
    if annotate is None:
        annotate = q_len <= ANNOTATE_MAX and k_len <= ANNOTATE_MAX

    cols = min(len(panels), COLUMNS)
    rows = math.ceil(len(panels) / cols)
    cell = min(0.45, 3.0 / max(q_len, k_len, 1))  # inches per cell; a panel is at most ~3 inches
    label_room = 0.08 * max((len(t) for t in (x_labels or y_labels or [""])), default=0)
    width = cols * (k_len * cell + 0.6 + label_room) + 1.2
    height = rows * (q_len * cell + 0.9 + label_room) + (0.5 if title else 0.2)
    fig = Figure(figsize=(max(width, 3.5), max(height, 2.5)), layout="constrained", dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (name, data) in zip(axes, panels):
        image = ax.imshow(data, cmap="viridis", vmin=low, vmax=high, interpolation="nearest", aspect="equal")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("key position" if x_labels is None else "key", fontsize=8)
        ax.set_ylabel("query position" if y_labels is None else "query", fontsize=8)
        ax.tick_params(labelsize=7)
        if x_labels is not None:
            ax.set_xticks(range(k_len), x_labels, rotation=90)
        if y_labels is not None:
            ax.set_yticks(range(q_len), y_labels)
        if annotate:
            middle = (low + high) / 2
            for (i, j), value in np.ndenumerate(data):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > middle else "white")  # fmt: skip
    for ax in axes[len(panels) :]:
        ax.remove()
    fig.colorbar(image, ax=list(axes[: len(panels)]), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(path, format=file_format)
    return fig


def example_figure(path: str | Path | None = None) -> tuple[Figure, torch.Tensor]:
    """The reference page's example 5 (embed_dim=64, num_heads=2, x of shape (1, 5, 64)) as a picture:
    its per-head weights (H, L, S) and their mean. Seeded, so the picture is reproducible."""
    from .examples.page_examples import example_5_weights

    torch.manual_seed(0)
    attn = example_5_weights(verbose=False)["weights"]  # (2, 5, 5)
    fig = plot_attention(
        attn, path=path, title="The reference page's example 5: attention weights (embed_dim=64, num_heads=2)"
    )
    return fig, attn


def main(argv: list[str] | None = None) -> int:
    """`python -m multihead plot [--out attention.png]`: run the page's example 5, save its picture."""
    parser = argparse.ArgumentParser(
        prog="python -m multihead plot",
        description="Run the reference page's example 5 and save its attention weights as a picture.",
    )
    parser.add_argument("--out", default="attention.png", help="where to write the picture (.png or .svg)")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() not in FORMATS:
        parser.error(f"--out must end in one of {sorted(FORMATS)}, got {args.out!r}")
    _, attn = example_figure(args.out)
    print("The reference page's example 5: per-head attention weights of x (1, 5, 64), 2 heads")
    print("first head's weights (first 3 positions):")
    print(np.array2string(attn[0, :3, :3].numpy(), precision=2))
    print(f"picture saved to {Path(args.out).resolve()}")
    return 0
