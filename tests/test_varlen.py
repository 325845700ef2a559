"""Variable-length batches (varlen.py): the packed path behind key_padding_mask, nested inputs, torch's
encoder with padding, and a client that packs sets into a dense batch.

Oracles: torch's module (where it expresses the call and gives finite numbers) and our float64
reference (`backend="reference"`, which never packs: a forced backend turns the packed path off), both
held to the flash rule against the float32 padded path.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import multihead.varlen as varlen
from multihead import MultiheadAttention
from multihead.rotary import RotaryEmbedding

from helpers import assert_flash_rule, cotangent, pair

E, H = 16, 4


@pytest.fixture(autouse=True)
def _small_threads(one_thread):
    yield


@pytest.fixture
def always_pack(monkeypatch):
    """Let the packed path serve every call with a bool key_padding_mask (the threshold is a speed
    decision, tested on its own); count the calls so a test knows the path ran."""
    monkeypatch.setattr(varlen, "PACK_MIN_SHARE", 0.0)
    monkeypatch.setattr(varlen, "PACK_MIN_ELEMENTS", 0)
    calls = []
    original = varlen.packed_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(varlen, "packed_attention", spy)
    return calls


def draw_padding(batch: int, length: int, side: str, rng: random.Random, allow_empty: bool) -> torch.Tensor:
    """Bool (B, S), True = padding, on the given side: right, left, scattered or mixed (per row)."""
    pad = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        n = rng.randint(0 if allow_empty else 1, length)  # valid keys
        row_side = rng.choice(["right", "left", "scattered"]) if side == "mixed" else side
        if row_side == "right":
            pad[b, n:] = True
        elif row_side == "left":
            pad[b, : length - n] = True
        else:
            pad[b, rng.sample(range(length), length - n)] = True
    if not pad.any():
        pad[0, -1] = True
    return pad


def run(module, inputs, kwargs, dtype, grads_of=()):
    """Forward + backward of `module` (cast to dtype) on fresh copies of inputs: (out, weights, grads)."""
    module = copy.deepcopy(module).to(dtype)
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    if len(xs) == 1:
        xs = xs * 3  # self-attention: query is key is value
    kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    out, attn = module(*xs, **kw)
    g = torch.Generator().manual_seed(7)
    loss = (out * cotangent(out, g)).sum()
    if attn is not None:
        loss = loss + (attn * cotangent(attn, g)).sum()
    loss.backward()
    grads = {f"input{i}": x.grad for i, x in enumerate(dict.fromkeys(xs))}
    grads |= {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out, attn, grads


def draw_case(seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch = rng.randint(1, 4)
    self_attn = rng.random() < 0.6
    q_len = rng.randint(1, 12)
    k_len = q_len if self_attn else rng.randint(1, 12)
    side = rng.choice(["right", "left", "scattered", "mixed"])
    pad = draw_padding(batch, k_len, side, rng, allow_empty=rng.random() < 0.3)
    extra = rng.choice(["none", "causal", "bool2d", "float3d"])
    ours_only = rng.choice([None, None, "gqa", "rotary", "window"])
    batch_first = rng.random() < 0.7
    kwargs = {"key_padding_mask": pad, "need_weights": rng.random() < 0.5, "average_attn_weights": rng.random() < 0.5}
    if extra == "causal":
        kwargs["attn_mask"] = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
        kwargs["is_causal"] = True
    elif extra == "bool2d":
        kwargs["attn_mask"] = torch.rand(q_len, k_len, generator=g) < 0.3
    elif extra == "float3d":
        kwargs["attn_mask"] = torch.randn(batch * H, q_len, k_len, generator=g)
    shape = (lambda n: (batch, n, E)) if batch_first else (lambda n: (n, batch, E))
    inputs = [torch.randn(shape(q_len), generator=g)]
    if not self_attn:
        inputs += [torch.randn(shape(k_len), generator=g), torch.randn(shape(k_len), generator=g)]
    return inputs, kwargs, ours_only, batch_first, side


def build(ours_only, batch_first):
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=batch_first)
    if ours_only is None:
        return theirs, ours
    config = {
        "gqa": {"num_kv_heads": 2},
        "rotary": {"rotary": RotaryEmbedding(E // H)},
        "window": {"window": (2, 1)},
        "gqa_rotary": {"num_kv_heads": 2, "rotary": RotaryEmbedding(E // H)},
    }[ours_only]
    torch.manual_seed(3)
    ours = MultiheadAttention(E, H, batch_first=batch_first, **config)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return None, ours


@pytest.mark.parametrize("seed", range(40))
def test_random_padded_batches(seed, always_pack):
    inputs, kwargs, ours_only, batch_first, side = draw_case(seed)
    theirs, ours = build(ours_only, batch_first)
    check_against_oracles(theirs, ours, inputs, kwargs, always_pack)


@pytest.mark.parametrize("side", ["right", "left", "scattered"])
@pytest.mark.parametrize("extra", ["causal", "window", "bool2d", "float3d", "gqa_rotary_causal"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_every_mask_with_every_padding(side, extra, need_weights, always_pack):
    """Each mask kind over each padding side (slices shift the band, gathers pick its columns)."""
    g = torch.Generator().manual_seed(5)
    B, L = 3, 9
    pad = draw_padding(B, L, side, random.Random(4), allow_empty=False)
    pad[0, [1, 4] if side == "scattered" else ([-3, -2, -1] if side == "right" else [0, 1, 2])] = True
    kwargs = {"key_padding_mask": pad, "need_weights": need_weights, "average_attn_weights": False}
    ours_only = None
    if extra in ("causal", "gqa_rotary_causal"):
        kwargs["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
        kwargs["is_causal"] = True
        ours_only = "gqa_rotary" if extra == "gqa_rotary_causal" else None
    elif extra == "window":
        ours_only = "window"
    elif extra == "bool2d":
        kwargs["attn_mask"] = torch.rand(L, L, generator=g) < 0.3
    else:
        kwargs["attn_mask"] = torch.randn(B * H, L, L, generator=g)
    theirs, ours = build(ours_only, batch_first=True)
    check_against_oracles(theirs, ours, [torch.randn(B, L, E, generator=g)], kwargs, always_pack)


def check_against_oracles(theirs, ours, inputs, kwargs, always_pack):
    """Ours (packed) vs the float64 reference (flash rule against the float32 padded path) and vs
    torch where it can express the call, forward and backward."""
    out, attn, grads = run(ours, inputs, kwargs, torch.float32)
    assert always_pack, "the packed path did not serve the call"
    served = len(always_pack)

    reference = copy.deepcopy(ours)
    reference.backend = "reference"  # a forced backend: the padded path
    exact_out, exact_attn, exact_grads = run(reference, inputs, kwargs, torch.float64)
    base_out, base_attn, base_grads = run(reference, inputs, kwargs, torch.float32)
    assert len(always_pack) == served, "a forced backend must not pack"
    assert_flash_rule(out, base_out, exact_out, "out")
    if kwargs["need_weights"]:
        assert_flash_rule(attn, base_attn, exact_attn, "weights")
        columns = (
            kwargs["key_padding_mask"][:, None, :] if attn.dim() == 3 else kwargs["key_padding_mask"][:, None, None]
        )
        assert (attn.masked_select(columns.expand_as(attn)) == 0).all(), "padding columns must be zero"
    else:
        assert attn is None
    assert grads.keys() == exact_grads.keys()
    # a gradient that is zero in exact arithmetic (a query that sees one key passes none to it) gets
    # the round-off of terms as large as the call's other gradients: the floor scales with them
    grad_atol = 1e-6 * max(1.0, *(g.abs().max().item() for g in exact_grads.values() if g.numel()))
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        assert_flash_rule(grads[name], base_grads[name], exact_grads[name], f"grad {name}", atol=grad_atol)

    if theirs is None:
        return
    t_out, t_attn, t_grads = run(theirs, inputs, kwargs, torch.float32)
    if not torch.isfinite(t_out).all():  # torch: NaN rows where a query sees no key; ours: zero attention
        finite = torch.isfinite(t_out).all(-1)
        assert_flash_rule(out[finite], t_out[finite], exact_out[finite], "out vs torch (finite rows)")
        return
    assert_flash_rule(out, t_out, exact_out, "out vs torch")
    if kwargs["need_weights"]:
        assert_flash_rule(attn, t_attn, exact_attn, "weights vs torch")
    for name in grads:
        assert_flash_rule(grads[name], t_grads[name], exact_grads[name], f"grad {name} vs torch", atol=grad_atol)


@pytest.mark.parametrize("side", ["right", "left", "scattered"])
def test_sequence_without_keys_gives_zero_attention(side, always_pack):
    """A fully padded sequence: zero attention output (so the out-projection's bias), zero weights,
    finite gradients, the other sequences untouched (the CPU flash op would crash on S = 0)."""
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=True)
    x = torch.randn(3, 6, E)
    pad = draw_padding(3, 6, side, random.Random(1), allow_empty=False)
    pad[1] = True
    out, attn, grads = run(ours, [x], {"key_padding_mask": pad}, torch.float32)
    assert always_pack
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(6, E), rtol=0, atol=0)
    assert (attn[1] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    t_out, t_attn, _ = run(theirs, [x], {"key_padding_mask": pad}, torch.float32)
    keep = [0, 2]
    torch.testing.assert_close(out[keep], t_out[keep])
    torch.testing.assert_close(attn[keep], t_attn[keep])
    # every key of the batch padded
    out, attn, grads = run(ours, [x], {"key_padding_mask": torch.ones(3, 6, dtype=torch.bool)}, torch.float32)
    torch.testing.assert_close(out, ours.out_proj.bias.expand(3, 6, E), rtol=0, atol=0)
    assert (attn == 0).all()
    assert grads["input0"] is None  # nothing is attended: the output does not depend on the input
    assert all(torch.isfinite(g).all() for n, g in grads.items() if n != "input0")


def test_dropout_weights_are_the_ones_applied(always_pack):
    """With dropout the returned (per-head) weights rebuild the output, and padding stays zero."""
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, dropout=0.5, batch_first=True, num_kv_heads=2).train()
    x = torch.randn(2, 9, E)
    pad = draw_padding(2, 9, "scattered", random.Random(2), allow_empty=False)
    out, attn = ours(x, x, x, key_padding_mask=pad, average_attn_weights=False)  # (B, H, L, S)
    assert always_pack
    assert (attn.masked_select(pad[:, None, None].expand_as(attn)) == 0).all()
    kept = attn[~pad[:, None, None].expand_as(attn)]
    assert ((kept == 0) | (kept > 0)).all() and (kept == 0).any(), "dropout zeroes some weights"
    D = E // H
    v = nn.functional.linear(x, ours.v_proj_weight, ours.in_proj_bias[-2 * D :])  # (B, S, Hkv*D), GQA layout
    v = v.unflatten(-1, (2, D)).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, S, D)
    rebuilt = (attn @ v).transpose(1, 2).flatten(2)  # (B, L, E)
    torch.testing.assert_close(out, ours.out_proj(rebuilt))


def test_threshold_declines_small_padding():
    """Below PACK_MIN_SHARE the packed path declines (and says why); above, it serves."""
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=True)
    B, L = 2, 256
    x = torch.randn(B, L, E)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[:, L - 8 :] = True  # 3 % of the keys
    from multihead.masks import build_mask

    def reasons(p):
        mask = build_mask(
            attn_mask=None, key_padding_mask=p, is_causal=False, batch=B, heads=H, q_len=L, k_len=L,
            batched=True, device=x.device,
        )  # fmt: skip
        return varlen.not_supported_reasons(
            x, mask, backend=None, has_bias_kv=False, add_zero_attn=False, kv_cache=None
        )

    why = reasons(pad)
    assert len(why) == 1 and "PACK_MIN_SHARE" in why[0] and "3.1%" in why[0]
    pad[:, L // 2 :] = True
    assert reasons(pad) == []
    out, _ = ours(x, x, x, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(out, theirs(x, x, x, key_padding_mask=pad, need_weights=False)[0])
    assert "float" in reasons(pad.float().masked_fill(pad, float("-inf")))[0]


def test_float_key_padding_mask_is_served_by_the_normal_path(always_pack):
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=True)
    x = torch.randn(2, 5, E)
    pad = torch.zeros(2, 5).index_fill_(1, torch.tensor([3, 4]), float("-inf"))
    out, w = ours(x, x, x, key_padding_mask=pad)
    assert not always_pack
    t_out, t_w = theirs(x, x, x, key_padding_mask=pad)
    torch.testing.assert_close(out, t_out)
    torch.testing.assert_close(w, t_w)


# ---- nested tensors ----------------------------------------------------------------------------------
def nested(seqs, layout, requires_grad=False):
    return torch.nested.as_nested_tensor(
        [s.detach().clone().requires_grad_(requires_grad) for s in seqs], layout=layout
    )


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_nested_inputs_match_per_sequence_attention(layout, train, cross):
    """Each sequence of a nested batch gets exactly what torch's module gives it alone; output nested
    in the input's layout; weights a nested tensor of (L_i, S_i) (or (H, L_i, S_i)); gradients flow."""
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=True)
    ours.train(train)
    theirs.train(train)
    g = torch.Generator().manual_seed(0)
    q_lens, k_lens = [3, 7, 1], ([5, 2, 4] if cross else [3, 7, 1])
    qs = [torch.randn(n, E, generator=g) for n in q_lens]
    ks = [torch.randn(n, E, generator=g) for n in k_lens] if cross else qs
    vs = [torch.randn(n, E, generator=g) for n in k_lens] if cross else qs
    with torch.set_grad_enabled(train):
        query = nested(qs, layout, requires_grad=train)
        key, value = (nested(ks, layout), nested(vs, layout)) if cross else (query, query)
        for average in (True, False):
            out, attn = ours(query, key, value, average_attn_weights=average)
            assert out.is_nested and out.layout == layout
            assert attn.is_nested
            for i, (o, w) in enumerate(zip(out.unbind(), attn.unbind())):
                t_o, t_w = theirs(qs[i], ks[i], vs[i], average_attn_weights=average)
                torch.testing.assert_close(o, t_o)
                torch.testing.assert_close(w, t_w)
        out, attn = ours(query, key, value, need_weights=False, is_causal=not cross)
        assert attn is None
        for i, o in enumerate(out.unbind()):
            causal = None if cross else torch.ones(q_lens[i], q_lens[i], dtype=torch.bool).triu(1)
            torch.testing.assert_close(o, theirs(qs[i], ks[i], vs[i], attn_mask=causal)[0])
    if train:
        out.to_padded_tensor(0.0).sum().backward()
        assert ours.in_proj_weight.grad is not None and torch.isfinite(ours.in_proj_weight.grad).all()
        for t, grad in zip(qs, query.grad.unbind() if query.grad is not None else []):
            assert grad.shape == t.shape


