"""torch.autograd.gradcheck of the module's forward, for every backend: float64, tiny sizes, with
respect to the inputs and every parameter (through torch.func.functional_call), with masks
(including fully masked rows), and with dropout under a fixed seed (reseeded inside the function so
every evaluation draws the same dropout mask). gradgradcheck wherever double backward exists.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import multihead.attend
from multihead import MultiheadAttention

F64 = torch.float64

REFUSAL = "no attention backend can serve"
NEED_WEIGHTS = pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
# torch implements no double backward for the CPU flash kernel SDPA runs on float64 without dropout
# (`_scaled_dot_product_flash_attention_for_cpu_backward`); every other backend must have one
NO_DOUBLE_BACKWARD = ("sdpa",)


def for_each_backend(check, exclude=(), **params):
    """Run `check(backend=name, **params)` for every backend in `multihead.attend.BACKENDS` (less
    `exclude`) that serves the request. A backend may refuse one (a ValueError naming it, with its
    reasons); the reference serves every request and SDPA every one without weights. Failures name
    the backend."""
    served, refused = [], {}
    for name in multihead.attend.BACKENDS:
        if name in exclude:
            continue
        try:
            check(backend=name, **params)
        except Exception as err:
            if isinstance(err, ValueError) and REFUSAL in str(err) and f"{name}:" in str(err):
                refused[name] = str(err)
                continue
            raise AssertionError(f"backend {name!r}: {type(err).__name__}: {err}") from err
        served.append(name)
    required = {"reference"} if params.get("need_weights", True) else {"reference", "sdpa"}
    assert required - set(exclude) <= set(served), refused
    return served


def _mask_row_blank(L, S):
    m = torch.zeros(L, S, dtype=torch.bool)
    m[0, 1] = True
    m[1] = True  # row 1 sees no key
    return m


CASES = {
    "plain": dict(ctor=dict(), batch=2),
    "bool2d_blank_row+kpm": dict(
        ctor=dict(),
        batch=2,
        attn_mask=lambda B, H, L, S: _mask_row_blank(L, S),
        kpm=lambda B, S: torch.tensor([[False] * (S - 1) + [True]] * B),
    ),
    "float3d_neginf_seq_first": dict(
        ctor=dict(batch_first=False),
        batch=2,
        attn_mask=lambda B, H, L, S: torch.randn(B * H, L, S, dtype=F64).masked_fill(
            torch.arange(S) == S - 1, float("-inf")
        ),
    ),
    "is_causal_unbatched": dict(ctor=dict(), batch=None, is_causal=True),
    "bias_kv+zero_attn+kdim_vdim+float_kpm_blank_batch": dict(
        ctor=dict(add_bias_kv=True, add_zero_attn=True, kdim=3, vdim=5),
        batch=2,
        kpm=lambda B, S: torch.stack([torch.full((S,), float("-inf"), dtype=F64), torch.randn(S, dtype=F64)]),
    ),
    "gqa_no_bias_blank_batch": dict(
        ctor=dict(num_kv_heads=1, bias=False),
        batch=2,
        kpm=lambda B, S: torch.tensor([[True] * S, [False] * S]),
    ),
    "self_attention": dict(ctor=dict(), batch=2, self_attn=True, attn_mask=lambda B, H, L, S: _mask_row_blank(L, S)),
}
DROPOUT_CASES = ["plain", "bias_kv+zero_attn+kdim_vdim+float_kpm_blank_batch", "gqa_no_bias_blank_batch"]
E, H, L, S = 4, 2, 3, 2


def setup(case, backend, dropout=0.0):
    spec = CASES[case]
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, dropout=dropout, dtype=F64, **spec["ctor"])
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    m.backend = backend
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    B = spec["batch"]
    bf = m.batch_first

    def make(n, d):
        shape = (n, d) if B is None else (B, n, d) if bf else (n, B, d)
        return torch.randn(shape, dtype=F64, requires_grad=True)

    q = make(L, E)
    k_len = L if spec.get("self_attn") else S
    k, v = make(k_len, m.kdim), make(k_len, m.vdim)
    masks = dict(
        attn_mask=spec["attn_mask"](B or 1, H, L, k_len) if "attn_mask" in spec else None,
        key_padding_mask=spec["kpm"](B, k_len) if "kpm" in spec else None,
        is_causal=spec.get("is_causal", False),
    )
    inputs = [q] if spec.get("self_attn") else [q, k, v]
    return m, names, inputs, params, masks


def as_function(m, names, n_inputs, masks, need_weights, average=True, reseed=None):
    def f(*args):
        if reseed is not None:
            torch.manual_seed(reseed)
        xs, ps = args[:n_inputs], args[n_inputs:]
        q, k, v = (xs[0],) * 3 if n_inputs == 1 else xs
        out, w = functional_call(
            m,
            dict(zip(names, ps)),
            (q, k, v),
            dict(need_weights=need_weights, average_attn_weights=average, **masks),
        )
        return (out, w) if w is not None else out

    return f


def _gradcheck(backend, case, need_weights):
    m, names, inputs, params, masks = setup(case, backend)
    f = as_function(m, names, len(inputs), masks, need_weights, average=case != "plain")
    assert torch.autograd.gradcheck(f, (*inputs, *params))


@NEED_WEIGHTS
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case, need_weights):
    for_each_backend(_gradcheck, case=case, need_weights=need_weights)


def _gradcheck_dropout(backend, case, need_weights):
    m, names, inputs, params, masks = setup(case, backend, dropout=0.4)
    m.train()
    f = as_function(m, names, len(inputs), masks, need_weights, reseed=1234)
    with torch.random.fork_rng():
        out_a, out_b = f(*inputs, *params), f(*inputs, *params)
        first_a = out_a[0] if isinstance(out_a, tuple) else out_a
        first_b = out_b[0] if isinstance(out_b, tuple) else out_b
        assert torch.equal(first_a, first_b), "reseeding must give the same dropout mask"
        torch.manual_seed(999)
        other = as_function(m, names, len(inputs), masks, need_weights)(*inputs, *params)
        other = other[0] if isinstance(other, tuple) else other
        assert not torch.equal(other, first_a), "dropout had no effect"
        assert torch.autograd.gradcheck(f, (*inputs, *params))


@NEED_WEIGHTS
@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_gradcheck_with_dropout_fixed_seed(case, need_weights):
    for_each_backend(_gradcheck_dropout, case=case, need_weights=need_weights)


def _gradgradcheck(backend, case, dropout, need_weights):
    m, names, inputs, params, masks = setup(case, backend, dropout=dropout)
    f = as_function(m, names, len(inputs), masks, need_weights=need_weights, average=False, reseed=7)
    with torch.random.fork_rng():
        assert torch.autograd.gradgradcheck(f, (*inputs, *params))


@pytest.mark.parametrize(
    "case,dropout",
    [
        ("bool2d_blank_row+kpm", 0.0),
        ("bias_kv+zero_attn+kdim_vdim+float_kpm_blank_batch", 0.3),
        ("gqa_no_bias_blank_batch", 0.0),
    ],
)
def test_gradgradcheck_weights_path(case, dropout):
    for_each_backend(_gradgradcheck, exclude=NO_DOUBLE_BACKWARD, case=case, dropout=dropout, need_weights=True)


def test_gradgradcheck_no_weights():
    for_each_backend(
        _gradgradcheck, exclude=NO_DOUBLE_BACKWARD, case="is_causal_unbatched", dropout=0.0, need_weights=False
    )


def _float_mask_gradcheck(backend, need_weights):
    m, names, inputs, params, _ = setup("plain", backend)
    mask = torch.randn(L, S, dtype=F64)
    mask[1, 0] = float("-inf")

    def f(mask_finite, *xs):
        full = torch.where(torch.isneginf(mask), mask, mask_finite)
        out, w = m(*xs, attn_mask=full, need_weights=need_weights)
        return (out, w) if w is not None else out

    finite = mask.masked_fill(torch.isneginf(mask), 0.0).requires_grad_()
    assert torch.autograd.gradcheck(f, (finite, *inputs))


@NEED_WEIGHTS
def test_gradcheck_float_mask_is_differentiable(need_weights):
    """A float attn_mask that requires grad gets its gradient (a learned bias), fully masked
    entries included (their gradient is zero), on every backend that accepts such a mask."""
    for_each_backend(_float_mask_gradcheck, need_weights=need_weights)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
