"""Eval-mode encoder layer: `nn.TransformerEncoderLayer(E, H, 4E, batch_first=True).eval()` on
x (B, L, E) under `torch.inference_mode()`, with and without a key padding mask.

Three contenders, one set of weights:
    - fused: torch's layer as is; in eval it runs `torch._transformer_encoder_layer_fwd`, one kernel
      for the whole layer (attention, FFN, norms);
    - unfused: torch's layer with its fast path off (`torch.backends.mha.set_fastpath_enabled(False)`):
      torch's own MultiheadAttention forward plus the layer's Python (what our module replaces);
    - ours: the layer after `multihead.replace_attention`: our forward inside torch's layer (it never
      takes the fused kernel, so our semantics hold), the rest of the layer as in `unfused`.

Rounds interleave the contenders; each sample repeats a call until it lasts >= `min_sample_s`;
reported: median ms per call (with min/max), and the median of the per-round paired ratios
ours/fused and ours/unfused (with min/max). Outputs are checked to agree on the non-padded rows.

    python -m multihead.benchmarks.eval_layer [--L 100 512] [--B 4] [--E 512] [--H 8] [--threads N]
    python -m multihead bench --scenarios 'eval_layer_*'
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from multihead import replace_attention


def _contenders(B: int, L: int, E: int, H: int, padded: bool, seed: int) -> tuple[dict[str, Callable], Tensor]:
    torch.manual_seed(seed)
    theirs = nn.TransformerEncoderLayer(E, H, 4 * E, dropout=0.1, batch_first=True).eval()
    ours = replace_attention(copy.deepcopy(theirs)).eval()
    x = torch.randn(B, L, E)
    pad = None
    if padded:  # sequences of lengths L, 0.9 L, 0.8 L, ... (at least half), padded at the end
        lengths = [max(L // 2, L - (i * L) // 10) for i in range(B)]
        pad = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]  # (B, L), True = padding

    def fused():
        return theirs(x, src_key_padding_mask=pad)

    def unfused():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return theirs(x, src_key_padding_mask=pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    def mine():
        return ours(x, src_key_padding_mask=pad)

    keep = torch.ones(B, L, dtype=torch.bool) if pad is None else ~pad
    return {"fused": fused, "unfused": unfused, "ours": mine}, keep


def eval_layer_benchmark(
    L: int = 512,
    padded: bool = False,
    B: int = 4,
    E: int = 512,
    H: int = 8,
    *,
    rounds: int = 11,
    min_sample_s: float = 0.1,
    threads: int | None = None,
    quick: bool = False,
    seed: int = 0,
) -> dict:
    """Time the three contenders (see the module docstring); threads: torch CPU threads for the run."""
    if quick:
        B, L, E, H, rounds, min_sample_s = min(B, 2), min(L, 32), 64, 4, 3, 0.02
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fns, keep = _contenders(B, L, E, H, padded, seed)
            outs = {name: fn() for name, fn in fns.items()}
            diffs = {name: (outs[name][keep] - outs["unfused"][keep]).abs().max().item() for name in ("fused", "ours")}
            times, ratios = _time_paired(fns, rounds, min_sample_s)
    finally:
        torch.set_num_threads(saved)
    return {
        "scenario": "eval_layer",
        "config": {"B": B, "L": L, "E": E, "H": H, "padded": padded},
        "threads": threads or saved,
        "torch_version": torch.__version__,
        "max_abs_diff_vs_unfused": diffs,
        "torch_ms": times["unfused"]["ms"],  # shown in the bench table: torch's unfused path
        "ours_ms": times["ours"]["ms"],
        "fused_ms": times["fused"]["ms"],
        "times": times,
        "ours_over_fused": ratios["fused"],
        "ours_over_unfused": ratios["unfused"],
    }


def _time_paired(fns: dict[str, Callable], rounds: int, min_sample_s: float) -> tuple[dict, dict]:
    reps = {}
    for name, fn in fns.items():  # warm up, then size each sample
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate who goes first
        for name in order:
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fns[name]()
            samples[name].append((time.perf_counter() - t0) / reps[name])
    times = {
        n: {"ms": 1e3 * statistics.median(s), "spread_ms": [1e3 * min(s), 1e3 * max(s)]} for n, s in samples.items()
    }
    ratios = {}
    for other in ("fused", "unfused"):
        paired = [o / t for o, t in zip(samples["ours"], samples[other])]
        ratios[other] = {"median": statistics.median(paired), "spread": [min(paired), max(paired)]}
    return times, ratios


def _scenario(L: int, padded: bool) -> Callable[..., dict]:
    def run(threads: int | None = None, quick: bool = False) -> dict:
        return eval_layer_benchmark(L, padded, threads=threads, quick=quick)

    return run


SCENARIOS = {
    f"eval_layer_L{L}{'_padded' if padded else ''}": _scenario(L, padded)
    for L in (100, 512)
    for padded in (False, True)
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, nargs="+", default=[100, 512])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--E", type=int, default=512)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--min-sample-s", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    results = []
    for L in args.L:
        for padded in (False, True):
            result = eval_layer_benchmark(
                L,
                padded,
                args.B,
                args.E,
                args.H,
                rounds=args.rounds,
                min_sample_s=args.min_sample_s,
                threads=args.threads,
            )
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


if __name__ == "__main__":
    main()