def test_nested_errors():
    _, ours = pair(embed_dim=E, num_heads=H, batch_first=True)
    x = nested([torch.randn(3, E), torch.randn(2, E)], torch.strided)
    dense = torch.randn(2, 3, E)
    with pytest.raises(ValueError, match="all nested tensors or all dense"):
        ours(x, dense, dense)
    with pytest.raises(ValueError, match="key_padding_mask must be None"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be None"):
        ours(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
    j = nested([torch.randn(3, E), torch.randn(2, E)], torch.jagged)
    with pytest.raises(ValueError, match="one layout"):
        ours(x, j, j)


# ---- torch's encoder with padding -------------------------------------------------------------------
@pytest.mark.parametrize("hook", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad", "inference"])
def test_transformer_encoder_with_padding(hook, mode, always_pack):
    """The README way: swap ours into every layer of an already-built encoder; in eval the encoder
    hands a strided nested tensor to the attention whenever its fused path is off (a hook suffices)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, 2)
    ours = copy.deepcopy(theirs)
    for lay in ours.layers:
        lay.self_attn = MultiheadAttention.from_torch(lay.self_attn)
    seen = []
    if hook:
        for model in (theirs, ours):
            for lay in model.layers:
                lay.self_attn.register_forward_hook(lambda m, args, out: seen.append(args[0].is_nested))
    x = torch.randn(3, 7, E)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    for model in (theirs, ours):
        model.train(mode == "train")
    context = {"train": torch.enable_grad, "eval": torch.enable_grad, "no_grad": torch.no_grad}.get(
        mode, torch.inference_mode
    )
    with context():
        got = ours(x, src_key_padding_mask=pad)
        want = theirs(x, src_key_padding_mask=pad)
    valid = ~pad
    torch.testing.assert_close(got[valid], want[valid])
    if mode == "train":
        got.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    if hook and mode in ("no_grad", "inference"):
        assert any(seen), "the encoder was expected to hand nested tensors to the attention"


# ---- a client that packs sets into a dense batch (graph libraries' to_dense_batch) ------------------------
def to_dense_batch(x: torch.Tensor, index: torch.Tensor, num_sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) items with set ids (N,) sorted -> dense (num_sets, M, E), bool mask (num_sets, M) True = real."""
    counts = torch.bincount(index, minlength=num_sets)
    m = int(counts.max()) if counts.numel() else 0
    position = torch.arange(index.numel()) - torch.cumsum(counts, 0).sub(counts)[index]
    dense = x.new_zeros(num_sets, max(m, 1), x.shape[-1])
    real = torch.zeros(num_sets, max(m, 1), dtype=torch.bool)
    dense = dense.index_put((index, position), x)
    real[index, position] = True
    return dense, real


class SetEncoder(nn.Module):
    """Self-attention within each set of a batch of sets, returned per item (N, E)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, index: torch.Tensor, num_sets: int) -> torch.Tensor:
        dense, real = to_dense_batch(x, index, num_sets)
        out, _ = self.attn(dense, dense, dense, key_padding_mask=~real, need_weights=False)
        return out[real]  # (N, E)


def test_set_client_with_an_empty_set(always_pack):
    theirs, ours = pair(embed_dim=E, num_heads=H, batch_first=True)
    sizes = [5, 0, 2, 7, 1]
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(int(sum(sizes)), E, requires_grad=True)
    client = SetEncoder(ours)
    out = client(x, index, len(sizes))
    assert always_pack
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # oracle: torch's module on each non-empty set alone, float64
    exact = copy.deepcopy(theirs).double()
    x64 = x.detach().double().requires_grad_()
    parts, start = [], 0
    for n in sizes:
        if n:
            item = x64[start : start + n]
            parts.append(exact(item, item, item, need_weights=False)[0])
        start += n
    want = torch.cat(parts)
    (want * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for (name, p), (_, p64) in zip(ours.named_parameters(), exact.named_parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-5, msg=name)
    # torch's module in the same client (the second oracle)
    x_torch = x.detach().clone().requires_grad_()
    t_out = SetEncoder(theirs)(x_torch, index, len(sizes))
    (t_out * g).sum().backward()
    torch.testing.assert_close(out, t_out)
    torch.testing.assert_close(x.grad, x_torch.grad)


# ---- CUDA ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn is CUDA-only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_varlen_kernel(dtype, always_pack):
    _, ours = pair(embed_dim=64, num_heads=4, batch_first=True)
    ours = ours.cuda()
    x = torch.randn(4, 33, 64, device="cuda")
    pad = draw_padding(4, 33, "mixed", random.Random(0), allow_empty=False).cuda()
    calls = []
    original = varlen._varlen_kernel
    varlen._varlen_kernel = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        out, _, grads = run(ours, [x], {"key_padding_mask": pad, "need_weights": False}, dtype)
    finally:
        varlen._varlen_kernel = original
    assert calls
    reference = copy.deepcopy(ours)
    reference.backend = "reference"
    exact_out, _, exact_grads = run(reference, [x], {"key_padding_mask": pad, "need_weights": False}, torch.float64)
    base_out, _, base_grads = run(reference, [x], {"key_padding_mask": pad, "need_weights": False}, dtype)
    assert_flash_rule(out, base_out, exact_out, "out", atol=1e-3)
    for name in grads:
        assert_flash_rule(grads[name], base_grads[name], exact_grads[name], f"grad {name}", atol=1e-3)


@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_and_nested_paths_end_as_the_dense_one(always_pack, batch_first):
    """out_proj is called as a module (its hooks fire, FSDP2 can shard it alone) and the output is
    not a view, with torch's (L, B, E) strides, on the packed path and the nested path too."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ours = MultiheadAttention.from_torch(theirs)
    seen = []
    ours.out_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = torch.randn((2, 6, 16) if batch_first else (6, 2, 16))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    out, _ = ours(x, x, x, key_padding_mask=pad)
    expected, _ = theirs(x, x, x, key_padding_mask=pad)
    assert always_pack == [1] and len(seen) == 1
    assert out._base is None and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if batch_first:  # nested input (batch first only): the same ending
        nested = torch.nested.nested_tensor([x[0], x[1, :4]], layout=torch.jagged)
        ours.eval()
        with torch.no_grad():
            ours(nested, nested, nested, need_weights=False)
        assert len(seen) == 2
