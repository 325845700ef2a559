"""The reference page's five examples run with our module and show what the page describes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from multihead.examples import page_examples as page

ROOT = Path(__file__).resolve().parents[1]


def test_example_1_shapes_and_weights_are_distributions():
    r = page.example_1_basic(verbose=False)
    assert r["output"].shape == (4, 100, 512)
    assert r["weights"].shape == (4, 100, 100)
    torch.testing.assert_close(r["weights"].sum(-1), torch.ones(4, 100))
    assert (r["weights"] >= 0).all()


def test_example_2_self_attention():
    r = page.example_2_self_attention(verbose=False)
    assert r["output"].shape == r["x"].shape == (2, 50, 256)
    assert r["weights"].shape == (2, 50, 50)
    torch.testing.assert_close(r["weights"].sum(-1), torch.ones(2, 50))


def test_example_3_causal_mask_hides_the_future():
    r = page.example_3_masked(verbose=False)
    assert r["output"].shape == (1, 20, 128) and r["mask"].shape == (20, 20)
    w = r["weights"][0]  # (20, 20)
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # nothing on the future
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    # changing the future does not change the past
    x2 = r["x"].clone()
    x2[0, 10:] += torch.randn(10, 128)
    out2, _ = r["module"](x2, x2, x2, attn_mask=r["mask"])
    torch.testing.assert_close(out2[0, :10], r["output"][0, :10])
    assert not torch.allclose(out2[0, 10:], r["output"][0, 10:])


def test_example_4_encoder_layer_matches_the_same_layer_with_torchs_attention():
    r = page.example_4_encoder_layer(verbose=False)
    layer = r["layer"]
    assert r["output"].shape == (4, 100, 512)
    # the same layer with torch's attention (page code verbatim) gives the same output
    torch_layer = page.TransformerLayer(512, 8)
    torch_layer.load_state_dict(layer.state_dict())
    torch_layer.self_attn = layer.self_attn.to_torch()
    torch.testing.assert_close(torch_layer(r["x"]), r["output"], rtol=1e-5, atol=1e-5)
    # post-norm: the output rows are normalised
    torch.testing.assert_close(r["output"].mean(-1), torch.zeros(4, 100), atol=1e-5, rtol=0)


def test_example_5_per_head_weights():
    w = page.example_5_weights(verbose=False)["weights"]
    assert w.shape == (2, 5, 5)  # (heads, L, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    assert not w.requires_grad
    assert not torch.allclose(w[0], w[1])  # two different heads


def test_script_prints_what_the_page_prints():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "page_examples.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    for line in (
        "注意力权重形状: torch.Size([4, 100, 100])",
        "输出形状: torch.Size([2, 50, 256])",
        "Mask 形状: torch.Size([20, 20])",
        "第一个头的注意力权重 (前3个位置):",
    ):
        assert line in done.stdout
