"""Parity with torch.nn.MultiheadAttention and with our float64 reference.

Several hundred configurations, drawn deterministically from every constructor flag, both layouts,
batched and unbatched, every mask kind and every weights mode. Each compares outputs, weights and the
gradients of the inputs and of every parameter: to torch at the same precision (tight), and to the
float64 reference by the flash-attn rule (our error at most 2x torch's own error).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from helpers import assert_flash_rule, cotangent, first_error, inputs, pair, random_bool_mask

MASK_KINDS = [
    "none",
    "bool2d",
    "float2d",
    "causal_bool",
    "causal_float",
    "is_causal",
    "bool3d",
    "float3d",
    "kpm_bool",
    "kpm_float",
    "bool2d+kpm",
    "causal+kpm",
    "float3d+kpm_bool",
]


def draw_configs(n: int, seed: int = 1234):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        heads = rng.choice([1, 2, 3, 4])
        e = heads * rng.choice([2, 3, 5, 8])
        cross = rng.random() < 0.4
        same_len = rng.random() < 0.6 or not cross
        q_len = rng.choice([1, 3, 5, 7])
        out.append(
            dict(
                id=i,
                embed_dim=e,
                num_heads=heads,
                bias=rng.random() < 0.8,
                add_bias_kv=rng.random() < 0.3,
                add_zero_attn=rng.random() < 0.3,
                kdim=rng.choice([None, 5, 9]) if cross else None,
                vdim=rng.choice([None, 4, 10]) if cross else None,
                batch_first=rng.random() < 0.5,
                batch=rng.choice([None, 1, 2, 3]),
                q_len=q_len,
                k_len=q_len if same_len else rng.choice([2, 4, 6]),
                self_attn=not cross and rng.random() < 0.7,
                mask=MASK_KINDS[i % len(MASK_KINDS)],
                need_weights=rng.random() < 0.6,
                average=rng.random() < 0.5,
                dtype=rng.choice([torch.float32, torch.float64]),
            )
        )
    return out


def make_masks(cfg, g):
    """Returns (attn_mask, key_padding_mask, is_causal for ours, is_causal for torch)."""
    kind, L, S, H, B = cfg["mask"], cfg["q_len"], cfg["k_len"], cfg["num_heads"], cfg["batch"]
    if "causal" in kind and L != S:
        kind = kind.replace("causal_bool", "bool2d").replace("causal_float", "float2d").replace("is_causal", "none")
        kind = kind.replace("causal", "bool2d")
    lead = H if B is None else B * H
    dtype = cfg["dtype"]
    attn_mask = kpm = None
    ours_causal = torch_causal = False
    if kind.startswith("bool2d"):
        attn_mask = random_bool_mask((L, S), g)
    elif kind.startswith("float2d"):
        attn_mask = torch.randn(L, S, generator=g, dtype=dtype)
    elif kind.startswith("causal_bool") or kind.startswith("causal+"):
        attn_mask = torch.ones(L, S, dtype=torch.bool).triu(1)
        ours_causal = True  # the hint agrees with the mask: both must give the same answer
    elif kind.startswith("causal_float"):
        attn_mask = torch.zeros(L, S, dtype=dtype).masked_fill(
            torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf")
        )
    elif kind == "is_causal":
        ours_causal = True  # no mask: causal attention (torch needs the mask spelled out)
        attn_mask_torch = torch.ones(L, S, dtype=torch.bool).triu(1)
        return None, None, True, False, attn_mask_torch
    elif kind.startswith("bool3d"):
        attn_mask = random_bool_mask((lead, L, S), g)
    elif kind.startswith("float3d"):
        attn_mask = torch.randn(lead, L, S, generator=g, dtype=dtype)
    if "kpm" in kind:
        shape = (S,) if B is None else (B, S)
        if "kpm_float" in kind:
            kpm = torch.randn(shape, generator=g, dtype=dtype)
        else:
            kpm = random_bool_mask(shape, g)
    return attn_mask, kpm, ours_causal, torch_causal, attn_mask


CONFIGS = draw_configs(320)


def run(module, q, k, v, cfg, attn_mask, kpm, is_causal):
    out, w = module(
        q,
        k,
        v,
        key_padding_mask=kpm,
        need_weights=cfg["need_weights"],
        attn_mask=attn_mask,
        average_attn_weights=cfg["average"],
        is_causal=is_causal,
    )
    return out, w


def grads_of(module, q, k, v, out, w, g):
    loss = (out * cotangent(out, g)).sum()
    if w is not None:
        loss = loss + (w * cotangent(w, g)).sum()
    tensors = [t for t in (q, k, v) if t.requires_grad] + list(module.parameters())
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['id']}-{c['mask']}")
def test_parity_with_torch_and_reference(cfg):
    dtype = cfg["dtype"]
    ctor = {
        k: cfg[k]
        for k in ("embed_dim", "num_heads", "bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim", "batch_first")
    }
    theirs, ours = pair(dtype, seed=cfg["id"], **ctor)
    exact = type(ours).from_torch(copy.deepcopy(theirs).to(torch.float64))
    exact.backend = "reference"

    g = torch.Generator().manual_seed(cfg["id"])
    attn_mask, kpm, ours_causal, torch_causal, torch_mask = make_masks(cfg, g)
    q, k, v = inputs(
        cfg["batch"],
        cfg["q_len"],
        cfg["k_len"],
        cfg["embed_dim"],
        ctor["kdim"] or cfg["embed_dim"],
        ctor["vdim"] or cfg["embed_dim"],
        cfg["batch_first"],
        dtype,
        seed=cfg["id"],
    )
    if cfg["self_attn"]:
        k = v = q
    leaves = {id(t): t.requires_grad_() for t in (q, k, v)}
    q, k, v = (leaves[id(t)] for t in (q, k, v))

    results = {}
    for name, module, mask, causal in (
        ("ours", ours, attn_mask, ours_causal),
        ("torch", theirs, torch_mask, torch_causal),
    ):
        out, w = run(module, q, k, v, cfg, mask, kpm, causal)
        results[name] = (out, w, grads_of(module, q, k, v, out, w, torch.Generator().manual_seed(7)))
    # the float64 oracle on upcast inputs
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if cfg["self_attn"]:
        k64 = v64 = q64
    m64 = None if attn_mask is None else (attn_mask.double() if attn_mask.is_floating_point() else attn_mask)
    kpm64 = None if kpm is None else (kpm.double() if kpm.is_floating_point() else kpm)
    out, w = run(exact, q64, k64, v64, cfg, m64, kpm64, ours_causal)
    results["exact"] = (out, w, grads_of(exact, q64, k64, v64, out, w, torch.Generator().manual_seed(7)))

    (o_out, o_w, o_g), (t_out, t_w, t_g), (x_out, x_w, x_g) = results["ours"], results["torch"], results["exact"]
    assert o_out.shape == t_out.shape and o_out.dtype == t_out.dtype
    assert (o_w is None) == (t_w is None)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_out, t_out, **tol)
    assert_flash_rule(o_out, t_out, x_out, "out")
    if o_w is not None:
        assert o_w.shape == t_w.shape
        torch.testing.assert_close(o_w, t_w, **tol)
        assert_flash_rule(o_w, t_w, x_w, "weights")
    assert len(o_g) == len(t_g) == len(x_g)
    for i, (a, b, c) in enumerate(zip(o_g, t_g, x_g)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {i}: {m}")  # noqa: B023
        assert_flash_rule(a, b, c, f"grad {i}", atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_config_draw_covers_every_flag_and_mask():
    seen = {
        k: {c[k] if not isinstance(c[k], torch.dtype) else str(c[k]) for c in CONFIGS} for k in CONFIGS[0] if k != "id"
    }
    for key in ("bias", "add_bias_kv", "add_zero_attn", "batch_first", "need_weights", "average", "self_attn"):
        assert seen[key] == {True, False}, key
    assert seen["mask"] == set(MASK_KINDS)
    assert None in seen["batch"] and len(seen["batch"]) > 2
    assert len(seen["dtype"]) == 2


def test_same_seed_same_init_as_torch():
    for kw in (dict(), dict(kdim=5, vdim=7), dict(add_bias_kv=True), dict(bias=False)):
        torch.manual_seed(3)
        theirs = torch.nn.MultiheadAttention(12, 3, batch_first=True, **kw)
        torch.manual_seed(3)
        from multihead import MultiheadAttention

        ours = MultiheadAttention(12, 3, **kw)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), n


def test_error_helper_detects_a_real_difference():
    a = torch.zeros(3)
    assert first_error(a, a + 1) == 1.0
    with pytest.raises(AssertionError):
        assert_flash_rule(a + 1e-2, a + 1e-4, a.double(), "x")
