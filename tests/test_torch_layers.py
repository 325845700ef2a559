"""Our module inside PyTorch's own Transformer layers: same outputs (train and eval, masks and
padding), and the same training curve."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multihead import MultiheadAttention


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace every torch MultiheadAttention inside `model` with ours (same weights and layout)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, name, MultiheadAttention.from_torch(child))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    return model


def data(batch_first: bool, B=3, S=7, T=5, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, S, E, generator=g)
    tgt = torch.randn(B, T, E, generator=g)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, -1] = True
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    return src, tgt, pad, causal


def same_outputs(theirs, ours, call, train: bool, seed=1):
    theirs.train(train)
    ours.train(train)
    torch.manual_seed(seed)
    a = call(theirs)
    torch.manual_seed(seed)
    b = call(ours)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_encoder_layer(batch_first, norm_first, train):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    ours = swap_attention(theirs)
    src, _, pad, _ = data(batch_first)
    mask = nn.Transformer.generate_square_subsequent_mask(src.shape[1 if batch_first else 0])
    same_outputs(theirs, ours, lambda m: m(src), train)
    same_outputs(theirs, ours, lambda m: m(src, src_key_padding_mask=pad), train)
    same_outputs(theirs, ours, lambda m: m(src, src_mask=mask, is_causal=True), train)
    with torch.no_grad():  # eval + no_grad: torch may take its fused kernel on our weights
        same_outputs(theirs, ours, lambda m: m(src, src_key_padding_mask=pad), train)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_decoder_layer(batch_first, train):
    torch.manual_seed(0)
    theirs = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first)
    ours = swap_attention(theirs)
    src, tgt, pad, causal = data(batch_first)
    call = lambda m: m(tgt, src, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)  # noqa: E731
    same_outputs(theirs, ours, call, train)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_full_transformer(batch_first, train):
    torch.manual_seed(0)
    theirs = nn.Transformer(16, 4, 2, 2, 32, dropout=0.1, batch_first=batch_first)
    ours = swap_attention(theirs)
    src, tgt, pad, causal = data(batch_first)
    call = lambda m: m(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)  # noqa: E731
    same_outputs(theirs, ours, call, train)
    with torch.no_grad():
        same_outputs(theirs, ours, call, train)


def test_same_training_curve():
    torch.manual_seed(0)
    theirs = nn.Transformer(16, 4, 1, 1, 32, dropout=0.1, batch_first=True)
    ours = swap_attention(theirs)
    src, tgt, pad, causal = data(True)
    target = torch.randn_like(tgt)
    curves = []
    for model in (theirs, ours):
        torch.manual_seed(5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(15):
            opt.zero_grad()
            out = model(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
            loss = nn.functional.mse_loss(out, target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it trains
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)
