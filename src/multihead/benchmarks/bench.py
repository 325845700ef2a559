"""Benchmarks: torch.nn.MultiheadAttention, ours and the floor, side by side in one process.

    python -m multihead bench [--scenarios NAME|GLOB ...] [--rounds 5] [--threads 2] [--out DIR]
                              [--quick] [--compare previous.json] [--no-memory] [--list]

Each pairwise scenario builds torch's module, ours from its state_dict (`MultiheadAttention.from_torch`)
and the floor (one fused `F.linear` in-projection with `in_proj_weight`, `F.scaled_dot_product_attention`
with `is_causal=True` for a causal mask, else the mask as given, and the out-projection; never weights).
They are timed interleaved, in a rotating order, for `--rounds` rounds; each sample repeats the call
until it lasts >= 0.1 s; the median is reported with the spread (min, max). Forward scenarios run both
modules in train mode with dropout 0 under `torch.no_grad()`; training scenarios run forward and
backward (loss = output.sum(): the weights are returned, as when logged, but not differentiated);
eval-mode scenarios are reported separately (torch's eval fast path changes its baseline). Peak
memory is measured for each of the three in a fresh subprocess: the increase of VmHWM over VmRSS just
before the call, after one warm-up call and a reset of the high-water mark.

Writes bench.json, bench.md (the table) and bench.png (speedup and ours/floor against the sequence
length; skipped with a message without matplotlib) under --out (default bench-results/latest in the current directory; the repository's
benchmarks/results/ holds the runs BENCHMARKS.md reports, baselines for --compare).

More scenarios: `register(name, fn)` from any module, or a module in this package
(`multihead.benchmarks`) that defines `SCENARIOS = {name: fn}`; every such module is imported
(decode.py, window.py, ...). `fn` returns a
dict; it may take `threads` and `quick` keyword arguments. Such scenarios run in the full run and,
under --quick, only when named.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import multihead
import multihead.attend
from multihead import MultiheadAttention

HERE = Path(__file__).resolve().parent
MIN_SAMPLE_S = 0.1  # each timed sample repeats the call until it lasts this long


# ---- the registry ---------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    fn: Callable[..., dict]  # fn(**kwargs) -> result dict
    group: str = "other"  # forward | train | eval | other
    length: int | None = None  # sequence length, for the plot
    default: bool = True  # part of the full run
    case: Case | None = None  # set for the built-in torch / ours / floor comparisons


SCENARIOS: dict[str, Scenario] = {}


def register(
    name: str, fn: Callable[..., dict], *, group: str = "other", length: int | None = None, default: bool = True
) -> None:
    """Add a scenario. `fn` returns a dict of results (free form; `torch_ms`, `ours_ms`, `floor_ms`
    and `peak_mb` are shown in the table when present); it may accept `threads` and `quick`."""
    if name in SCENARIOS:
        raise ValueError(f"scenario {name!r} is already registered")
    SCENARIOS[name] = Scenario(name, fn, group, length, default)


@dataclass(frozen=True)
class Case:
    """One torch / ours / floor comparison: self-attention on (B, L, E) inputs."""

    batch: int
    length: int
    need_weights: bool = True
    mask: str = "none"  # none | causal (a bool triu mask) | padding (a key_padding_mask)
    train: bool = False  # forward + backward
    eval_mode: bool = False  # modules in eval mode (torch's fast path may apply)
    embed_dim: int = 512
    heads: int = 8

    def quick(self) -> Case:
        return replace(self, batch=min(self.batch, 2), length=min(self.length, 64), embed_dim=64, heads=4)

    def flops(self) -> float:
        """Multiply-adds x 2 of the projections and the attention (causal: half the pairs)."""
        B, L, E = self.batch, self.length, self.embed_dim
        attention = 4 * B * L * L * E * (0.5 if self.mask == "causal" else 1.0)
        total = 2 * B * L * E * 4 * E + attention
        return total * (3 if self.train else 1)


def register_case(name: str, case: Case, *, default: bool = True) -> None:
    group = "eval" if case.eval_mode else "train" if case.train else "forward"
    register(name, lambda **kw: run_case(case, name=name, **kw), group=group, length=case.length, default=default)
    SCENARIOS[name].case = case


def _builtin() -> None:
    register_case("page_example_1", Case(4, 100))  # the reference page's first example, default args
    for L in (512, 1024, 2048, 4096):
        B = max(1, 4096 // L)  # 4096 tokens per batch
        register_case(f"self_L{L}_weights", Case(B, L))
        register_case(f"self_L{L}_noweights", Case(B, L, need_weights=False))
    register_case("causal_L2048_weights", Case(2, 2048, mask="causal"))
    register_case("causal_L2048_noweights", Case(2, 2048, need_weights=False, mask="causal"))
    register_case("causal_L4096_weights", Case(1, 4096, mask="causal"))
    register_case("padded_L1024_weights", Case(4, 1024, mask="padding"))
    register_case("padded_L1024_noweights", Case(4, 1024, need_weights=False, mask="padding"))
    register_case("train_L1024_weights", Case(4, 1024, train=True))
    register_case("train_L1024_noweights", Case(4, 1024, need_weights=False, train=True))
    register_case("eval_page_example_1", Case(4, 100, eval_mode=True))
    register_case("eval_L1024_weights", Case(4, 1024, eval_mode=True))
    register_case("eval_L1024_noweights", Case(4, 1024, need_weights=False, eval_mode=True))


def _discover() -> list[str]:
    """Import every module of this package (but this one); register the `SCENARIOS` each defines."""
    found = []
    for info in pkgutil.iter_modules([str(HERE)]):
        if info.name in ("bench", "__init__", "__main__") or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__package__}.{info.name}")
        except Exception as err:  # another engineer's module must not break this run
            print(f"multihead.benchmarks.{info.name} not loaded: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        for name, fn in getattr(module, "SCENARIOS", {}).items():
            if name not in SCENARIOS:
                register(name, fn, group="other")
                found.append(name)
    return found


def ensure_blockwise() -> bool:
    """Register the blockwise backend (after SDPA) if the dispatch table does not have it yet.
    Returns whether this function registered it."""
    backends = multihead.attend
    if "blockwise" in backends.BACKENDS:
        return False
    from multihead.attend import blockwise

    backends.BACKENDS["blockwise"] = blockwise
    order = list(backends.PRIORITY)  # after the backends without weights, before the reference
    order.insert(order.index("reference") if "reference" in order else len(order), "blockwise")
    backends.PRIORITY = tuple(order)
    return True


# ---- building the three callables -----------------------------------------------------------------------
def build(case: Case, which: str, seed: int = 0) -> Callable[[], Any]:
    """A zero-argument call of `which` (torch | ours | floor) on the case's inputs."""
    torch.manual_seed(seed)
    B, L, E, H = case.batch, case.length, case.embed_dim, case.heads
    D = E // H
    theirs = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True)
    theirs.train(not case.eval_mode)
    ours = MultiheadAttention.from_torch(theirs)
    x = torch.randn(B, L, E, requires_grad=case.train)
    attn_mask = kpm = None
    if case.mask == "causal":
        attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = may not attend
    elif case.mask == "padding":
        lengths = torch.randint(L // 2, L + 1, (B,), generator=torch.Generator().manual_seed(seed))
        kpm = torch.arange(L)[None, :] >= lengths[:, None]  # True = padding
    params = list(theirs.parameters()) if which != "ours" else list(ours.parameters())

    def floor_forward() -> torch.Tensor:
        qkv = F.linear(x, theirs.in_proj_weight, theirs.in_proj_bias)  # (B, L, 3E)
        q, k, v = qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
        sdpa_mask = None if kpm is None else ~kpm[:, None, None, :]  # True = may attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=case.mask == "causal")
        return F.linear(o.transpose(1, 2).reshape(B, L, E), theirs.out_proj.weight, theirs.out_proj.bias)

    def module_forward(module) -> torch.Tensor:
        out, _ = module(x, x, x, key_padding_mask=kpm, need_weights=case.need_weights, attn_mask=attn_mask)
        return out

    forward = floor_forward if which == "floor" else lambda: module_forward(ours if which == "ours" else theirs)
    if case.train:

        def step():
            return torch.autograd.grad(forward().sum(), [x, *params])

        return step

    def call():
        with torch.no_grad():
            return forward()

    return call


# ---- timing ---------------------------------------------------------------------------------------------
def _repeats(fn: Callable[[], object], min_s: float) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, math.ceil(min_s / max(once, 1e-9)))


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_s: float) -> dict[str, dict]:
    """Median, min and max seconds per call of each function, timed in turn (rotating the order)
    for `rounds` rounds; each sample repeats the call to last >= min_s."""
    for fn in fns.values():
        fn()  # warm up
    reps = {name: _repeats(fn, min_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(reps[name]):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {
        name: {
            "median_ms": 1e3 * statistics.median(s),
            "min_ms": 1e3 * min(s),
            "max_ms": 1e3 * max(s),
            "reps": reps[name],
        }
        for name, s in samples.items()
    }


# ---- peak memory in a fresh process ---------------------------------------------------------------------
def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _measure_here(case: Case, which: str) -> dict:
    """In this (fresh) process: the first call (lazy initialisation, thread pools and all), then,
    after a reset of the high-water mark, a second call (steady state)."""
    import gc

    fn = build(case, which)
    gc.collect()
    reset = _reset_hwm()
    before = _status_kb("VmRSS")
    fn()
    first = _status_kb("VmHWM") - before
    gc.collect()
    reset = _reset_hwm() and reset
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM") - before
    return {"peak_mb": max(0, peak) / 1024, "first_call_peak_mb": max(0, first) / 1024, "hwm_reset": reset}


def measure_peak(name: str, which: str, threads: int, quick: bool) -> dict | None:
    """Peak memory (MB) of `which` in scenario `name`, in a fresh subprocess: {"peak_mb": steady state
    (the second call), "first_call_peak_mb": the first call}. glibc is told to serve large blocks by
    mmap and give them back, so the first call's freed memory is not reused unseen."""
    if not Path("/proc/self/status").exists():
        return None
    cmd = [sys.executable, "-m", "multihead.benchmarks.bench", "--_peak", name, which, "--threads", str(threads)]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(f"peak memory of {name}/{which} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- running scenarios ----------------------------------------------------------------------------------
@dataclass
class Options:
    rounds: int = 5
    threads: int = 2
    quick: bool = False
    memory: bool = True
    min_sample_s: float = MIN_SAMPLE_S
    extra: dict = field(default_factory=dict)


def run_case(case: Case, *, name: str, options: Options) -> dict:
    """Time torch, ours and the floor on `case`, check they agree, measure peak memory."""
    if options.quick:
        case = case.quick()
    fns = {which: build(case, which) for which in ("torch", "ours", "floor")}
    t_out, o_out = build(case, "torch")(), fns["ours"]()  # same seed: same weights and inputs
    if case.train:  # compare the gradients of the input
        t_out, o_out = t_out[0], o_out[0]
    diff = (o_out - t_out).abs().max().item()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = time_interleaved(fns, options.rounds, options.min_sample_s)
    result = {
        "case": asdict(case),
        "max_abs_diff_vs_torch": diff,
        "load_avg_1min": load_before,
        **{f"{w}_ms": times[w]["median_ms"] for w in times},
        "spread_ms": {w: [times[w]["min_ms"], times[w]["max_ms"]] for w in times},
        "ours_gflops": case.flops() / times["ours"]["median_ms"] / 1e6,
    }
    result["speedup"] = result["torch_ms"] / result["ours_ms"]
    result["ours_over_floor"] = result["ours_ms"] / result["floor_ms"]
    result["tiles"] = tiles(case)
    if options.memory:
        peaks = {w: measure_peak(name, w, options.threads, options.quick) for w in fns}
        result["peak_mb"] = {w: p and p["peak_mb"] for w, p in peaks.items()}
        result["first_call_peak_mb"] = {w: p and p["first_call_peak_mb"] for w, p in peaks.items()}
        for key in ("peak_mb", "first_call_peak_mb"):
            t, o = result[key]["torch"], result[key]["ours"]
            result[key.replace("peak_mb", "torch_over_ours_memory")] = t / o if t and o else None
    return result


def tiles(case: Case) -> dict:
    """The blockwise tiles this case gets on this machine (whether or not it takes that backend)."""
    from multihead.attend import blockwise

    B, L, H = case.batch, case.length, case.heads
    cpu = torch.device("cpu")
    batches, rows = blockwise.choose_tiles(B, H, L, L, 4, cpu, kv_heads=H, head_dim=case.embed_dim // H)
    workers = blockwise._parallel_share(B * H * L * L, torch.device("cpu"))
    return {
        "batches": batches,
        "rows": rows,
        "count": math.ceil(B / batches) * math.ceil(L / rows),
        "tile_mb": batches * rows * H * L * 4 / 2**20,
        "workers": workers,
        "budget_mb": blockwise.tile_budget_bytes(torch.device("cpu")) / 2**20,
    }


def run_scenario(scenario: Scenario, options: Options) -> dict:
    if scenario.case is not None:
        return scenario.fn(options=options)
    params = inspect.signature(scenario.fn).parameters
    kwargs = {k: v for k, v in (("threads", options.threads), ("quick", options.quick)) if k in params}
    return scenario.fn(**kwargs)


def select(patterns: list[str] | None, quick: bool) -> list[Scenario]:
    if not patterns:
        return [s for s in SCENARIOS.values() if s.default and (s.case is not None or not quick)]
    chosen = []
    for pattern in patterns:
        hits = [s for n, s in SCENARIOS.items() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SystemExit(f"no scenario matches {pattern!r}; known: {', '.join(SCENARIOS)}")
        chosen += [s for s in hits if s not in chosen]
    return chosen


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(items, desc=desc, unit="scenario", file=sys.stderr)
        for item in bar:
            bar.set_postfix_str(item.name)
            yield item
        return
    for i, item in enumerate(items, 1):
        print(f"[{i}/{len(items)}] {item.name}", file=sys.stderr, flush=True)
        yield item


# ---- reporting ------------------------------------------------------------------------------------------
def machine() -> dict:
    """The machine a run was measured on: CPU model, cache topology (cpu0's caches from sysfs, with
    the CPUs sharing each), the per-tile budget the blockwise backend derives from them, threads."""
    from multihead import hardware

    hw = hardware.summary()
    cpu = hw["cpu_model"]
    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "caches": hw["caches"],
        "cache_list": hw["cache_list"],
        "tile_budget_mb": hw["tile_budget_bytes"] / 2**20,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "multihead": multihead.__version__,
        "commit": commit,
    }


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [machine_line(meta), ""]
    groups = {"forward": "Forward (train mode, dropout 0, no_grad)", "train": "Training step (forward + backward)"}
    groups["eval"] = "Eval mode (torch's fast path may apply)"
    for group, title in groups.items():
        rows = {n: r for n, r in results["scenarios"].items() if r.get("group") == group and "ours_ms" in r}
        if not rows:
            continue
        lines += [
            f"### {title}",
            "",
            "| scenario | B | L | torch ms | ours ms | floor ms | torch/ours | ours/floor | ours spread | "
            "peak MB torch / ours / floor (steady; first call) | tiles | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            mem = []
            for key in ("peak_mb", "first_call_peak_mb"):
                peak = r.get(key) or {}
                mem.append(" / ".join(_fmt(peak.get(w), 0) for w in ("torch", "ours", "floor")))
            low, high = r["spread_ms"]["ours"]
            t = r.get("tiles") or {}
            tile = f"{t['count']} x {t['tile_mb']:.1f} MiB" if t else "-"
            lines.append(
                f"| {name} | {r['case']['batch']} | {r['case']['length']} | {_fmt(r['torch_ms'])} | "
                f"{_fmt(r['ours_ms'])} | {_fmt(r['floor_ms'])} | {r['speedup']:.2f} | {r['ours_over_floor']:.2f} | "
                f"{(high - low) / r['ours_ms']:.0%} | {mem[0]}; {mem[1]} | {tile} | {_fmt(r.get('load_avg_1min'))} |"
            )
        lines.append("")
    others = {n: r for n, r in results["scenarios"].items() if r.get("group") not in groups}
    if others:
        lines += ["### Other scenarios", ""]
        for name, r in others.items():
            shown = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            lines.append(f"- **{name}**: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        lines.append("")
    return "\n".join(lines)


def machine_line(meta: dict) -> str:
    """'Machine: <CPU> (n CPUs; caches; tile budget), threads, rounds, torch': printed above every table."""
    m = meta["machine"]
    return (
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs; {m.get('caches', 'caches unknown')}; "
        f"blockwise tile budget {m.get('tile_budget_mb', 0):.1f} MiB per worker); threads {meta['threads']}, "
        f"rounds {meta['rounds']}, torch {m['torch']}{', quick sizes' if meta['quick'] else ''}"
    )


def compare(results: dict, previous: dict) -> str:
    lines = [
        "| scenario | ours ms before | ours ms now | change | ours/floor before | ours/floor now |",
        "|---|---|---|---|---|---|",
    ]
    for name, now in results["scenarios"].items():
        before = previous.get("scenarios", {}).get(name)
        if not before or "ours_ms" not in now or "ours_ms" not in before:
            continue
        change = now["ours_ms"] / before["ours_ms"] - 1
        lines.append(
            f"| {name} | {before['ours_ms']:.1f} | {now['ours_ms']:.1f} | {change:+.1%} | "
            f"{before['ours_over_floor']:.2f} | {now['ours_over_floor']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    series: dict[str, list[tuple[int, float, float]]] = {}
    for name, r in results["scenarios"].items():
        if name.startswith("self_L") and "ours_ms" in r:
            label = "with weights" if r["case"]["need_weights"] else "without weights"
            series.setdefault(label, []).append((r["case"]["length"], r["speedup"], r["ours_over_floor"]))
    if not series:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], marker="o", label=label)
        right.plot(xs, [p[2] for p in points], marker="o", label=label)
    left.set(title="speedup: torch / ours", ylabel="x")
    right.set(title="ours / floor (fused proj + SDPA)")
    ticks = sorted({x for pts in series.values() for x, _, _ in pts})
    for ax in (left, right):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("sequence length L (B * L = 4096)")
        ax.legend()
    meta = results["meta"]
    fig.suptitle(f"E=512, H=8, {meta['threads']} threads, torch {meta['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command line ---------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multihead bench", description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", metavar="NAME", help="names or globs (default: the full run)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per scenario (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results") / "latest",
        help="output folder (default bench-results/latest, in the current directory)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, no peak memory: a smoke test")
    p.add_argument("--compare", type=Path, metavar="PREVIOUS.json", help="show changes against a saved run")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--_peak", nargs=2, metavar=("NAME", "WHICH"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    registered_here = ensure_blockwise()
    _builtin()
    extra = _discover()
    if args._peak:  # child process of measure_peak
        name, which = args._peak
        case = SCENARIOS[name].case
        assert case is not None, f"{name} has no pairwise case to measure"
        print(json.dumps(_measure_here(case.quick() if args.quick else case, which)))
        return 0
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:28s} {s.group:8s} {'' if s.default else '(not in the full run)'}")
        return 0

    options = Options(
        rounds=2 if args.quick and args.rounds == 5 else args.rounds,
        threads=args.threads,
        quick=args.quick,
        memory=not (args.no_memory or args.quick),
        min_sample_s=0.02 if args.quick else MIN_SAMPLE_S,
    )
    chosen = select(args.scenarios, args.quick)
    results = {
        "meta": {
            "threads": args.threads,
            "rounds": options.rounds,
            "quick": args.quick,
            "min_sample_s": options.min_sample_s,
            "machine": machine(),
            "backends": list(multihead.attend.PRIORITY),
            "blockwise_registered_by_bench": registered_here,
            "extra_scenario_modules": extra,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "scenarios": {},
    }
    print(machine_line(results["meta"]), file=sys.stderr)
    started = time.perf_counter()
    for scenario in _progress(chosen, "bench"):
        try:
            result = run_scenario(scenario, options)
        except Exception as err:  # report and go on: one broken scenario must not lose the run
            print(f"{scenario.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            result = {"error": f"{type(err).__name__}: {err}"}
        results["scenarios"][scenario.name] = {"group": scenario.group, **result}
    results["meta"]["seconds"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (args.out / "bench.md").write_text(table + "\n")
    print(table)
    if plot(results, args.out / "bench.png"):
        print(f"plot: {args.out / 'bench.png'}")
    if args.compare:
        print("\nAgainst", args.compare)
        print(compare(results, json.loads(args.compare.read_text())))
    print(f"results: {args.out / 'bench.json'} ({results['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
