"""multihead.layers: torch's encoder/decoder layer checkpoints load into ours and back, with torch's
numbers (eval, and train with dropout 0), gradients too; incremental decoding equals the full pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multihead import KVCache, MultiheadAttention, RotaryEmbedding
from multihead.examples import page_examples as page
from multihead.layers import MemoryKV, TransformerDecoderLayer, TransformerEncoderLayer

E, H, FF = 16, 4, 24


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def perturb_biases(module: nn.Module) -> None:
    """Non-zero biases and LayerNorm affine parameters, so the tests see them."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def torch_encoder(seed=0, **kw) -> nn.TransformerEncoderLayer:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, FF, **kw)
    perturb_biases(layer)
    return layer


def torch_decoder(seed=0, **kw) -> nn.TransformerDecoderLayer:
    torch.manual_seed(seed)
    layer = nn.TransformerDecoderLayer(E, H, FF, **kw)
    perturb_biases(layer)
    return layer


def seq(B, L, batch_first, seed=1, requires_grad=False):
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(seed))
    x = x if batch_first else x.transpose(0, 1).contiguous()
    return x.requires_grad_(requires_grad)


def padding(B, S):
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[-1, -1] = True
    return pad


def causal_float(L):
    return nn.Transformer.generate_square_subsequent_mask(L)  # (L, L), -inf above the diagonal


