"""Small calls: per-call overhead against `torch.nn.MultiheadAttention`, where Python and op dispatch
cost more than the arithmetic.

Rows (each a scenario `small_*`):
- speech: seq-first (L, B, E) self-attention, L=12, B=4, E=64, H=4 (how speech models call it), with
  a float causal mask (0 / -inf) plus a float key padding mask, or no mask; train mode under
  `torch.no_grad()` (dropout 0) or eval; need_weights True / False;
- page1: the reference page's example 1, batch_first, B=4, L=100, E=512, H=8, distinct q, k, v,
  need_weights True (the default) / False;
- vit: a ViT-B/32 image tower's attention, self-attention, L=50, B=8, E=768, H=12.

Both modules share one set of weights. Measured on one thread (`torch.set_num_threads(1)`) in CPU
time of the calling thread (`time.thread_time`), so other processes on a busy machine cost little.
Rounds are interleaved (the order alternates); each sample repeats the call to last >= `min_sample_s`;
reported: per-call µs of each (median over rounds) and the median of the per-round ratios ours / torch,
with their spread (min, max) and the interquartile range.

    python -m multihead.benchmarks.small [--rounds 11] [--min-sample-s 0.05] [--only GLOB]   # table + JSON
    python -m multihead bench --scenarios 'small*'
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from multihead import MultiheadAttention


@dataclass(frozen=True)
class Row:
    batch: int
    length: int
    embed_dim: int
    heads: int
    batch_first: bool
    self_attention: bool = True
    masks: bool = False  # a float causal attn_mask and a float key_padding_mask
    eval_mode: bool = False  # else train mode (dropout 0) under no_grad
    need_weights: bool = True


ROWS: dict[str, Row] = {}
for _mode in ("train", "eval"):
    for _masks in (True, False):
        for _weights in (True, False):
            _name = f"small_speech_{_mode}_{'masks' if _masks else 'nomask'}_{'weights' if _weights else 'noweights'}"
            ROWS[_name] = Row(4, 12, 64, 4, False, True, _masks, _mode == "eval", _weights)
for _weights in (True, False):  # the page's example 1: distinct q, k, v, batch first
    _suffix = "weights" if _weights else "noweights"
    ROWS[f"small_page1_{_suffix}"] = Row(4, 100, 512, 8, True, self_attention=False, need_weights=_weights)
for _mode in ("train", "eval"):  # a ViT-B/32 tower (CLIP's layout: sequence first, self-attention)
    for _weights in (True, False):
        _suffix = "weights" if _weights else "noweights"
        _eval = _mode == "eval"
        ROWS[f"small_vit_{_mode}_{_suffix}"] = Row(8, 50, 768, 12, False, eval_mode=_eval, need_weights=_weights)


def build(row: Row, seed: int = 0) -> dict[str, Callable[[], tuple[Tensor, Tensor | None]]]:
    """Zero-argument calls of torch's module and ours on the row's inputs (same weights)."""
    torch.manual_seed(seed)
    B, L, E, H = row.batch, row.length, row.embed_dim, row.heads
    theirs = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=row.batch_first).train(not row.eval_mode)
    ours = MultiheadAttention.from_torch(theirs)
    shape = (B, L, E) if row.batch_first else (L, B, E)
    q = torch.randn(shape)
    k, v = (q, q) if row.self_attention else (torch.randn(shape), torch.randn(shape))
    attn_mask = kpm = None
    if row.masks:
        attn_mask = torch.zeros(L, L).masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        lengths = torch.randint(L // 2, L + 1, (B,), generator=torch.Generator().manual_seed(seed))
        kpm = torch.zeros(B, L).masked_fill_(torch.arange(L)[None, :] >= lengths[:, None], float("-inf"))

    def call(module: nn.Module) -> Callable[[], tuple[Tensor, Tensor | None]]:
        def run():
            with torch.no_grad():
                return module(q, k, v, key_padding_mask=kpm, need_weights=row.need_weights, attn_mask=attn_mask)

        return run

    return {"torch": call(theirs), "ours": call(ours)}


def _reps(fn: Callable[[], object], min_s: float) -> int:
    start = time.thread_time()
    n = 0
    while time.thread_time() - start < min_s / 5 or n < 3:
        fn()
        n += 1
    once = (time.thread_time() - start) / n
    return max(1, round(min_s / max(once, 1e-9)))


def time_paired(fns: Mapping[str, Callable[[], object]], rounds: int, min_s: float) -> dict:
    """Per-call seconds of torch and ours in each of `rounds` interleaved rounds, and the per-round
    ratios ours / torch."""
    for fn in fns.values():
        for _ in range(3):
            fn()  # warm up (caches, lazy init)
    reps = {name: _reps(fn, min_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in ("torch", "ours") if r % 2 == 0 else ("ours", "torch"):
            fn, n = fns[name], reps[name]
            start = time.thread_time()
            for _ in range(n):
                fn()
            samples[name].append((time.thread_time() - start) / n)
    ratios = [o / t for o, t in zip(samples["ours"], samples["torch"])]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "torch_us": 1e6 * statistics.median(samples["torch"]),
        "ours_us": 1e6 * statistics.median(samples["ours"]),
        "ratio": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
        "ratio_iqr": [q1, q3],
        "rounds": rounds,
        "reps": reps,
    }


def run_row(name: str, *, rounds: int = 11, min_sample_s: float = 0.05, threads: int = 1) -> dict:
    row = ROWS[name]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fns = build(row)
        (t_out, t_w), (o_out, o_w) = fns["torch"](), fns["ours"]()
        diff = (o_out - t_out).abs().max().item()
        if t_w is not None:  # torch's NaN rows (none here: every row sees a key) would poison this
            assert o_w is not None  # same need_weights as torch's call
            diff = max(diff, (o_w - t_w).abs().max().item())
        result = {"row": asdict(row), "threads": threads, "max_abs_diff_vs_torch": diff}
        result.update(time_paired(fns, rounds, min_sample_s))
    finally:
        torch.set_num_threads(saved)
    return result


def _scenario(name: str) -> Callable[..., dict]:
    def fn(quick: bool = False) -> dict:
        return run_row(name, rounds=5 if quick else 11, min_sample_s=0.02 if quick else 0.05)

    return fn


SCENARIOS = {name: _scenario(name) for name in ROWS}


def table(results: dict[str, dict]) -> str:
    lines = [
        "| call | torch µs | ours µs | ours / torch (median) | spread (min–max) | IQR |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lo, hi = r["ratio_spread"]
        q1, q3 = r["ratio_iqr"]
        lines.append(
            f"| {name} | {r['torch_us']:.0f} | {r['ours_us']:.0f} | {r['ratio']:.3f} | {lo:.3f}–{hi:.3f} "
            f"| {q1:.3f}–{q3:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m multihead.benchmarks.small", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--min-sample-s", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="small_*", help="glob over the row names")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    results = {}
    for name in ROWS:
        if fnmatch.fnmatchcase(name, args.only):
            results[name] = run_row(name, rounds=args.rounds, min_sample_s=args.min_sample_s, threads=args.threads)
            if not args.json:
                r = results[name]
                print(
                    f"{name}: torch {r['torch_us']:.0f} µs, ours {r['ours_us']:.0f} µs, ratio {r['ratio']:.3f}",
                    flush=True,
                )
    print(json.dumps(results, indent=1) if args.json else "\n" + table(results))


if __name__ == "__main__":
    main()
