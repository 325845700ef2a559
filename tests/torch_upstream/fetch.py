"""Fetch PyTorch's own test file for `torch.nn.MultiheadAttention` at the pinned commit.

    python tests/torch_upstream/fetch.py            # download from GitHub (needs network)
    python tests/torch_upstream/fetch.py PATH       # or copy a local checkout's file

The file lands in tests/torch_upstream/vendor/ (ignored by git: PyTorch's code is not committed
here); tests/test_torch_upstream.py runs it against our class. Origin: repository pytorch/pytorch,
path test/nn/test_multihead_attention.py, commit COMMIT below, BSD-3-Clause licence
(https://github.com/pytorch/pytorch/blob/main/LICENSE; "Copyright (c) 2016- Facebook, Inc" and the
other copyright holders listed there). The stored file is slightly newer than torch 2.13: the tests
that fail on torch 2.13 itself are excluded in tests/test_torch_upstream.py, each with its reason.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

REPO = "pytorch/pytorch"
PATH = "test/nn/test_multihead_attention.py"
COMMIT = "03f76200b7b3eccc1be6d93f2841dcfea04d972e"
SIZE = 40474  # characters of the file at COMMIT (a cheap check that the right file arrived)
URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/{PATH}"
TARGET = Path(__file__).resolve().parent / "vendor" / "test_multihead_attention.py"


def main(argv: list[str]) -> int:
    TARGET.parent.mkdir(exist_ok=True)
    if argv:
        shutil.copyfile(argv[0], TARGET)
    else:
        with urllib.request.urlopen(URL, timeout=60) as response:  # noqa: S310 (a fixed https URL)
            TARGET.write_bytes(response.read())
    size = len(TARGET.read_text())
    if size != SIZE:
        print(f"warning: {TARGET} has {size} characters, {SIZE} expected at commit {COMMIT}", file=sys.stderr)
    print(f"{REPO}:{PATH}@{COMMIT} -> {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