def assert_same_grads(theirs: nn.Module, ours: nn.Module, x_theirs, x_ours):
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_state_dicts_move_both_ways(kind):
    theirs = torch_encoder(batch_first=True) if kind == "encoder" else torch_decoder(batch_first=True)
    cls = TransformerEncoderLayer if kind == "encoder" else TransformerDecoderLayer
    ours = cls(E, H, FF)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same names, same order
    for (a, pa), (b, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert a == b and pa.shape == pb.shape
    ours.load_state_dict(theirs.state_dict())  # strict
    back = type(theirs)(E, H, FF, batch_first=True)
    back.load_state_dict(ours.state_dict())
    for name, value in back.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[name]), name
    assert not isinstance(ours, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
    assert isinstance(ours.self_attn, MultiheadAttention)


def test_from_torch_keeps_the_configuration():
    theirs = torch_encoder(batch_first=False, norm_first=True, activation="gelu", layer_norm_eps=1e-6, dropout=0.2)
    ours = TransformerEncoderLayer.from_torch(theirs.eval())
    assert not ours.training and not ours.batch_first and ours.norm_first
    assert ours.activation is F.gelu and ours.norm1.eps == 1e-6 and ours.dropout.p == 0.2
    assert ours.self_attn.dropout == 0.2 and ours.linear1.out_features == FF
    dec = TransformerDecoderLayer.from_torch(torch_decoder(bias=False))
    assert dec.linear1.bias is None and dec.norm3.bias is None and dec.multihead_attn.in_proj_bias is None
    with pytest.raises(TypeError, match="torch.nn.TransformerEncoderLayer"):
        TransformerEncoderLayer.from_torch(dec)


# ---- encoder: torch's numbers -----------------------------------------------------------------
ENCODER_MASKS = {
    "none": lambda L, B: {},
    "padding": lambda L, B: {"src_key_padding_mask": padding(B, L)},
    "causal-float": lambda L, B: {"src_mask": causal_float(L), "is_causal": True},
    "bool+padding": lambda L, B: {
        "src_mask": torch.rand(L, L, generator=torch.Generator().manual_seed(3)) < 0.3,
        "src_key_padding_mask": padding(B, L),
    },
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masks", list(ENCODER_MASKS))
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_matches_torch_train_and_eval(batch_first, norm_first, masks, activation):
    theirs = torch_encoder(dropout=0.0, batch_first=batch_first, norm_first=norm_first, activation=activation)
    ours = TransformerEncoderLayer(E, H, FF, 0.0, activation, batch_first=batch_first, norm_first=norm_first)
    ours.load_state_dict(theirs.state_dict())
    B, L = 3, 7
    kw = ENCODER_MASKS[masks](L, B)
    if masks == "bool+padding":  # keep every row with a visible key: torch gives NaN otherwise
        kw["src_mask"][:, 0] = False
    for train in (True, False):
        theirs.train(train)
        ours.train(train)
        x_t, x_o = seq(B, L, batch_first, requires_grad=True), seq(B, L, batch_first, requires_grad=True)
        a, b = theirs(x_t, **kw), ours(x_o, **kw)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(a)
        a.backward(grad)
        b.backward(grad)
        assert_same_grads(theirs, ours, x_t, x_o)
        theirs.zero_grad()
        ours.zero_grad()
    with torch.no_grad():  # eval + no_grad: torch runs its fused kernel, we run ours
        x = seq(B, L, batch_first)
        torch.testing.assert_close(ours(x, **kw), theirs(x, **kw), rtol=1e-5, atol=1e-5)


def test_encoder_is_causal_without_a_mask_and_zero_rows():
    theirs = torch_encoder(dropout=0.0, batch_first=True).eval()
    ours = TransformerEncoderLayer.from_torch(theirs)
    x = seq(2, 6, True)
    # torch's layer needs the mask for is_causal; ours does not
    torch.testing.assert_close(ours(x, is_causal=True), theirs(x, src_mask=causal_float(6), is_causal=True))
    # a fully padded sequence: zero attention here (torch gives NaN on some of its paths)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1] = True
    out, ref = ours(x, src_key_padding_mask=pad), theirs(x, src_key_padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref[0])
    if torch.isfinite(ref[1]).all():
        torch.testing.assert_close(out[1], ref[1])


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_inside_torchs_encoder_stack():
    """Not a subclass of torch's layer: nn.TransformerEncoder hands it padded tensors, never nested ones."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoder(torch_encoder(dropout=0.0, batch_first=True), 2, enable_nested_tensor=True).eval()
    ours = nn.TransformerEncoder(TransformerEncoderLayer(E, H, FF, 0.0), 2, enable_nested_tensor=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x, pad = seq(3, 7, True), padding(3, 7)
    with torch.no_grad():
        a, b = theirs(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    assert not b.is_nested and b.shape == x.shape
    keep = ~pad  # torch's nested path writes zeros at padded positions; compare the real tokens
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)


def test_encoder_passes_attention_options_through():
    rope = RotaryEmbedding(E // H)
    layer = TransformerEncoderLayer(E, H, FF, 0.0, num_kv_heads=2, rotary=rope, window=2).eval()
    attn = layer.self_attn
    assert attn.num_kv_heads == 2 and attn.rotary is rope and attn.window == (2, 0)
    x = seq(2, 8, True)
    # the window (2 back, none ahead) is the band mask
    i = torch.arange(8)
    band = (i[None, :] > i[:, None]) | (i[None, :] < i[:, None] - 2)  # (L, S), True = hidden
    plain = TransformerEncoderLayer(E, H, FF, 0.0, num_kv_heads=2, rotary=rope).eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x, src_mask=band))


# ---- decoder: torch's numbers -----------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_matches_torch_train_and_eval(batch_first, norm_first):
    theirs = torch_decoder(dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    ours = TransformerDecoderLayer(E, H, FF, 0.0, batch_first=batch_first, norm_first=norm_first)
    ours.load_state_dict(theirs.state_dict())
    B, L, S = 3, 5, 7
    mem_mask = torch.rand(L, S, generator=torch.Generator().manual_seed(4)) < 0.3
    mem_mask[:, 0] = False
    cases = [
        {},
        {"tgt_mask": causal_float(L), "tgt_is_causal": True, "memory_key_padding_mask": padding(B, S)},
        {
            "tgt_mask": torch.ones(L, L, dtype=torch.bool).triu(1),
            "tgt_key_padding_mask": padding(B, L),
            "memory_mask": mem_mask,
        },
    ]
    for kw in cases:
        for train in (True, False):
            theirs.train(train)
            ours.train(train)
            t_t, t_o = seq(B, L, batch_first, 1, True), seq(B, L, batch_first, 1, True)
            memory = seq(B, S, batch_first, 2)
            a, b = theirs(t_t, memory, **kw), ours(t_o, memory, **kw)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            grad = torch.randn_like(a)
            a.backward(grad)
            b.backward(grad)
            assert_same_grads(theirs, ours, t_t, t_o)
            theirs.zero_grad()
            ours.zero_grad()


def test_decoder_weights_back_into_torch():
    ours = TransformerDecoderLayer(E, H, FF, 0.0, activation="gelu", norm_first=True).eval()
    perturb_biases(ours)
    theirs = nn.TransformerDecoderLayer(E, H, FF, 0.0, "gelu", batch_first=True, norm_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    tgt, memory = seq(2, 5, True, 1), seq(2, 6, True, 2)
    torch.testing.assert_close(ours(tgt, memory, tgt_is_causal=True), theirs(tgt, memory, tgt_mask=causal_float(5)))


def test_dropout_is_active_in_train_mode():
    ours = TransformerDecoderLayer(E, H, FF, dropout=0.5)
    tgt, memory = seq(2, 5, True, 1), seq(2, 6, True, 2)
    torch.manual_seed(0)
    a = ours(tgt, memory)
    torch.manual_seed(0)
    assert torch.equal(ours(tgt, memory), a)  # reproducible under a seed
    assert not torch.allclose(ours(tgt, memory), a)  # a fresh draw differs
    ours.eval()
    assert torch.equal(ours(tgt, memory), ours(tgt, memory))


# ---- decoder: incremental decoding ------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("project", [True, False])
def test_incremental_decoding_equals_the_full_pass(batch_first, norm_first, project):
    layer = TransformerDecoderLayer(E, H, FF, 0.0, batch_first=batch_first, norm_first=norm_first).eval()
    perturb_biases(layer)
    B, T, S = 2, 7, 6
    tgt, memory = seq(B, T, batch_first, 1), seq(B, S, batch_first, 2)
    mem_pad = padding(B, S)
    with torch.no_grad():
        full = layer(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=mem_pad)
        cache = layer.new_cache(B, T)
        memory_kv = layer.project_memory(memory) if project else None
        steps, t = [], 0
        for n in (3, 1, 1, 2):  # a prompt of 3, then single tokens, then 2 at once
            new = tgt[:, t : t + n] if batch_first else tgt[t : t + n]
            steps.append(
                layer(
                    new,
                    None if project else memory,
                    memory_key_padding_mask=mem_pad,
                    kv_cache=cache,
                    memory_kv=memory_kv,
                )
            )
            t += n
    incremental = torch.cat(steps, dim=1 if batch_first else 0)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [T] * B


def test_incremental_decoding_with_gqa_rotary_and_window():
    rope = RotaryEmbedding(E // H, interleaved=True)
    layer = TransformerDecoderLayer(E, H, FF, 0.0, num_kv_heads=2, rotary=rope, window=3).eval()
    perturb_biases(layer)
    assert layer.multihead_attn.num_kv_heads == 2 and layer.multihead_attn.rotary is None
    B, T, S = 2, 6, 5
    tgt, memory = seq(B, T, True, 1), seq(B, S, True, 2)
    with torch.no_grad():
        full = layer(tgt, memory, tgt_is_causal=True)
        cache = layer.new_cache(B, T)
        assert (cache.num_kv_heads, cache.head_dim) == (2, E // H)
        memory_kv = layer.project_memory(memory)
        assert memory_kv.k.shape == (B, 2, S, E // H)
        steps = [layer(tgt[:, t : t + 1], None, kv_cache=cache, memory_kv=memory_kv) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_memory_kv_in_a_full_pass_and_its_gradients():
    layer = TransformerDecoderLayer(E, H, FF, 0.0)
    perturb_biases(layer)
    tgt, memory = seq(2, 5, True, 1), seq(2, 6, True, 2, requires_grad=True)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(5)) < 0.3
    mask[:, 0] = False
    a = layer(tgt, memory, tgt_is_causal=True, memory_mask=mask)
    ga = torch.autograd.grad(a.square().sum(), [memory, layer.multihead_attn.in_proj_weight])
    b = layer(tgt, None, tgt_is_causal=True, memory_mask=mask, memory_kv=layer.project_memory(memory))
    gb = torch.autograd.grad(b.square().sum(), [memory, layer.multihead_attn.in_proj_weight])
    torch.testing.assert_close(b, a)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_decoder_errors():
    layer = TransformerDecoderLayer(E, H, FF, 0.0)
    tgt, memory = seq(2, 3, True, 1), seq(2, 4, True, 2)
    cache = layer.new_cache(2, 8)
    with pytest.raises(ValueError, match="tgt_mask and tgt_key_padding_mask are not supported with kv_cache"):
        layer(tgt, memory, tgt_mask=causal_float(3), kv_cache=cache)
    with pytest.raises(ValueError, match="memory is None"):
        layer(tgt, None)
    wrong = MemoryKV(torch.zeros(3, H, 4, E // H), torch.zeros(3, H, 4, E // H))
    with pytest.raises(ValueError, match="memory_kv must hold"):
        layer(tgt, None, memory_kv=wrong)
    with pytest.raises(ValueError, match=r"memory must be \(B, S, E\) with E = 16"):
        layer.project_memory(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="memory_kv needs batched tgt"):
        layer(tgt[0], None, memory_kv=layer.project_memory(memory))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(
            tgt,
            None,
            memory_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool),
            memory_kv=layer.project_memory(memory),
        )
    with pytest.raises(ValueError, match='activation must be "relu", "gelu" or a callable'):
        TransformerEncoderLayer(E, H, activation="swish")
    with pytest.raises(TypeError, match="activation must be"):
        TransformerDecoderLayer(E, H, activation=3)
    assert isinstance(cache, KVCache)


def test_unbatched_inputs_match_torch():
    theirs = torch_encoder(dropout=0.0).eval()
    ours = TransformerEncoderLayer.from_torch(theirs)
    x = seq(1, 5, True)[0]  # (L, E)
    torch.testing.assert_close(ours(x), theirs(x))
    dec_t = torch_decoder(dropout=0.0).eval()
    dec_o = TransformerDecoderLayer.from_torch(dec_t)
    torch.testing.assert_close(dec_o(x, seq(1, 4, True, 2)[0]), dec_t(x, seq(1, 4, True, 2)[0]))


def test_callable_activation_and_pickling(tmp_path):
    layer = TransformerEncoderLayer(E, H, FF, 0.0, activation=nn.GELU())
    assert "activation.approximate" not in layer.state_dict()  # a parameterless module adds no keys
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded.activation, nn.GELU)
    x = seq(2, 4, True)
    torch.testing.assert_close(loaded(x), layer(x))


# ---- the page's example 4 -----------------------------------------------------------------------
def test_page_example_4_with_the_library_layer():
    torch.manual_seed(0)
    r = page.example_4_encoder_layer(verbose=False, library_layer=True)
    layer = r["layer"]
    assert isinstance(layer, TransformerEncoderLayer) and r["output"].shape == (4, 100, 512)
    # the page's hand-written layer with the same weights computes the same thing
    hand = page.TransformerLayer(512, 8)
    hand.load_state_dict(page.page_state_dict(layer.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(hand(r["x"]), r["output"], rtol=1e-5, atol=1e-5)
