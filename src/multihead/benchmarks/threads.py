"""Does blockwise's worker pool help? Ours with the pool against ours inline (torch's own intra-op
threads), at several thread counts, paired and interleaved, with the floor alongside.

    python -m multihead.benchmarks.threads [--threads 1 2 8 16] [--rounds 5] [--scenarios NAME ...]

For each thread count (default 1, 2 and every power of two up to the CPU count) and each scenario
(default: the weights path's forward at B=2 L=2048, with the causal bool mask, and the training step
at B=4 L=1024), each round times the floor, ours with the pool and ours inline in a rotating order.
Reported: median ms of each, the paired median of inline / pool (> 1: the pool helps) with its spread,
and CPU seconds per wall second of each (how many cores were busy: never above the thread count
means no oversubscription). Prints a BENCHMARKS.md-ready table and writes threads.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from multihead.attend import blockwise

from . import bench

DEFAULT_SCENARIOS = ("self_L2048_weights", "causal_L2048_weights", "train_L1024_weights")


def _timed(fn, min_s: float) -> tuple[float, float]:
    """(wall, CPU) seconds per call, repeating the call for >= min_s."""
    reps, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        reps += 1
        wall = time.perf_counter() - wall0
        if wall >= min_s:
            return wall / reps, (time.process_time() - cpu0) / reps


def measure(name: str, threads: int, rounds: int, min_s: float = 0.1, quick: bool = False) -> dict:
    case = bench.SCENARIOS[name].case
    if case is None:
        raise SystemExit(f"{name} is not a torch / ours / floor scenario")
    if quick:
        case = case.quick()
    torch.set_num_threads(threads)
    floor, ours = bench.build(case, "floor"), bench.build(case, "ours")
    default = blockwise.PARALLEL_MIN_ELEMENTS

    def with_pool():
        ours()

    def inline():
        blockwise.PARALLEL_MIN_ELEMENTS = 0
        try:
            ours()
        finally:
            blockwise.PARALLEL_MIN_ELEMENTS = default

    fns = {"floor": floor, "pool": with_pool, "inline": inline}
    for fn in fns.values():
        fn()  # warm up (the pool starts here)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    busy: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in range(rounds):
        for k in names[r % 3 :] + names[: r % 3]:
            w, c = _timed(fns[k], min_s)
            wall[k].append(w)
            busy[k].append(c / w)
    ratios = [i / p for i, p in zip(wall["inline"], wall["pool"])]
    return {
        "scenario": name,
        "threads": threads,
        "tiles": bench.tiles(case),
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in wall.items()},
        **{f"{k}_cores_busy": statistics.median(v) for k, v in busy.items()},
        "inline_over_pool": statistics.median(ratios),
        "inline_over_pool_spread": [min(ratios), max(ratios)],
        "pool_over_floor": statistics.median(wall["pool"]) / statistics.median(wall["floor"]),
        "load_avg_1min": [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }


def table(rows: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu']} ({machine['cpu_count']} CPUs; {machine.get('caches')}; tile budget "
        f"{machine.get('tile_budget_mb', 0):.1f} MiB per worker), torch {machine['torch']}",
        "",
        "| scenario | threads | floor ms | ours, pool ms | ours, inline ms | inline / pool (spread) | pool / floor "
        "| cores busy pool / inline | tiles | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tiles"]
        lo, hi = r["inline_over_pool_spread"]
        lines.append(
            f"| {r['scenario']} | {r['threads']} | {r['floor_ms']:.1f} | {r['pool_ms']:.1f} | {r['inline_ms']:.1f} | "
            f"{r['inline_over_pool']:.2f} ({lo:.2f}-{hi:.2f}) | {r['pool_over_floor']:.2f} | "
            f"{r['pool_cores_busy']:.1f} / {r['inline_cores_busy']:.1f} | {t['count']} x {t['tile_mb']:.1f} MiB, "
            f"{t['workers']} workers | {r['load_avg_1min'][0]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cpus = os.cpu_count() or 1
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, cpus) if n <= cpus})
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=counts)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "threads")
    args = p.parse_args(argv)
    bench.ensure_blockwise()
    if not bench.SCENARIOS:
        bench._builtin()
    machine = bench.machine()
    rows = []
    for threads in args.threads:
        for name in args.scenarios:
            rows.append(measure(name, threads, args.rounds, 0.02 if args.quick else 0.1, args.quick))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, machine)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    (args.out / "threads.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
