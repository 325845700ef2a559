"""The reference page's five examples, run with multihead's MultiheadAttention.

Each example returns what it computed so the tests can check the properties the page describes;
`main()` prints what the page prints. The page's inputs are (batch, seq, embed): batch_first=True is
the page's (and our) default. Example 5 is corrected as the page means it: per-head weights
(`average_attn_weights=False`), computed under `torch.no_grad()` so `.numpy()` works.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from multihead import MultiheadAttention


def example_1_basic(verbose: bool = True) -> dict:
    """Basic use: 512 wide, 8 heads, q/k/v of shape (4, 100, 512)."""
    mha = MultiheadAttention(embed_dim=512, num_heads=8)
    query = torch.randn(4, 100, 512)
    key = torch.randn(4, 100, 512)
    value = torch.randn(4, 100, 512)
    output, attn_weight = mha(query, key, value)
    if verbose:
        print("Query 形状:", query.shape)
        print("Output 形状:", output.shape)
        print("注意力权重形状:", attn_weight.shape)
    return {"query": query, "output": output, "weights": attn_weight}


def example_2_self_attention(verbose: bool = True) -> dict:
    """Self-attention: the same tensor as query, key and value."""
    mha = MultiheadAttention(embed_dim=256, num_heads=4)
    x = torch.randn(2, 50, 256)
    output, weights = mha(x, x, x)
    if verbose:
        print("输入形状:", x.shape)
        print("输出形状:", output.shape)
        print("注意力权重形状:", weights.shape)
    return {"x": x, "output": output, "weights": weights}


def example_3_masked(verbose: bool = True) -> dict:
    """Masked (decoder) attention: True in the upper triangle = may not attend to the future."""
    mha = MultiheadAttention(embed_dim=128, num_heads=4)
    x = torch.randn(1, 20, 128)
    mask = torch.triu(torch.ones(20, 20), diagonal=1).bool()
    output, weights = mha(x, x, x, attn_mask=mask)
    if verbose:
        print("输入形状:", x.shape)
        print("Output 形状:", output.shape)
        print("Mask 形状:", mask.shape)
    return {"module": mha, "x": x, "mask": mask, "output": output, "weights": weights}


class TransformerLayer(nn.Module):
    """The page's post-norm encoder layer: self-attention + residual + LayerNorm, then a ReLU
    feed-forward (d_model -> 4 d_model -> d_model) + residual + LayerNorm."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_model * 4), nn.ReLU(), nn.Linear(d_model * 4, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_out, _ = self.self_attn(x, x, x)  # (B, L, E)
        x = self.norm1(x + attn_out)
        ffn_out = self.ffn(x)
        return self.norm2(x + ffn_out)


def page_state_dict(library_state: dict) -> dict:
    """A `multihead.layers.TransformerEncoderLayer` state_dict renamed for the page's `TransformerLayer`
    (its feed-forward is `ffn.0` / `ffn.2` where the library layer, like torch's, has `linear1` / `linear2`)."""
    rename = {"linear1.": "ffn.0.", "linear2.": "ffn.2."}
    return {
        next((new + k[len(old) :] for old, new in rename.items() if k.startswith(old)), k): v
        for k, v in library_state.items()
    }


def example_4_encoder_layer(verbose: bool = True, library_layer: bool = False) -> dict:
    """A full Transformer encoder layer, d_model=512, nhead=8, input (4, 100, 512).

    `library_layer=True` uses `multihead.layers.TransformerEncoderLayer` (the same post-norm layer as a
    class, without dropout as the page's) instead of the page's hand-written `TransformerLayer`."""
    layer: nn.Module
    if library_layer:
        from multihead.layers import TransformerEncoderLayer

        layer = TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=4 * 512, dropout=0.0)
    else:
        layer = TransformerLayer(d_model=512, nhead=8)
    x = torch.randn(4, 100, 512)
    output = layer(x)
    if verbose:
        print("输入形状:", x.shape)
        print("输出形状:", output.shape)
    return {"layer": layer, "x": x, "output": output}


def example_5_weights(verbose: bool = True) -> dict:
    """Looking at attention weights, per head (the page's intent; its code averages the heads)."""
    mha = MultiheadAttention(embed_dim=64, num_heads=2, batch_first=True)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        _, attn = mha(x, x, x, average_attn_weights=False)  # (1, 2, 5, 5)
    attn = attn.squeeze(0)  # (heads, L, S)
    if verbose:
        print("第一个头的注意力权重 (前3个位置):")
        print(attn[0, :3, :3].tolist())
        print("\n可视化 - 位置0对所有位置的注意力:")
        print(np.array2string(attn[0, 0].numpy(), precision=2))
    return {"weights": attn}


EXAMPLES = [example_1_basic, example_2_self_attention, example_3_masked, example_4_encoder_layer, example_5_weights]


def main() -> None:
    torch.manual_seed(0)
    for i, example in enumerate(EXAMPLES, 1):
        assert example.__doc__ is not None  # every example has a docstring: its title
        print(f"\n=== 示例 {i}: {example.__doc__.splitlines()[0]}")
        example()


if __name__ == "__main__":
    main()
