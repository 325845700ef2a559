"""multihead.viz: real images rendered from real attention weights, checked for their content."""

from __future__ import annotations

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from multihead import MultiheadAttention, viz  # noqa: E402


def panels(fig):
    """The heatmap axes (the colorbar's axes hold no image)."""
    return [ax for ax in fig.axes if ax.images]


@pytest.fixture(scope="module")
def per_head():
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4)
    x = torch.randn(2, 6, 32)
    _, w = mha(x, x, x, average_attn_weights=False)  # (2, 4, 6, 6), requires grad
    return w


def test_png_per_head_plus_mean(per_head, tmp_path):
    path = tmp_path / "a.png"
    tokens = ["the", "cat", "sat", "on", "a", "mat"]
    fig = viz.plot_attention(per_head, tokens=tokens, title="four heads", path=path, batch=1)
    shown = panels(fig)
    assert [ax.get_title() for ax in shown] == ["head 0", "head 1", "head 2", "head 3", "mean of 4 heads"]
    # each panel draws the data it claims: batch element 1, head h, and the mean over heads
    w = per_head[1].detach().double().numpy()  # (H, L, S)
    for h in range(4):
        np.testing.assert_allclose(shown[h].images[0].get_array(), w[h])
    np.testing.assert_allclose(shown[4].images[0].get_array(), w.mean(0))
    # one colour scale, one colorbar
    assert len({im.get_clim() for ax in shown for im in ax.images}) == 1
    assert len(fig.axes) == len(shown) + 1
    assert [t.get_text() for t in shown[0].get_xticklabels()] == tokens
    assert [t.get_text() for t in shown[0].get_yticklabels()] == tokens  # L == S: the same labels
    # the file: a real, non-blank picture of the figure's size
    assert path.stat().st_size > 10_000
    image = imread(path)  # (height, width, channels) floats in [0, 1]
    width, height = fig.get_size_inches() * fig.dpi
    assert image.shape[:2] == (round(height), round(width))
    assert image[..., :3].std() > 0.1


def test_svg(per_head, tmp_path):
    path = tmp_path / "a.svg"
    viz.plot_attention(per_head[0], heads=[0, 2], path=path)
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert text.count("<image") >= 3  # heads 0 and 2, and the mean
    assert path.stat().st_size > 5_000


def test_layouts(per_head):
    w = per_head.detach()
    assert len(panels(viz.plot_attention(w[0]))) == 5  # (H, L, S)
    assert len(panels(viz.plot_attention(w[0, 2]))) == 1  # (L, S)
    averaged = w.mean(1)  # (B, L, S), what the module returns by default
    fig = viz.plot_attention(averaged, averaged=True, batch=1)
    (ax,) = panels(fig)
    assert ax.get_title() == "mean over heads"
    np.testing.assert_allclose(ax.images[0].get_array(), averaged[1].double().numpy())
    fig = viz.plot_attention(w[:, :1], heads=0)  # one head: no separate mean
    assert [ax.get_title() for ax in panels(fig)] == ["head 0"]
    assert len(panels(viz.plot_attention(w.numpy(), heads=3))) == 2  # arrays too; the mean stays


def test_rectangular_and_query_tokens(tmp_path):
    w = torch.softmax(torch.randn(3, 4, 7), dim=-1)  # (H, L, S), L != S
    keys = [f"k{i}" for i in range(7)]
    queries = [f"q{i}" for i in range(4)]
    fig = viz.plot_attention(w, tokens=keys, query_tokens=queries, path=tmp_path / "r.png")
    ax = panels(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == keys
    assert [t.get_text() for t in ax.get_yticklabels()] == queries
    assert ax.images[0].get_array().shape == (4, 7)


def test_large_map_is_not_annotated():
    w = torch.softmax(torch.randn(1, 2, 40, 40), dim=-1)
    fig = viz.plot_attention(w)
    assert all(not ax.texts for ax in panels(fig))
    fig = viz.plot_attention(w[0, :, :5, :5])
    assert all(len(ax.texts) == 25 for ax in panels(fig))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda w: viz.plot_attention(w[0, 0, 0]), r"1-D shape \(6,\)"),
        (lambda w: viz.plot_attention(w[None]), r"5-D"),
        (lambda w: viz.plot_attention(w, averaged=True), r"averaged=True means a 3-D"),
        (lambda w: viz.plot_attention(w, batch=2), r"batch must be an int in \[0, 2\)"),
        (lambda w: viz.plot_attention(w, heads=[4]), r"heads must be indices in \[0, 4\)"),
        (lambda w: viz.plot_attention(w, tokens=["a", "b"]), r"tokens has 2 labels, but the weights have 6 key"),
        (lambda w: viz.plot_attention(w, query_tokens=list("abcdefg")), r"7 labels.*6 query"),
        (lambda w: viz.plot_attention(w, tokens="abcdef"), r"single str"),
        (lambda w: viz.plot_attention(w, path="a.jpg"), r"path must end in one of"),
        (lambda w: viz.plot_attention(w[:, :, :0]), r"no query or no key"),
    ],
)
def test_errors(per_head, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(per_head.detach())


def test_cli_saves_example_5(tmp_path, capsys):
    out = tmp_path / "attention.png"
    assert viz.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    image = imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 600 and image[..., :3].std() > 0.1
    fig, attn = viz.example_figure()
    assert attn.shape == (2, 5, 5)  # the page's example 5: two heads over five positions
    assert [ax.get_title() for ax in panels(fig)] == ["head 0", "head 1", "mean of 2 heads"]
    with pytest.raises(SystemExit):
        viz.main(["--out", str(tmp_path / "a.gif")])
