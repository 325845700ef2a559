"""`MultiheadAttention.explain(query, key, value, **forward_kwargs)`: the backend it names is the one
forward runs, every other backend says why not (windowed with its thresholds), costs are estimated
for ours and torch's, and explain itself attends nothing."""

from __future__ import annotations

import pytest
import torch

import multihead.attend
from multihead import MultiheadAttention

E, H = 16, 4


def _x(B, L, E=E, seed=0):
    return torch.randn(B, L, E, generator=torch.Generator().manual_seed(seed))


CASES = {
    "weights": (dict(), dict()),
    "no_weights": (dict(), dict(need_weights=False)),
    "window_pays": (dict(window=8), dict(need_weights=False)),
    "window_too_wide": (dict(window=200), dict(need_weights=False)),
    "padding_and_mask": (dict(add_bias_kv=True), dict(key_padding_mask=torch.zeros(2, 256, dtype=torch.bool))),
    "causal_seq_first": (dict(batch_first=False), dict(is_causal=True, need_weights=False)),
}


@pytest.mark.parametrize("case", CASES)
def test_explain_names_the_backend_forward_runs(case, monkeypatch):
    config, kw = CASES[case]
    m = MultiheadAttention(E, H, **config).eval()
    x = _x(2, 256) if m.batch_first else _x(256, 2)
    chosen = []
    choose = multihead.attend.choose
    monkeypatch.setattr(multihead.attend, "choose", lambda *a, **k: chosen.append(choose(*a, **k)) or chosen[-1])
    explained = m.explain(x, x, x, **kw)
    chosen.clear()
    with torch.no_grad():
        m(x, x, x, **kw)
    assert explained.backend == chosen[0].name
    assert set(explained.reasons) == set(multihead.attend.PRIORITY) - {explained.backend}
    assert all(why for why in explained.reasons.values())
    assert explained.flops > 0 and explained.peak_bytes > 0 and explained.torch_flops > 0
    text = str(explained)
    assert explained.backend in text and "cost (ours)" in text and "cost (torch)" in text


def test_windowed_reason_has_its_thresholds():
    m = MultiheadAttention(E, H, window=200)
    x = _x(1, 256)
    explained = m.explain(x, x, x, need_weights=False)
    assert explained.backend == "sdpa"
    (why,) = explained.reasons["windowed"]
    assert "L >= 4 * chunk" in why and "50%" in why and "L = 256" in why


def test_windowed_visits_less_and_blockwise_holds_less_than_torch():
    x = _x(2, 512)
    windowed = MultiheadAttention(E, H, window=8).explain(x, x, x, need_weights=False)
    assert windowed.backend == "windowed" and windowed.flops < windowed.torch_flops / 4
    long = _x(1, 4096)  # explain computes nothing: a long sequence costs nothing here
    weights = MultiheadAttention(E, H).explain(long, long, long)
    assert weights.backend == "blockwise" and weights.peak_bytes < weights.torch_peak_bytes / 2


def test_forced_backend_is_shown(monkeypatch):
    m = MultiheadAttention(E, H)
    m.backend = "reference"
    x = _x(2, 8)
    explained = m.explain(x, x, x, need_weights=False)
    assert explained.backend == "reference" and explained.forced and "(forced)" in str(explained)
    assert "forced" in explained.reasons["sdpa"][0]
    for backend in multihead.attend.BACKENDS.values():  # explain attends nothing
        monkeypatch.setattr(backend, "attend", None)
    m.explain(x, x, x)


def test_explain_validates_like_forward():
    m = MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m.explain(_x(2, 8), _x(2, 8), _x(2, 8), key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
