"""Context-parallel (ring) attention benchmark: W gloo ranks on this machine vs one process.

Causal self-attention, x (B, L, E), `MultiheadAttention(E, H)` in train mode with dropout 0, one step =
forward + backward of the whole module (projections included), `need_weights=False`:
- single: one process, the full sequence (our module, SDPA backend);
- ring: W processes, each on its `shard_sequence` shard (load-balanced causal), through
  `multihead.distributed.context_parallel`.
Each run is its own fresh process (spawned), with `threads` threads per process. Reported per process:
peak memory of one step (increase of VmHWM over the resident size just before the step, Linux), the
median time per step with its spread, and for the ranks the share of the step spent launching and
waiting for ring transfers (`multihead.distributed.comm_seconds`). Runs alternate single / ring for
`rounds` rounds; the memory ratio is per-rank peak / single peak. Every process runs with glibc's
mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so freed tensors go back to the system
and the peak counts live tensors, not heap growth (with glibc's dynamic threshold, freed blocks
up to 32 MiB stay in the heap and the count depends on the allocation order; `--default-malloc`).

On a machine with fewer free cores than W * threads the ranks share cores, so no speedup can show;
the memory ratio and the communication share are what such a machine measures.

    python -m multihead.benchmarks.distributed [--L 8192] [--B 1] [--E 512] [--H 8] [--world 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int | None, cfg: dict, queue) -> None:
    """One process: `world` = 0 for the single-process run, else this rank of a ring of `world`."""
    import torch.distributed as dist

    import multihead.distributed as md
    from multihead import MultiheadAttention
    from multihead.benchmarks.window import _peak_mb

    torch.set_num_threads(cfg["threads"])
    B, L, E, H = cfg["B"], cfg["L"], cfg["E"], cfg["H"]
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, generator=g)
    grad = torch.randn(B, L, E, generator=g)
    attn: torch.nn.Module  # the context-parallel wrapper, or the module itself
    if world:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )  # fmt: skip
        attn = md.context_parallel(module)
        x, grad = md.shard_sequence(x), md.shard_sequence(grad)
    else:
        attn = module
    x.requires_grad_()

    def step():
        out, _ = attn(x, x, x, need_weights=False, is_causal=True)
        out.backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)

    step()  # warm up
    peak = _peak_mb(step)
    times, comm = [], []
    for _ in range(cfg["steps"]):
        if world:
            dist.barrier()
        c0, t0 = md.comm_seconds[0], time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        comm.append(md.comm_seconds[0] - c0)
    queue.put({"rank": rank, "peak_mb": peak, "times": times, "comm": comm})
    if world:
        dist.destroy_process_group()


def _spawn(world: int, cfg: dict) -> list[dict]:
    if not cfg.get("default_malloc"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by each spawned process's glibc at start
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    nprocs = max(world, 1)
    mp.start_processes(_run, args=(world, _free_port() if world else None, cfg, queue), nprocs=nprocs,
                       start_method="spawn")  # fmt: skip
    return sorted((queue.get() for _ in range(nprocs)), key=lambda r: r["rank"])


def distributed_benchmark(
    L: int = 8192, B: int = 1, E: int = 512, H: int = 8, world: int = 2, steps: int = 3, rounds: int = 2,
    threads: int = 1, quick: bool = False, default_malloc: bool = False,
) -> dict:  # fmt: skip
    if quick:
        L, steps, rounds = 1024, 2, 1
    cfg = {"L": L, "B": B, "E": E, "H": H, "steps": steps, "threads": threads, "default_malloc": default_malloc}
    single: list[dict] = []
    ring: list[list[dict]] = []
    for _ in range(rounds):  # alternate, so drifting machine load hits both
        single += _spawn(0, cfg)
        ring.append(_spawn(world, cfg))
    single_times = [t for r in single for t in r["times"]]
    single_peak = statistics.median(r["peak_mb"] for r in single if r["peak_mb"] is not None)
    ranks = []
    for rank in range(world):
        runs = [rnd[rank] for rnd in ring]
        times = [t for r in runs for t in r["times"]]
        shares = [c / t for r in runs for c, t in zip(r["comm"], r["times"])]
        peak = statistics.median(r["peak_mb"] for r in runs if r["peak_mb"] is not None)
        ranks.append({
            "rank": rank,
            "peak_mb": peak,
            "peak_ratio_vs_single": peak / single_peak,
            "step_ms": 1e3 * statistics.median(times),
            "step_spread_ms": [1e3 * min(times), 1e3 * max(times)],
            "comm_share": statistics.median(shares),
            "comm_share_spread": [min(shares), max(shares)],
        })  # fmt: skip
    return {
        "config": {**cfg, "world": world, "rounds": rounds, "causal": True, "dtype": "float32"},
        "single": {
            "peak_mb": single_peak,
            "step_ms": 1e3 * statistics.median(single_times),
            "step_spread_ms": [1e3 * min(single_times), 1e3 * max(single_times)],
        },
        "ranks": ranks,
        "worst_peak_ratio": max(r["peak_ratio_vs_single"] for r in ranks),
        "ours_ms": max(r["step_ms"] for r in ranks),
        "peak_mb": max(r["peak_mb"] for r in ranks),
    }


SCENARIOS = {"distributed_ring": distributed_benchmark}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=8192)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--E", type=int, default=512)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold dynamic")
    args = parser.parse_args(argv)
    result = distributed_benchmark(**vars(args))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
