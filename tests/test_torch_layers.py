"""Our module inside PyTorch's own Transformer layers: same outputs (train and eval, masks and
padding), the same training curve, and our forward is what runs in eval too (counted), so our
semantics (zeros for rows that see no key, hooks) hold on every path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multihead import MultiheadAttention, replace_attention


def swap_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` with every torch MultiheadAttention replaced by ours (same weights and layout)."""
    model = replace_attention(copy.deepcopy(model))
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    assert any(isinstance(m, MultiheadAttention) for m in model.modules())
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


# ---- our forward runs inside torch's layers in eval too -----------------------------------------
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls to our forward (patching the class, so no hook changes which path torch takes)."""
    calls = []
    forward = MultiheadAttention.forward

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("key_padding_mask") is not None)
        assert not args[0].is_nested, "a nested tensor reached our forward"
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MultiheadAttention, "forward", counted)
    return calls


def fast_path_encoder(num_layers=2, E=16, H=4):
    """A torch encoder that takes every fused eval shortcut torch has (batch_first, post-norm,
    even heads, enable_nested_tensor at its default), dropout 0 so train and eval agree."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers)


def encoder_inputs(B=3, L=6, E=16):
    src = torch.randn(B, L, E, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, -2:] = True  # left aligned, so torch would convert to a nested tensor
    dead_row = torch.zeros(L, L, dtype=torch.bool)
    dead_row[0] = True  # query 0 sees no key
    return src, pad, dead_row


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_encoder_in_eval_runs_our_forward(grad_mode, count_calls):
    theirs = fast_path_encoder()
    assert theirs.use_nested_tensor  # torch decided, from its own module, to convert padded input
    ours = swap_attention(theirs)
    assert not ours.use_nested_tensor and ours.enable_nested_tensor
    src, pad, dead_row = encoder_inputs()
    calls = [dict(), dict(src_key_padding_mask=pad), dict(mask=dead_row), dict(mask=dead_row, src_key_padding_mask=pad)]
    for kw in calls:
        count_calls.clear()
        trained = ours.train()(src, **kw)  # train mode never takes torch's shortcuts
        assert len(count_calls) == 2
        count_calls.clear()
        with GRAD_MODES[grad_mode]():
            evaluated = ours.eval()(src, **kw)
        assert len(count_calls) == 2, f"{kw.keys()}: our forward ran {len(count_calls)} times in eval, not 2"
        assert not evaluated.is_nested and torch.isfinite(evaluated).all()
        torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-6, atol=1e-6)
        with torch.no_grad():  # torch's own unfused path agrees wherever it has no NaN
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                reference = theirs.eval()(src, **kw)
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
        alive = torch.isfinite(reference).all(-1)
        torch.testing.assert_close(evaluated[alive], reference[alive], rtol=1e-5, atol=1e-5)
    # torch's fused kernel gives NaN on the row that sees no key; ours gives finite numbers there
    with torch.no_grad():
        fused = theirs.eval()(src, mask=dead_row)
    assert torch.isnan(fused[:, 0]).all()


def test_hooks_fire_inside_the_encoder_in_eval():
    ours = swap_attention(fast_path_encoder())
    src, pad, _ = encoder_inputs()
    seen = []
    ours.layers[0].self_attn.register_forward_hook(lambda m, args, out: seen.append(out[0].shape))
    with torch.inference_mode():
        ours.eval()(src, src_key_padding_mask=pad)
    assert seen == [src.shape]


def test_encoder_built_around_ours_is_fixed_by_replace_attention(count_calls):
    """Built from a layer that holds ours already: torch reads our (truthful) attributes and decides to
    convert; replace_attention (nothing left to swap) turns the conversion off."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    layer.self_attn = MultiheadAttention.from_torch(layer.self_attn)
    encoder = nn.TransformerEncoder(layer, 2)
    assert encoder.use_nested_tensor
    assert replace_attention(encoder) is encoder and not encoder.use_nested_tensor
    src, pad, _ = encoder_inputs()
    with torch.no_grad():
        out = encoder.eval()(src, src_key_padding_mask=pad)
    assert len(count_calls) == 2 and not out.is_nested


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_decoder_layer_in_eval_runs_our_forward(grad_mode, count_calls):
    torch.manual_seed(0)
    ours = swap_attention(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    src, pad, dead_row = encoder_inputs()
    tgt = src[:, :4] + 1
    tgt_mask = dead_row[:4, :4]
    call = lambda m: m(tgt, src, tgt_mask=tgt_mask, memory_key_padding_mask=pad)  # noqa: E731
    trained = call(ours.train())
    count_calls.clear()
    with GRAD_MODES[grad_mode]():
        evaluated = call(ours.eval())
    assert len(count_calls) == 2  # self-attention and cross-attention
    assert torch.isfinite(evaluated).all()
    torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_full_transformer_in_eval_runs_our_forward(grad_mode, count_calls):
    torch.manual_seed(0)
    theirs = nn.Transformer(16, 4, 2, 1, 32, dropout=0.0, batch_first=True)
    ours = swap_attention(theirs)
    assert not ours.encoder.use_nested_tensor
    src, pad, dead_row = encoder_inputs()
    tgt = src[:, :4] + 1
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    for kw in (dict(src_key_padding_mask=pad, memory_key_padding_mask=pad), dict(src_mask=dead_row)):
        trained = ours.train()(src, tgt, tgt_mask=causal, **kw)
        count_calls.clear()
        with GRAD_MODES[grad_mode]():
            evaluated = ours.eval()(src, tgt, tgt_mask=causal, **kw)
        assert len(count_calls) == 2 + 2 * 1  # 2 encoder layers, 1 decoder layer with two attentions
        assert torch.isfinite(evaluated).all()
        torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-6, atol=1e-6)


def test_replace_attention_keeps_parameters_ties_and_modes():
    torch.manual_seed(0)
    model = nn.Transformer(16, 4, 1, 1, 32, dropout=0.1, batch_first=False).double()
    model.decoder.layers[0].self_attn.train(False)
    shared = nn.MultiheadAttention(16, 4)
    holder = nn.ModuleDict({"a": shared, "b": shared, "model": model})
    before = {id(p) for p in holder.parameters()}
    optimizer = torch.optim.SGD(holder.parameters(), lr=0.1)
    replaced = replace_attention(holder)
    assert replaced is holder
    assert holder["a"] is holder["b"] and isinstance(holder["a"], MultiheadAttention)
    assert {id(p) for p in holder.parameters()} == before  # the same tensors: the optimizer still holds them
    assert len(optimizer.param_groups[0]["params"]) == len(list(holder.parameters()))
    attn = model.decoder.layers[0].self_attn
    assert type(attn) is MultiheadAttention and not attn.batch_first and not attn.training
    assert model.encoder.layers[0].self_attn.training
    assert attn.in_proj_weight.dtype == torch.float64
    # a bare torch module comes back replaced
    bare = nn.MultiheadAttention(8, 2, kdim=3, vdim=5)
    assert type(replace_attention(bare)) is MultiheadAttention
