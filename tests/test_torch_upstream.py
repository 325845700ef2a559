"""PyTorch's own test file for `torch.nn.MultiheadAttention`, run against our class.

Origin: pytorch/pytorch, test/nn/test_multihead_attention.py, commit
03f76200b7b3eccc1be6d93f2841dcfea04d972e (BSD-3-Clause, copyright Facebook, Inc and the PyTorch
contributors). PyTorch's code is not committed here: `python tests/torch_upstream/fetch.py` puts the
file at that commit into tests/torch_upstream/vendor/ (or set MULTIHEAD_TORCH_MHA_TESTS=path); without
it this module is skipped, saying so.

The one patch: every use of the class name (`from torch.nn import MultiheadAttention`,
`torch.nn.MultiheadAttention(`, `nn.MultiheadAttention(`) becomes `TorchDefaults`, our class with
torch's default layout (`batch_first=False`). Nothing else in the file changes. The file's imports
of `torch.testing._internal` ship inside the torch wheel; the one test-only dependency they need,
`expecttest`, is replaced by a stand-in when not installed (its TestCase is unittest's plus an
`assertExpectedInline` the file never calls).

`MULTIHEAD_UPSTREAM_CLASS=torch` runs the same file against torch's own class (no patch): that is
how the tests failing on torch 2.13 itself were found (one: the nested-tensor test, in EXCLUDED).
"""

from __future__ import annotations

import os
import re
import sys
import types
import unittest
from pathlib import Path

import pytest

from multihead import MultiheadAttention

HERE = Path(__file__).resolve().parent
SOURCE = Path(
    os.environ.get("MULTIHEAD_TORCH_MHA_TESTS", HERE / "torch_upstream" / "vendor" / "test_multihead_attention.py")
)

# every excluded test, with why; the rest must pass
EXCLUDED = {
    "test_multihead_self_attn_two_masks_fast_path_mock": (
        "mocks torch's private kernel torch._native_multi_head_attention and asserts torch's fast path "
        "called it; our module has no such fast path"
    ),
    "test_fast_path_check_with_mask_does_not_break_in_compile": (
        "tests nn.TransformerEncoder's own fast-path gating under torch.compile; it builds torch's layer "
        "(our class is not involved) and compiles a 512-wide encoder (minutes on CPU)"
    ),
    "test_multihead_attn_nested_tensor_outside_fast_path": (
        "fails on torch 2.13 itself (torch's class raises 'MultiheadAttention does not support NestedTensor "
        "outside of its fast path' for its odd-head module); nested inputs are the variable-length issue's"
    ),
}


class TorchDefaults(MultiheadAttention):
    """Ours with torch's default layout: batch_first=False (the file was written against torch's)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, **kwargs):  # fmt: skip
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype, **kwargs)  # fmt: skip


PATCHES = [  # (pattern, replacement); each must match at least once, so a changed file fails loudly
    (r"^from torch\.nn import MultiheadAttention$", "MultiheadAttention = TorchDefaults"),
    (r"\btorch\.nn\.MultiheadAttention\(", "TorchDefaults("),
    (r"(?<![\w.])nn\.MultiheadAttention\(", "TorchDefaults("),
]


def _expecttest_stand_in() -> None:
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")

        class TestCase(unittest.TestCase):
            def assertExpectedInline(self, *args, **kwargs):  # noqa: N802 (expecttest's name)
                raise unittest.SkipTest("expecttest is not installed")

        stand_in.TestCase = TestCase
        stand_in.ACCEPT = False
        sys.modules["expecttest"] = stand_in


def _load() -> dict:
    text = SOURCE.read_text()
    if os.environ.get("MULTIHEAD_UPSTREAM_CLASS") != "torch":
        for pattern, replacement in PATCHES:
            text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
            assert count, f"the upstream file no longer contains {pattern!r}; review the patch"
    _expecttest_stand_in()
    namespace = {"__name__": "torch_upstream_test_multihead_attention", "TorchDefaults": TorchDefaults}
    exec(compile(text, str(SOURCE), "exec"), namespace)  # noqa: S102 (the pinned upstream file)
    return namespace


if not SOURCE.exists():
    pytest.skip(
        f"PyTorch's test file is not fetched ({SOURCE}); run `python tests/torch_upstream/fetch.py`",
        allow_module_level=True,
    )


def _collect(namespace: dict) -> tuple[dict[str, type], set[str]]:
    """The file's test classes (device-type tests: their CPU instance), with EXCLUDED tests skipped."""
    classes, found = {}, set()
    for name, obj in namespace.items():
        if not (isinstance(obj, type) and issubclass(obj, unittest.TestCase) and name.startswith("TestMultihead")):
            continue
        if name == "TestMultiheadAttentionNNDeviceType":  # the generic template; its CPU instance runs
            continue
        for attr in list(vars(obj)):
            base = re.sub(
                r"_(cpu|float16|float32|float64|average_attn_weights_True|average_attn_weights_False)$", "", attr
            )
            base = re.sub(r"_cpu$", "", base)
            if attr.startswith("test") and base in EXCLUDED:
                found.add(base)
                setattr(obj, attr, unittest.skip(f"excluded: {EXCLUDED[base]}")(getattr(obj, attr)))
        classes[name] = obj
    return classes, found


_namespace = _load()
_classes, _found = _collect(_namespace)
globals().update(_classes)


def test_every_exclusion_names_a_test_of_the_file():
    assert _found == set(EXCLUDED)


def test_the_file_runs_against_our_class():
    if os.environ.get("MULTIHEAD_UPSTREAM_CLASS") == "torch":
        pytest.skip("running against torch's own class")
    assert _namespace["MultiheadAttention"] is TorchDefaults
    assert isinstance(TorchDefaults(4, 2), MultiheadAttention) and not TorchDefaults(4, 2).batch_first
