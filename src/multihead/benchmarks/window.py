"""Sliding-window benchmark: causal attention with a look-back window of W keys.

(a) The attention call alone, on the same q, k, v (B, H, L, D):
    - ours: the windowed backend (`attend/windowed.py`) with the mask causal + window (W, 0);
    - sdpa_causal: `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, full causal attention
      (what the window replaces; it does about L / (2 W) times the work);
    - sdpa_window_mask: the same windowed request on the SDPA backend, which materialises the (L, S)
      mask (what dispatch would pick without the windowed backend).
(b) The whole module, x (B, L, E), self-attention, need_weights=False:
    - ours_window: `MultiheadAttention(E, H, window=(W, 0))(x, x, x, is_causal=True)`;
    - ours_causal: ours without a window, `is_causal=True`;
    - torch: `torch.nn.MultiheadAttention(E, H, batch_first=True)` with a causal bool mask (and the
      is_causal hint, so torch takes its fastest causal path). All three share one set of weights.

Forward only, under `torch.no_grad()`, modules in train mode with dropout 0 (DESIGN.md). Rounds are
interleaved; each sample repeats a call until it lasts >= `min_sample_s`; medians per call and their
ratios are reported, with the spread (min, max) of the samples. Peak memory: increase of VmHWM over
the process's resident size just before one call (Linux; None elsewhere).

    python -m multihead.benchmarks.window [--L 4096] [--W 256] [--B 1] [--E 512] [--H 8] [--threads N]   # JSON
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import multihead.attend as backends
from multihead import MultiheadAttention
from multihead.attend import sdpa, windowed
from multihead.masks import AttentionMask


@contextlib.contextmanager
def _windowed_registered():
    """Make sure dispatch knows the windowed backend (first in line); restore the table after."""
    if "windowed" in backends.BACKENDS:
        yield
        return
    saved = backends.PRIORITY
    backends.BACKENDS["windowed"] = windowed
    backends.PRIORITY = ("windowed", *saved)
    try:
        yield
    finally:
        backends.PRIORITY = saved
        del backends.BACKENDS["windowed"]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_mb(fn: Callable[[], object]) -> float | None:
    """Increase of the peak resident size over the current one during one call of fn (Linux, glibc).
    Freed heap is handed back first (malloc_trim), so memory reused from earlier calls counts."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
    except (OSError, AttributeError):
        return None
    before = _status_kb("VmRSS")
    fn()
    after = _status_kb("VmHWM")
    return None if before is None or after is None else max(0, after - before) / 1024


def _time_interleaved(contenders: dict[str, Callable[[], object]], rounds: int, min_sample_s: float) -> dict:
    """Median seconds per call for each contender; rounds interleave them; each sample repeats a
    call until it lasts >= min_sample_s."""
    reps = {}
    for name, fn in contenders.items():  # warm up, then size each sample
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return {
        name: {
            "ms": 1e3 * statistics.median(s),
            "spread_ms": [1e3 * min(s), 1e3 * max(s)],
            "calls_per_sample": reps[name],
        }
        for name, s in samples.items()
    }


