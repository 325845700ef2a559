"""Property tests: hypothesis draws whole configurations and every backend is held to the float64
reference and to torch.nn.MultiheadAttention.

A configuration is every constructor flag (heads, grouped-query heads, kdim/vdim, bias, add_bias_kv,
add_zero_attn, batch_first), batched or unbatched inputs, L and S from 1, every mask kind (bool and
float attn_mask in 2-D and 3-D, the causal pattern, `is_causal` with no mask, bool and float
key_padding_mask), fully masked rows and fully masked batches, the weights modes and the dtype.

Oracles:
- the float64 reference (`backend="reference"` on a float64 copy of the module): always;
- torch at the same precision: when there are no grouped-query heads, and only where torch is not
  NaN (torch gives NaN for query rows that see no key on some of its paths); gradients are compared
  with torch only when torch has no NaN at all;
- the mask semantics themselves, computed here independently of `masks.py`: a query row that sees no
  key gets zero weights, and when it sees no key in any head, the output row is `out_proj.bias`.

Profiles: "ci" (the default: bounded and derandomized) and "long" (HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multihead.attend
from multihead import MultiheadAttention

from helpers import pair, random_bool_mask

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ATTN_KINDS = ["none", "bool2d", "float2d", "bool3d", "float3d", "causal_bool", "causal_float", "is_causal"]
KPM_KINDS = ["none", "bool", "float"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([1, 2, 3, 5]))
    kv_heads = draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0]))
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    q_len = draw(st.integers(1, 5))
    cross = draw(st.booleans())
    k_len = draw(st.integers(1, 5)) if cross else q_len
    attn_kind = draw(st.sampled_from(ATTN_KINDS))
    return dict(
        embed_dim=heads * head_dim,
        num_heads=heads,
        num_kv_heads=kv_heads,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        kdim=draw(st.sampled_from([None, 2, 7])) if cross else None,
        vdim=draw(st.sampled_from([None, 3, 6])) if cross else None,
        batch_first=draw(st.booleans()),
        batch=batch,
        q_len=q_len,
        k_len=k_len,
        self_attn=not cross and draw(st.booleans()),
        attn_kind=attn_kind,
        kpm_kind=draw(st.sampled_from(KPM_KINDS)),
        # with a mask, `is_causal=True` is only a hint: the mask must win
        hint=attn_kind not in ("none", "is_causal") and draw(st.booleans()),
        blank_rows=draw(st.booleans()),  # some query rows see no key
        blank_batch=batch is not None and draw(st.booleans()),  # a whole sequence is padding
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_masks(cfg, g):
    """(attn_mask for ours, attn_mask for torch, key_padding_mask, is_causal for ours)."""
    kind, L, S, H, B, dtype = cfg["attn_kind"], cfg["q_len"], cfg["k_len"], cfg["num_heads"], cfg["batch"], cfg["dtype"]
    lead = () if kind.endswith("2d") else (H if B is None else B * H,)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    mask = None
    if kind.startswith("bool"):
        mask = random_bool_mask((*lead, L, S), g)
    elif kind.startswith("float"):
        mask = torch.randn((*lead, L, S), generator=g, dtype=dtype)
        mask[..., 1:].masked_fill_(torch.rand(mask[..., 1:].shape, generator=g) < 0.25, float("-inf"))
    elif kind == "causal_bool":
        mask = causal
    elif kind == "causal_float":
        mask = torch.zeros(L, S, dtype=dtype).masked_fill(causal, float("-inf"))
    if mask is not None and cfg["blank_rows"]:
        rows = torch.rand(mask.shape[:-1], generator=g) < 0.4  # (..., L)
        mask = mask.clone()
        mask[rows] = True if mask.dtype == torch.bool else float("-inf")
    kpm = None
    if cfg["kpm_kind"] != "none":
        shape = (S,) if B is None else (B, S)
        if cfg["kpm_kind"] == "bool":
            kpm = random_bool_mask(shape, g)
        else:
            kpm = torch.randn(shape, generator=g, dtype=dtype)
            kpm[..., 1:].masked_fill_(torch.rand(kpm[..., 1:].shape, generator=g) < 0.25, float("-inf"))
        if cfg["blank_batch"]:
            kpm[0] = True if kpm.dtype == torch.bool else float("-inf")
    ours_causal = kind == "is_causal" or cfg["hint"]
    return mask, (causal if kind == "is_causal" else mask), kpm, ours_causal


def hidden_of(cfg, mask, kpm):
    """Which keys each query row may not see, (B or 1, H, L, S + extra), decided here from the user
    masks (not by the library): True = hidden."""
    B, H, L, S = cfg["batch"] or 1, cfg["num_heads"], cfg["q_len"], cfg["k_len"]
    hidden = torch.zeros(B, H, L, S, dtype=torch.bool)
    if mask is not None:
        m = mask if mask.dtype == torch.bool else torch.isneginf(mask)
        hidden |= m.reshape(-1, H, L, S) if m.dim() == 3 else m
    if kpm is not None:
        k = kpm if kpm.dtype == torch.bool else torch.isneginf(kpm)
        hidden |= k.reshape(B, 1, 1, S)
    extra = int(cfg["add_bias_kv"]) + int(cfg["add_zero_attn"])
    return torch.cat([hidden, hidden.new_zeros(B, H, L, extra)], dim=-1)


def build(cfg):
    """(torch module or None, ours) with the same weights and non-zero biases."""
    ctor = {
        k: cfg[k]
        for k in ("embed_dim", "num_heads", "bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim", "batch_first")
    }
    if cfg["num_kv_heads"] == cfg["num_heads"]:
        return pair(cfg["dtype"], seed=cfg["seed"], **ctor)
    torch.manual_seed(cfg["seed"])
    ours = MultiheadAttention(**ctor, num_kv_heads=cfg["num_kv_heads"], dtype=cfg["dtype"])
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return None, ours


def make_inputs(cfg, g, dtype):
    e = cfg["embed_dim"]
    kdim, vdim = cfg["kdim"] or e, cfg["vdim"] or e

    def make(n, d):
        if cfg["batch"] is None:
            shape = (n, d)
        elif cfg["batch_first"]:
            shape = (cfg["batch"], n, d)
        else:
            shape = (n, cfg["batch"], d)
        return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()

    q = make(cfg["q_len"], e)
    if cfg["self_attn"]:
        return q, q, q
    return q, make(cfg["k_len"], kdim), make(cfg["k_len"], vdim)


def run(module, q, k, v, cfg, mask, kpm, is_causal):
    """Forward and the gradients (inputs, then parameters) of a fixed random projection of the results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about mixed bool/float masks
        out, w = module(
            q,
            k,
            v,
            key_padding_mask=kpm,
            need_weights=cfg["need_weights"],
            attn_mask=mask,
            average_attn_weights=cfg["average"],
            is_causal=is_causal,
        )
    g = torch.Generator().manual_seed(99)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)).sum()
    leaves = list(dict.fromkeys([q, k, v]))  # self-attention: one leaf
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()), allow_unused=True)
    return out.detach(), None if w is None else w.detach(), grads


