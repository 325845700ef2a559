"""ONNX: torch.onnx.export(dynamo=True), opset 18, dynamic batch and length; onnxruntime's outputs
equal ours at other shapes than the traced one, fully masked rows are zero.

One export covers every case (an export takes tens of seconds here): GQA with weights and bool masks,
no weights with float masks, per-head weights with is_causal."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

from multihead import MultiheadAttention

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

E, H = 16, 4


class Several(nn.Module):
    """Three modules, three ways of calling them, one graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gqa = MultiheadAttention(E, H, num_kv_heads=2).eval()
        self.plain = MultiheadAttention(E, H).eval()
        self.causal = MultiheadAttention(E, H).eval()

    def forward(self, x, bool_padding, bool_mask, float_padding, float_mask):
        a, a_weights = self.gqa(x, x, x, key_padding_mask=bool_padding, attn_mask=bool_mask)  # weights (B, L, L)
        b, _ = self.plain(x, x, x, key_padding_mask=float_padding, attn_mask=float_mask, need_weights=False)
        c, c_weights = self.causal(x, x, x, is_causal=True, average_attn_weights=False)  # weights (B, H, L, L)
        return a, a_weights, b, c, c_weights


def _inputs(batch: int, length: int, seed: int):
    """Masks that hide every key of batch element 0 (padding) and every key from the last query."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, E, generator=g)
    bool_padding = torch.rand(batch, length, generator=g) < 0.3
    bool_padding[0] = True
    bool_mask = torch.rand(length, length, generator=g) < 0.3
    bool_mask[-1] = True
    float_padding = torch.zeros(batch, length).masked_fill(torch.rand(batch, length, generator=g) < 0.3, float("-inf"))
    float_padding[0] = float("-inf")
    float_mask = torch.randn(length, length, generator=g)
    float_mask[-1] = float("-inf")
    return x, bool_padding, bool_mask, float_padding, float_mask


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    model = Several()
    batch, length = Dim("B", min=2, max=64), Dim("L", min=2, max=256)
    rows, square = {0: batch, 1: length}, {0: length, 1: length}
    dynamic = (rows, rows, square, rows, square)  # x, bool padding, bool mask, float padding, float mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, _inputs(3, 9, seed=0), dynamic_shapes=dynamic, dynamo=True, opset_version=18, verbose=False
        )
    path = tmp_path_factory.mktemp("onnx") / "attention.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


@pytest.mark.parametrize(("batch", "length"), [(4, 13), (2, 5), (5, 31)])
def test_onnxruntime_matches_eager_at_other_shapes(session, batch, length):
    model, sess, _ = session
    inputs = _inputs(batch, length, seed=length)
    feed = {arg.name: t.numpy() for arg, t in zip(sess.get_inputs(), inputs)}
    got = [torch.from_numpy(a) for a in sess.run(None, feed)]
    with torch.no_grad():
        want = model(*inputs)
    assert len(got) == len(want) == 5
    for name, a, b in zip(("gqa out", "gqa weights", "no-weights out", "causal out", "causal weights"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)
    # fully masked rows: attention gives zeros, so the output rows are the out-projection's bias
    for out, module in ((got[0], model.gqa), (got[2], model.plain)):
        bias = module.out_proj.bias.detach()
        torch.testing.assert_close(out[0], bias.expand(length, E), rtol=0, atol=1e-6)
        torch.testing.assert_close(out[:, -1], bias.expand(batch, E), rtol=0, atol=1e-6)
    assert not got[1][0].any() and not got[1][:, -1].any()


def test_opset(session):
    _, _, path = session
    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 18