def window_benchmark(
    L: int = 4096,
    W: int = 256,
    B: int = 1,
    E: int = 512,
    H: int = 8,
    *,
    rounds: int = 7,
    min_sample_s: float = 0.1,
    threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """Time (a) the attention call and (b) the module; see the module docstring.

    threads: torch CPU threads for the run (restored afterwards); default: leave as is."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _windowed_registered(), torch.no_grad():
            return _run(L, W, B, E, H, rounds, min_sample_s, dtype, seed)
    finally:
        torch.set_num_threads(saved)


def _run(L, W, B, E, H, rounds, min_sample_s, dtype, seed) -> dict:
    D = E // H
    torch.manual_seed(seed)
    result: dict = {
        "scenario": "window",
        "config": {"L": L, "W": W, "B": B, "E": E, "H": H, "D": D},
        "device": "cpu",
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }

    result.update(_attention(L, W, B, E, H, rounds, min_sample_s, dtype))
    result.update(_module(L, W, B, E, H, rounds, min_sample_s, dtype))
    return result


def _attention(L, W, B, E, H, rounds, min_sample_s, dtype) -> dict:
    """(a) the attention call alone."""
    D = E // H
    result: dict = {}
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))  # (B, H, L, D)
    mask = AttentionMask(B, H, L, L, causal=True, window=(W, 0))
    kw = {"scale": D**-0.5, "dropout_p": 0.0, "need_weights": False, "average_weights": True}
    chunk = windowed.chunk_size(mask)
    call: dict[str, Callable[[], Any]] = {
        "ours": lambda: windowed.attend(q, k, v, mask, **kw),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_window_mask": lambda: sdpa.attend(q, k, v, mask, **kw),
    }
    timing = _time_interleaved(call, rounds, min_sample_s)
    causal_pairs = L * (L + 1) / 2  # (query, key) pairs each contender needs
    window_pairs = sum(min(i, W) + 1 for i in range(L))
    flops = {"ours": window_pairs, "sdpa_causal": causal_pairs, "sdpa_window_mask": window_pairs}
    for name, t in timing.items():
        t["useful_gflops"] = 4 * B * H * D * flops[name] / (t["ms"] / 1e3) / 1e9
        t["peak_mb"] = _peak_mb(call[name])
    result["attention"] = timing
    result["attention_chunk"] = chunk
    result["attention_flop_ratio_causal_over_window"] = causal_pairs / window_pairs
    result["attention_visited_share"] = windowed.visited_share(mask)
    result["attention_speedup_vs_sdpa_causal"] = timing["sdpa_causal"]["ms"] / timing["ours"]["ms"]
    result["attention_speedup_vs_sdpa_window_mask"] = timing["sdpa_window_mask"]["ms"] / timing["ours"]["ms"]
    result["attention_max_abs_diff_vs_sdpa_window_mask"] = (
        (call["ours"]()[0] - call["sdpa_window_mask"]()[0]).abs().max().item()
    )

    return result


def _module(L, W, B, E, H, rounds, min_sample_s, dtype) -> dict:
    """(b) the whole module."""
    D = E // H
    result: dict = {}
    theirs = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True, dtype=dtype)
    ours_window = MultiheadAttention(E, H, dropout=0.0, window=(W, 0), dtype=dtype)
    ours_causal = MultiheadAttention(E, H, dropout=0.0, dtype=dtype)
    for ours in (ours_window, ours_causal):
        ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours_window, ours_causal):
        module.train()
    x = torch.randn(B, L, E, dtype=dtype)
    causal = torch.ones(L, L, dtype=torch.bool).triu_(1)  # True = may not attend
    forward = {
        "ours_window": lambda: ours_window(x, x, x, is_causal=True, need_weights=False),
        "ours_causal": lambda: ours_causal(x, x, x, is_causal=True, need_weights=False),
        "torch": lambda: theirs(x, x, x, attn_mask=causal, is_causal=True, need_weights=False),
    }
    qh = torch.empty(B, H, L, D, dtype=dtype)
    window_mask = AttentionMask(B, H, L, L, causal=True, window=(W, 0))
    result["module_window_backend"] = backends.choose(qh, qh, qh, window_mask, need_weights=False).name
    timing = _time_interleaved(forward, rounds, min_sample_s)
    for name, t in timing.items():
        t["peak_mb"] = _peak_mb(forward[name])
    result["module"] = timing
    result["module_speedup_vs_torch"] = timing["torch"]["ms"] / timing["ours_window"]["ms"]
    result["module_speedup_vs_ours_causal"] = timing["ours_causal"]["ms"] / timing["ours_window"]["ms"]
    return result


SCENARIOS = {"window": window_benchmark}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=4096)
    parser.add_argument("--W", type=int, default=256)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--E", type=int, default=512)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-sample-s", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = window_benchmark(
        args.L,
        args.W,
        args.B,
        args.E,
        args.H,
        rounds=args.rounds,
        min_sample_s=args.min_sample_s,
        threads=args.threads,
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
