"""The command line: --version, help texts, check's verdict, and timings that are medians of samples."""

from __future__ import annotations

import pytest
import torch

import multihead
from multihead import __main__ as cli


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert multihead.__version__ in capsys.readouterr().out


def test_bench_help_lists_bench_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--scenarios" in out and "--rounds" in out


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit) as done:
        cli.main(["check", "--nonsense"])
    assert done.value.code == 2


def test_check_passes_and_labels_every_row(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for label in ("GQA", "RoPE", "window", "KV cache", "add_bias_kv"):
        assert label in out
    assert "MISMATCH" not in out


def test_check_fails_when_ours_disagrees(monkeypatch, capsys):
    """A wrong scale in ours must turn check red (the check can fail)."""
    real = multihead.attend.choose

    class Wrong:
        def __init__(self, backend):
            self.backend = backend

        def attend(self, q, k, v, mask, *, scale, **kw):
            return self.backend.attend(q, k, v, mask, scale=scale * 1.01, **kw)

    def choose(q, *args, **kw):
        chosen = real(q, *args, **kw)
        return chosen if q.dtype == torch.float64 else Wrong(chosen)

    monkeypatch.setattr(multihead.attend, "choose", choose)
    assert cli.main(["check"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_compare_timing_gives_one_sample_per_round():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    samples = cli.compare_timing({"a": a, "b": b}, rounds=3)
    assert [len(s) for s in samples.values()] == [3, 3]
    assert all(x > 0 for s in samples.values() for x in s)


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, capsys):
    import multihead.viz as viz

    def missing():
        raise ImportError("multihead.viz needs matplotlib: install the viz extra (pip install 'multihead[viz]')")

    monkeypatch.setattr(viz, "_import_matplotlib", missing)
    assert cli.main(["plot", "--out", "unused.png"]) == 2
    assert "multihead[viz]" in capsys.readouterr().err