def as_rows(out, cfg):
    """out in the user's layout -> (B or 1, L, E)."""
    if cfg["batch"] is None:
        return out[None]
    return out if cfg["batch_first"] else out.transpose(0, 1)


def served_by(module, q, k, v, cfg, mask, kpm, is_causal):
    """Names of the backends that serve this request (a refusal must say why)."""
    names = []
    for name in multihead.attend.BACKENDS:
        module.backend = name
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module(
                    q, k, v, key_padding_mask=kpm, need_weights=cfg["need_weights"], attn_mask=mask, is_causal=is_causal
                )
        except ValueError as err:
            assert "no attention backend can serve" in str(err) and name in str(err), str(err)
            continue
        names.append(name)
    module.backend = None
    assert "reference" in names
    if not cfg["need_weights"]:
        assert "sdpa" in names
    return names


def check_semantics(out, w, hidden, module, cfg):
    """A row that sees no key: zero weights; a row that sees no key in any head: output = out_proj.bias."""
    blank = hidden.all(dim=-1)  # (B, H, L)
    if w is not None:
        w4 = w if cfg["batch"] is not None else w[None]  # (B, L, S) | (B, H, L, S)
        if cfg["average"]:
            rows = w4[blank.all(dim=1)]
        else:
            rows = w4[blank]
        assert torch.all(rows == 0), "a fully masked row has non-zero weights"
        assert torch.isfinite(w4).all()
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    dead = blank.all(dim=1)  # (B, L)
    if dead.any():
        bias = module.out_proj.bias
        expected = torch.zeros(cfg["embed_dim"], dtype=out.dtype) if bias is None else bias.detach()
        rows = as_rows(out, cfg)[dead]
        torch.testing.assert_close(rows, expected.expand_as(rows), rtol=0, atol=0)


def first_error_finite(a, b, exact):
    """Max error of a against exact and of b against exact over the entries where b is finite."""
    ok = ~torch.isnan(b)
    if not ok.any():
        return 0.0, 0.0
    return (a[ok].double() - exact[ok]).abs().max().item(), (b[ok].double() - exact[ok]).abs().max().item()


