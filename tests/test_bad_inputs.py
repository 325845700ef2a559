"""Every invalid input raises a clear error naming the argument: one test per row of the table in
docs/errors.md (the test checks the table lists exactly these rows).

Each row: how to provoke it, the exception type, and words its message must contain (the argument's
name first). Masks "on another device" use `device="meta"` tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import multihead.attend
from multihead import MultiheadAttention as MHA
from multihead import MultiheadAttentionShapeError as ShapeError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
B, L, S, E, H = 2, 3, 4, 8, 2


def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


def forward(module=None, q=None, k=None, v=None, **kw):
    """Call a (2, 3, 8) x (2, 4, 8) module forward with one thing changed."""
    module = module if module is not None else MHA(E, H)
    q = _x(B, L, E) if q is None else q
    k = _x(B, S, E) if k is None else k
    v = _x(B, S, E) if v is None else v
    return lambda: module(q, k, v, **kw)


def _forced(backend, **kw):
    def run():
        m = MHA(E, H)
        m.backend = backend  # validated on assignment
        return m(_x(B, L, E), _x(B, S, E), _x(B, S, E), **kw)

    return run


def _load(state_change):
    def run():
        m = MHA(E, H)
        sd = MHA(E, H).state_dict()
        state_change(sd)
        m.load_state_dict(sd)

    return run


def _drop(key):
    return lambda sd: sd.pop(key)


def _add(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(1, 1, E))


def _resize(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(3 * 12, 12))


# (id, thunk, exception type, words the message must contain: the argument's name first)
ROWS = [
    # ---- construction ----
    ("embed_dim_not_divisible", lambda: MHA(10, 3), ShapeError, ["embed_dim", "num_heads", "divisible"]),
    ("embed_dim_zero", lambda: MHA(0, 2), ValueError, ["embed_dim", "greater than 0"]),
    ("embed_dim_negative", lambda: MHA(-8, 2), ValueError, ["embed_dim", "greater than 0"]),
    ("embed_dim_not_int", lambda: MHA(8.0, 2), TypeError, ["embed_dim", "int"]),
    ("num_heads_zero", lambda: MHA(8, 0), ValueError, ["num_heads", "greater than 0"]),
    ("num_heads_negative", lambda: MHA(8, -2), ValueError, ["num_heads", "greater than 0"]),
    ("kdim_zero", lambda: MHA(8, 2, kdim=0), ValueError, ["kdim", "positive"]),
    ("vdim_negative", lambda: MHA(8, 2, vdim=-3), ValueError, ["vdim", "positive"]),
    ("num_kv_heads_zero", lambda: MHA(8, 2, num_kv_heads=0), ValueError, ["num_kv_heads", "positive"]),
    ("num_kv_heads_not_dividing", lambda: MHA(12, 4, num_kv_heads=3), ValueError, ["num_kv_heads", "divide"]),
    ("num_kv_heads_above_num_heads", lambda: MHA(8, 2, num_kv_heads=4), ValueError, ["num_kv_heads", "divide"]),
    ("dropout_one", lambda: MHA(8, 2, dropout=1.0), ValueError, ["dropout", "[0, 1)"]),
    ("dropout_negative", lambda: MHA(8, 2, dropout=-0.1), ValueError, ["dropout", "[0, 1)"]),
    ("dropout_nan", lambda: MHA(8, 2, dropout=float("nan")), ValueError, ["dropout", "[0, 1)"]),
    ("dropout_not_a_number", lambda: MHA(8, 2, dropout="0.1"), ValueError, ["dropout"]),
    # ---- query / key / value ----
    ("qkv_different_ranks", forward(k=_x(S, E)), ShapeError, ["key", "same number of dimensions"]),
    ("query_1d", forward(q=_x(E), k=_x(E), v=_x(E)), ShapeError, ["query", "3-D", "2-D"]),
    ("query_4d", forward(q=_x(1, B, L, E), k=_x(1, B, S, E), v=_x(1, B, S, E)), ShapeError, ["query", "3-D"]),
    ("batch_size_mismatch", forward(k=_x(3, S, E), v=_x(3, S, E)), ValueError, ["key", "batch size"]),
    (
        "batch_size_mismatch_seq_first",
        forward(MHA(E, H, batch_first=False), q=_x(L, B, E), k=_x(S, 3, E), v=_x(S, 3, E)),
        ValueError,
        ["key", "batch size", "batch_first=False"],
    ),
    ("value_batch_size_mismatch", forward(v=_x(1, S, E)), ValueError, ["value", "batch size"]),
    ("query_last_dim", forward(q=_x(B, L, E + 1)), ShapeError, ["query", "embed_dim=8"]),
    ("key_last_dim", forward(MHA(E, H, kdim=5, vdim=6), k=_x(B, S, 6), v=_x(B, S, 6)), ShapeError, ["key", "kdim=5"]),
    (
        "value_last_dim",
        forward(MHA(E, H, kdim=5, vdim=6), k=_x(B, S, 5), v=_x(B, S, 5)),
        ShapeError,
        ["value", "vdim=6"],
    ),
    ("key_value_length_mismatch", forward(v=_x(B, S + 1, E)), ShapeError, ["key", "value", "sequence length"]),
    ("query_int", forward(q=torch.ones(B, L, E, dtype=torch.long)), TypeError, ["query", "floating-point"]),
    ("query_complex", forward(q=_x(B, L, E, dtype=torch.complex64)), TypeError, ["query", "floating-point"]),
    ("query_dtype_not_params", forward(q=_x(B, L, E, dtype=torch.float64)), TypeError, ["query", "dtype", "autocast"]),
    ("key_dtype_not_params", forward(k=_x(B, S, E, dtype=torch.float16)), TypeError, ["key", "dtype"]),
    ("query_not_tensor", forward(q=[[0.0] * E] * L), TypeError, ["query", "Tensor"]),
    ("value_not_tensor", forward(v=_x(B, S, E).numpy()), TypeError, ["value", "Tensor"]),
    ("query_other_device", forward(q=_x(B, L, E, device="meta")), ValueError, ["query", "device", "meta"]),
    ("key_other_device", forward(k=_x(B, S, E, device="meta")), ValueError, ["key", "device", "meta"]),
    # ---- attn_mask ----
    ("attn_mask_2d_wrong_shape", forward(attn_mask=torch.zeros(S, L)), ValueError, ["attn_mask", "(L, S)", "(3, 4)"]),
    ("attn_mask_2d_broadcastable", forward(attn_mask=torch.zeros(1, S)), ValueError, ["attn_mask", "(3, 4)"]),
    (
        "attn_mask_3d_wrong_lead",
        forward(attn_mask=torch.zeros(H, L, S)),
        ValueError,
        ["attn_mask", "num_heads", "(4, 3, 4)"],
    ),
    ("attn_mask_3d_wrong_len", forward(attn_mask=torch.zeros(B * H, L, S + 1)), ValueError, ["attn_mask", "(4, 3, 4)"]),
    (
        "attn_mask_3d_unbatched_wrong_lead",
        forward(q=_x(L, E), k=_x(S, E), v=_x(S, E), attn_mask=torch.zeros(B * H, L, S)),
        ShapeError,
        ["attn_mask", "num_heads", "(2, 3, 4)"],
    ),
    ("attn_mask_1d", forward(attn_mask=torch.zeros(S)), ShapeError, ["attn_mask", "2 dimensions"]),
    ("attn_mask_4d", forward(attn_mask=torch.zeros(B, H, L, S)), ShapeError, ["attn_mask", "2 dimensions"]),
    (
        "attn_mask_int",
        forward(attn_mask=torch.zeros(L, S, dtype=torch.long)),
        TypeError,
        ["attn_mask", "bool or floating"],
    ),
    (
        "attn_mask_uint8",
        forward(attn_mask=torch.zeros(L, S, dtype=torch.uint8)),
        TypeError,
        ["attn_mask", "bool or floating"],
    ),
    (
        "attn_mask_other_device",
        forward(attn_mask=torch.zeros(L, S, device="meta")),
        ValueError,
        ["attn_mask", "device", "meta"],
    ),
    ("attn_mask_not_tensor", forward(attn_mask=[[0.0] * S] * L), TypeError, ["attn_mask", "Tensor"]),
    # ---- key_padding_mask ----
    (
        "key_padding_mask_wrong_len",
        forward(key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool)),
        ValueError,
        ["key_padding_mask", "(B, S)", "(2, 4)"],
    ),
    (
        "key_padding_mask_wrong_batch",
        forward(key_padding_mask=torch.zeros(1, S, dtype=torch.bool)),
        ValueError,
        ["key_padding_mask", "(2, 4)"],
    ),
    (
        "key_padding_mask_1d_batched",
        forward(key_padding_mask=torch.zeros(S, dtype=torch.bool)),
        ShapeError,
        ["key_padding_mask", "(B, S)"],
    ),
    (
        "key_padding_mask_2d_unbatched",
        forward(q=_x(L, E), k=_x(S, E), v=_x(S, E), key_padding_mask=torch.zeros(1, S, dtype=torch.bool)),
        ShapeError,
        ["key_padding_mask", "(S,)"],
    ),
    (
        "key_padding_mask_int",
        forward(key_padding_mask=torch.zeros(B, S, dtype=torch.int32)),
        TypeError,
        ["key_padding_mask", "bool or floating"],
    ),
    (
        "key_padding_mask_other_device",
        forward(key_padding_mask=torch.zeros(B, S, dtype=torch.bool, device="meta")),
        ValueError,
        ["key_padding_mask", "device", "meta"],
    ),
    (
        "key_padding_mask_not_tensor",
        forward(key_padding_mask=[[False] * S] * B),
        TypeError,
        ["key_padding_mask", "Tensor"],
    ),
    # ---- seq-first inputs by habit (a batch-first module): the other layout explains the shape ----
    (
        "layout_batch_size_mismatch",
        forward(q=_x(L, B, E), k=_x(S, B, E), v=_x(S, B, E)),
        ValueError,
        ["key", "batch size", "did you mean batch_first=False?"],
    ),
    (
        "layout_batch_size_mismatch_seq_first_module",
        forward(MHA(E, H, batch_first=False), q=_x(B, L, E), k=_x(B, S, E), v=_x(B, S, E)),
        ValueError,
        ["key", "batch size", "did you mean batch_first=True?"],
    ),
    (
        "layout_key_padding_mask",
        forward(q=_x(L, B, E), k=_x(L, B, E), v=_x(L, B, E), key_padding_mask=torch.zeros(B, L, dtype=torch.bool)),
        ValueError,
        ["key_padding_mask", "(B, S) = (3, 2)", "did you mean batch_first=False?"],
    ),
    (
        "layout_attn_mask",
        forward(q=_x(L, B, E), k=_x(L, B, E), v=_x(L, B, E), attn_mask=torch.zeros(L, L, dtype=torch.bool)),
        ValueError,
        ["attn_mask", "(L, S) = (2, 2)", "did you mean batch_first=False?"],
    ),
    (
        "layout_attn_mask_3d",
        forward(q=_x(L, B, E), k=_x(L, B, E), v=_x(L, B, E), attn_mask=torch.zeros(B * H, L, L)),
        ValueError,
        ["attn_mask", "(6, 2, 2)", "did you mean batch_first=False?"],
    ),
    # ---- backends ----
    ("backend_unknown", _forced("nope"), ValueError, ["backend", "'nope'", "reference"]),
    ("backend_cannot_serve", _forced("sdpa"), ValueError, ["need_weights", "sdpa"]),
    # ---- state_dict ----
    ("state_dict_missing_key", _load(_drop("out_proj.bias")), RuntimeError, ["out_proj.bias", "Missing"]),
    ("state_dict_unexpected_key", _load(_add("bias_k")), RuntimeError, ["bias_k", "Unexpected"]),
    ("state_dict_wrong_shape", _load(_resize("in_proj_weight")), RuntimeError, ["in_proj_weight", "size mismatch"]),
]
ROW_IDS = [r[0] for r in ROWS]


@pytest.mark.parametrize("thunk,exc,words", [r[1:] for r in ROWS], ids=ROW_IDS)
def test_invalid_input_raises_clear_error(thunk, exc, words):
    with pytest.raises(Exception) as info:
        thunk()
    assert type(info.value) is exc, f"raised {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in message: {message}"


def test_no_layout_hint_when_the_other_layout_does_not_explain_it():
    with pytest.raises(ValueError) as info:
        forward(k=_x(3, S + 1, E), v=_x(3, S + 1, E))()
    assert "did you mean" not in str(info.value)
    with pytest.raises(ValueError) as info:
        forward(key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool))()
    assert "did you mean" not in str(info.value)


# ---- where torch raises AssertionError, ours is both a ValueError and an AssertionError ----------
def _unbatched(**kw):
    return {"q": _x(L, E), "k": _x(S, E), "v": _x(S, E), **kw}


TORCH_ASSERTS = {  # case: (batch_first, forward arguments); torch's message must appear in ours
    "key_2d": (True, dict(k=_x(S, E))),
    "value_2d": (True, dict(v=_x(S, E))),
    "key_3d_unbatched": (True, _unbatched(k=_x(B, S, E))),
    "query_4d": (True, dict(q=_x(1, B, L, E), k=_x(1, B, S, E), v=_x(1, B, S, E))),
    "key_padding_mask_1d": (True, dict(key_padding_mask=torch.zeros(S, dtype=torch.bool))),
    "key_padding_mask_2d_unbatched": (True, _unbatched(key_padding_mask=torch.zeros(1, S, dtype=torch.bool))),
    "attn_mask_1d": (True, dict(attn_mask=torch.zeros(S, dtype=torch.bool))),
    "attn_mask_4d_unbatched": (True, _unbatched(attn_mask=torch.zeros(1, H, L, S, dtype=torch.bool))),
    "attn_mask_3d_unbatched": (True, _unbatched(attn_mask=torch.zeros(H + 1, L, S, dtype=torch.bool))),
    "query_last_dim": (True, dict(q=_x(B, L, E + 1))),
    "key_value_shapes": (False, dict(q=_x(L, B, E), k=_x(S, B, E), v=_x(S + 1, B, E))),
}


@pytest.mark.parametrize("case", TORCH_ASSERTS)
def test_shape_errors_are_assertion_errors_with_torchs_phrase(case):
    batch_first, kw = TORCH_ASSERTS[case]
    with pytest.raises(AssertionError) as theirs:
        forward(torch.nn.MultiheadAttention(E, H, batch_first=batch_first), **kw)()
    with pytest.raises(AssertionError) as ours:
        forward(MHA(E, H, batch_first=batch_first), **kw)()
    assert isinstance(ours.value, ValueError) and type(ours.value) is ShapeError
    assert str(theirs.value) in str(ours.value)


def test_shape_error_at_construction_is_torchs_assertion_too():
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        torch.nn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        MHA(10, 3)


def test_ids_are_unique():
    assert len(set(ROW_IDS)) == len(ROW_IDS)


def test_docs_table_lists_every_row():
    """docs/errors.md has one table row per case here, keyed by its id in backticks, first column."""
    text = DOCS.read_text()
    documented = re.findall(r"^\|\s*`([a-z0-9_]+)`\s*\|", text, flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), "duplicate rows in docs/errors.md"
    assert set(documented) == set(ROW_IDS) | {"fully_masked_row"}


# ---- the NaN-free guarantee (a row in the table, though not an error) -------------------------
REFUSAL = "no attention backend can serve"


def _fully_masked_row(backend, mask_kind, need_weights):
    torch.manual_seed(0)
    m = MHA(E, H)
    with torch.no_grad():
        m.out_proj.bias.normal_()
    m.backend = backend
    q = _x(B, L, E, requires_grad=True)
    k = _x(B, S, E, requires_grad=True)
    attn_mask = kpm = None
    if mask_kind in ("bool_attn_mask", "both"):
        attn_mask = torch.zeros(L, S, dtype=torch.bool)
        attn_mask[1] = True  # row 1 of every batch sees nothing
    if mask_kind == "float_attn_mask":
        attn_mask = torch.zeros(L, S)
        attn_mask[1] = float("-inf")
    if mask_kind in ("key_padding_mask", "both"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1] = True  # batch 1 is all padding
    out, w = m(q, k, k, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights)
    dead = torch.zeros(B, L, dtype=torch.bool)
    if attn_mask is not None:
        dead[:, 1] = True
    if kpm is not None:
        dead[1] = True
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[dead], m.out_proj.bias.detach().expand(int(dead.sum()), E), rtol=0, atol=0)
    if need_weights:
        assert torch.all(w[dead] == 0) and torch.isfinite(w).all()
    grads = torch.autograd.grad(out.sum(), [q, k, *m.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("mask_kind", ["bool_attn_mask", "float_attn_mask", "key_padding_mask", "both"])
def test_fully_masked_row_gives_zeros_not_nan(mask_kind, need_weights):
    """A query row that may attend to no key: output before out_proj is zero (so the output is
    out_proj.bias), its weights are zero, and gradients are finite; on every backend that serves
    the request (a backend may refuse one, naming itself; the reference serves all, SDPA all
    without weights)."""
    served = []
    for name in multihead.attend.BACKENDS:
        try:
            _fully_masked_row(name, mask_kind, need_weights)
        except ValueError as err:
            if REFUSAL in str(err) and f"{name}:" in str(err):
                continue
            raise
        except AssertionError as err:
            raise AssertionError(f"backend {name!r}: {err}") from err
        served.append(name)
    assert {"reference"} | (set() if need_weights else {"sdpa"}) <= set(served)
