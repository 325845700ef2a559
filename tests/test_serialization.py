"""Saving and loading: state_dicts with `weights_only=True`, whole modules with our allow-list
(`multihead.safe_globals()`, through the `torch.serialization.safe_globals` context manager so no
global state changes), pickle and deepcopy, and checkpoints moving both ways between
torch.nn.MultiheadAttention and ours. Every round trip is checked on outputs, not only on tensors.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import multihead
from multihead import MultiheadAttention
from multihead.rotary import RotaryEmbedding

from helpers import pair

E, H = 8, 2
CONFIGS = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "kdim_vdim": dict(kdim=3, vdim=5),
    "kdim_vdim_bias_kv_no_bias": dict(kdim=3, vdim=5, add_bias_kv=True, bias=False),
    "seq_first": dict(batch_first=False),
}
OURS_ONLY = {
    "gqa": dict(num_kv_heads=1),
    "gqa_bias_kv": dict(num_kv_heads=1, add_bias_kv=True),
    "window": dict(window=(1, 0)),
    "rotary": dict(rotary=RotaryEmbedding(E // H)),
}


def inputs(m, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda n, d: (2, n, d)) if m.batch_first else (lambda n, d: (n, 2, d))
    q = torch.randn(shape(3, m.embed_dim), generator=g, dtype=dtype)
    k = torch.randn(shape(4, m.kdim), generator=g, dtype=dtype)
    v = torch.randn(shape(4, m.vdim), generator=g, dtype=dtype)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1:] = True
    return q, k, v, mask


def same_outputs(a, b, seed=0):
    """a and b give the same outputs and weights (bitwise) in eval and with the same mask."""
    q, k, v, mask = inputs(a, seed, a.out_proj.weight.dtype)
    with torch.no_grad():
        out_a, w_a = a(q, k, v, attn_mask=mask)
        out_b, w_b = b(q, k, v, attn_mask=mask)
    assert torch.equal(out_a, out_b)
    assert torch.equal(w_a, w_b)


def ours(config, seed=0):
    torch.manual_seed(seed)
    m = MultiheadAttention(E, H, **copy.deepcopy(config))  # a fresh RotaryEmbedding each time
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return m


def roundtrip(obj, **load_kw):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kw)


ALL = {**CONFIGS, **OURS_ONLY}


@pytest.mark.parametrize("config", list(ALL))
def test_state_dict_weights_only(config):
    a = ours(ALL[config], seed=1)
    sd = roundtrip(a.state_dict(), weights_only=True)
    assert list(sd) == list(a.state_dict())
    b = ours(ALL[config], seed=2)
    b.load_state_dict(sd)
    same_outputs(a, b)


@pytest.mark.parametrize("config", list(ALL))
def test_whole_module_weights_only_with_safe_globals(config):
    a = ours(ALL[config], seed=3)
    a.backend = "reference"
    a.eval()
    with torch.serialization.safe_globals(multihead.safe_globals()):
        b = roundtrip(a, weights_only=True)
    assert type(b) is MultiheadAttention and b is not a
    assert b.backend == "reference" and not b.training and b.batch_first == a.batch_first
    assert b.num_kv_heads == a.num_kv_heads and b._qkv_same_embed_dim == a._qkv_same_embed_dim
    same_outputs(a, b)


def test_whole_module_needs_the_allow_list():
    """Without our classes allow-listed, weights_only loading refuses the module (and says which
    global), and the allow-list did not leak into torch's global state."""
    with pytest.raises(pickle.UnpicklingError, match="MultiheadAttention"):
        roundtrip(ours({}), weights_only=True)


@pytest.mark.parametrize("config", list(ALL))
def test_pickle_and_deepcopy(config):
    a = ours(ALL[config], seed=4)
    a.backend = "reference"
    for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert b.backend == "reference" and b.training == a.training
        for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
        same_outputs(a, b)


def test_pickle_of_an_older_module_fills_new_attributes():
    """A module pickled before `num_kv_heads`/`backend`/`window` existed loads with their defaults."""
    a = ours({}, seed=5)
    state = a.__dict__.copy()
    for name in ("num_kv_heads", "backend", "window"):
        state.pop(name, None)
    b = MultiheadAttention.__new__(MultiheadAttention)
    b.__setstate__(pickle.loads(pickle.dumps(state)))
    assert b.num_kv_heads == H and b.backend is None and b.window is None
    same_outputs(a, b)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_checkpoint_loads_into_ours(config):
    """A state_dict saved from torch.nn.MultiheadAttention (packed in_proj_weight when
    kdim == vdim == E, separate q/k/v_proj_weight otherwise) loads with weights_only=True into ours
    and gives torch's outputs."""
    kw = {"batch_first": True, **CONFIGS[config]}
    theirs, _ = pair(torch.float64, seed=6, embed_dim=E, num_heads=H, **kw)
    theirs.eval()
    assert theirs._qkv_same_embed_dim == ("kdim" not in kw)
    sd = roundtrip(theirs.state_dict(), weights_only=True)
    mine = MultiheadAttention(E, H, dtype=torch.float64, **kw).eval()
    mine.load_state_dict(sd)
    q, k, v, mask = inputs(mine, dtype=torch.float64)
    with torch.no_grad():
        for nw in (True, False):
            a, wa = mine(q, k, v, attn_mask=mask, need_weights=nw)
            b, wb = theirs(q, k, v, attn_mask=mask, need_weights=nw)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            if nw:
                torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_our_checkpoint_loads_into_torch(config):
    """Ours saved (weights_only) loads into torch.nn.MultiheadAttention with plain load_state_dict,
    and `to_torch()` builds the same module; both give our outputs."""
    kw = {"batch_first": True, **CONFIGS[config]}
    a = ours(kw, seed=7).double().eval()
    sd = roundtrip(a.state_dict(), weights_only=True)
    plain = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kw).eval()
    plain.load_state_dict(sd)
    converted = a.to_torch()
    assert type(converted) is torch.nn.MultiheadAttention
    q, k, v, mask = inputs(a, dtype=torch.float64)
    with torch.no_grad():
        mine, w = a(q, k, v, attn_mask=mask)
        for theirs in (plain, converted):
            out, tw = theirs(q, k, v, attn_mask=mask)
            torch.testing.assert_close(out, mine, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(tw, w, rtol=1e-12, atol=1e-12)