@PROFILE
@given(cfg=configs())
def test_every_backend_matches_reference_and_torch(cfg):
    dtype = cfg["dtype"]
    theirs, ours = build(cfg)
    exact = copy.deepcopy(ours).double()
    exact.backend = "reference"
    g = torch.Generator().manual_seed(cfg["seed"])
    mask, torch_mask, kpm, ours_causal = make_masks(cfg, g)
    q, k, v = make_inputs(cfg, g, dtype)

    up = {id(t): t.detach().double().requires_grad_() for t in (q, k, v)}
    q64, k64, v64 = (up[id(t)] for t in (q, k, v))
    m64 = None if mask is None or mask.dtype == torch.bool else mask.double()
    m64 = mask if m64 is None else m64
    kpm64 = kpm.double() if kpm is not None and kpm.is_floating_point() else kpm
    x_out, x_w, x_g = run(exact, q64, k64, v64, cfg, m64, kpm64, ours_causal)

    hidden = hidden_of(cfg, torch_mask, kpm)
    check_semantics(x_out, x_w, hidden, exact, cfg)

    t_res = None
    if theirs is not None:
        t_res = run(theirs, q, k, v, cfg, torch_mask, kpm, False)
        t_out, t_w, t_g = t_res
        # torch may be NaN only on rows that see no key in some head
        partly_blank = hidden.all(dim=-1).any(dim=1)  # (B, L)
        nan_rows = torch.isnan(as_rows(t_out, cfg)).any(dim=-1)
        assert not (nan_rows & ~partly_blank).any(), "torch NaN outside the fully masked rows: test bug"

    tol = TOL[dtype]
    for name in served_by(ours, q, k, v, cfg, mask, kpm, ours_causal):
        ours.backend = name
        o_out, o_w, o_g = run(ours, q, k, v, cfg, mask, kpm, ours_causal)
        ours.backend = None
        assert o_out.shape == x_out.shape and o_out.dtype == dtype, name
        assert (o_w is None) == (not cfg["need_weights"]), name
        check_semantics(o_out, o_w, hidden, ours, cfg)

        pairs = [("out", o_out, x_out, None if t_res is None else t_out)]
        if o_w is not None:
            assert o_w.shape == x_w.shape, name
            pairs.append(("weights", o_w, x_w, None if t_res is None else t_w))
        for what, a, exact_val, b in pairs:
            torch.testing.assert_close(a.double(), exact_val, **tol, msg=lambda m: f"{name} {what} vs reference: {m}")  # noqa: B023
            if b is not None:
                assert a.shape == b.shape
                ok = ~torch.isnan(b)
                torch.testing.assert_close(a[ok], b[ok], **tol, msg=lambda m: f"{name} {what} vs torch: {m}")  # noqa: B023
                ours_err, torch_err = first_error_finite(a, b, exact_val)
                assert ours_err <= 2 * torch_err + 1e-6, f"{name} {what}: err {ours_err:.3g} vs torch {torch_err:.3g}"

        assert len(o_g) == len(x_g)
        for i, (a, c) in enumerate(zip(o_g, x_g)):
            assert (a is None) == (c is None), f"{name} grad {i}"
            if a is None:
                continue
            assert torch.isfinite(a).all(), f"{name} grad {i} not finite"
            torch.testing.assert_close(a.double(), c, **tol, msg=lambda m: f"{name} grad {i} vs reference: {m}")  # noqa: B023
        if t_res is not None and not any(torch.isnan(t).any() for t in t_g if t is not None):
            for i, (a, b) in enumerate(zip(o_g, t_g)):
                if a is not None or b is not None:
                    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} grad {i} vs torch: {m}")  # noqa: B023


@PROFILE
@given(cfg=configs())
def test_weights_are_distributions(cfg):
    """Returned weights (no dropout): each row sums to 1 over the keys, or to 0 when it sees none."""
    cfg = {**cfg, "need_weights": True}
    _, ours = build(cfg)
    g = torch.Generator().manual_seed(cfg["seed"])
    mask, torch_mask, kpm, ours_causal = make_masks(cfg, g)
    q, k, v = make_inputs(cfg, g, cfg["dtype"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=mask, average_attn_weights=False, is_causal=ours_causal)
    w4 = w if cfg["batch"] is not None else w[None]  # (B, H, L, S)
    blank = hidden_of(cfg, torch_mask, kpm).all(dim=-1)
    expected = (~blank).to(w.dtype)
    torch.testing.assert_close(w4.sum(dim=-1), expected, **TOL[cfg["dtype"]])
    assert torch.all(w4 >= 0)
    hidden = hidden_of(cfg, torch_mask, kpm)
    assert torch.all(w4[hidden] == 0), "weight on a hidden key"


def test_profiles_are_registered():
    assert settings.get_profile("ci").max_examples == 60
    assert settings.get_profile("ci").derandomize
    assert settings.get_profile("long").max_examples == 2000
