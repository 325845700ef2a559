"""Command line: `multihead demo | bench | check | plot` (or `python -m multihead ...`).

demo   the reference page's five examples, then torch's module and ours on the same weights
       (largest difference; median time of each over interleaved samples, with the spread), then a
       small decoder generating with a KV cache
bench  benchmarks against torch.nn.MultiheadAttention and the floor (`multihead bench --help`)
check  parity on this machine: outputs and weights against torch and against the float64 reference,
       including grouped-query heads, rotary embeddings, windows and the KV cache
plot   the page's example 5 as a picture of its attention weights (needs matplotlib)
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable

import torch

from . import KVCache, MultiheadAttention, RotaryEmbedding, __version__


# ---- timing: a median of interleaved samples, never one ------------------------------------------------
def _sample_s(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _repeats_for(fn: Callable[[], object], min_s: float = 0.05) -> int:
    """How many calls make one sample last at least `min_s` (above timer and scheduler noise)."""
    fn()  # warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        fn()
        n += 1
    return max(n, 1)


def compare_timing(fns: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, the functions interleaved in a
    rotating order (so a slow moment of the machine hits them alike)."""
    repeats = {name: _repeats_for(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(_sample_s(fns[name], repeats[name]))
    return samples


def _median_spread(xs: list[float], scale: float = 1.0) -> str:
    return f"{scale * statistics.median(xs):7.3f} [{scale * min(xs):.3f}-{scale * max(xs):.3f}]"


def compare_with_torch(
    batch: int = 4, length: int = 100, embed_dim: int = 512, num_heads: int = 8, rounds: int = 9
) -> dict[bool, dict]:
    """torch's module and ours built from the same weights, on the page's example 1 shapes: largest
    difference, and per-call samples of each (interleaved rounds)."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    q, k, v = (torch.randn(batch, length, embed_dim) for _ in range(3))
    result = {}
    with torch.no_grad():
        for need_weights in (True, False):
            a, wa = theirs(q, k, v, need_weights=need_weights)
            b, wb = ours(q, k, v, need_weights=need_weights)
            diff = (a - b).abs().max().item()
            if need_weights:
                diff = max(diff, (wa - wb).abs().max().item())
            calls: dict[str, Callable[[], object]] = {
                "torch": functools.partial(theirs, q, k, v, need_weights=need_weights),
                "ours": functools.partial(ours, q, k, v, need_weights=need_weights),
            }
            samples = compare_timing(calls, rounds=rounds)
            ratios = [t / o for t, o in zip(samples["torch"], samples["ours"])]
            result[need_weights] = {"diff": diff, **samples, "speedup": ratios}
    return result


# ---- demo ------------------------------------------------------------------------------------------------
def demo() -> int:
    from .examples import page_examples, tiny_lm

    page_examples.main()
    print(
        f"\n=== torch.nn.MultiheadAttention vs multihead, same weights (B=4, L=100, E=512, H=8, "
        f"{torch.get_num_threads()} threads; ms per call: median [min-max] of 9 interleaved samples)"
    )
    for need_weights, r in compare_with_torch().items():
        print(
            f"need_weights={need_weights!s:5}: largest difference {r['diff']:.2e}   "
            f"torch {_median_spread(r['torch'], 1e3)} ms   ours {_median_spread(r['ours'], 1e3)} ms   "
            f"torch/ours {_median_spread(r['speedup'])}x"
        )
    print("\n=== A small decoder-only model (GQA + RoPE + KV cache) generating")
    tiny_lm.main()
    print("\nSee the page's example 5 as a picture: multihead plot --out attention.png")
    return 0


# ---- check -----------------------------------------------------------------------------------------------
def _oracle(module: MultiheadAttention) -> MultiheadAttention:
    """The same weights in float64, on the plain-math reference backend."""
    oracle = copy.deepcopy(module).double()
    oracle.backend = "reference"
    return oracle


def _err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None or a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check() -> int:
    """Outputs and weights of ours against torch (same weights, float32) and against the float64
    reference; exit status 1 if anything disagrees. A row passes when ours is within 1e-5 of torch
    and its error against float64 is at most twice torch's (plus 1e-6 for round-off); rows torch
    cannot compute (GQA, RoPE, window, cache) hold ours to 1e-5 of the float64 reference."""
    torch.manual_seed(0)
    rows: list[
        tuple[str, float | None, float, float | None, bool]
    ] = []  # label, vs torch, ours vs f64, torch vs f64, ok
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 7 + [True] * 2, [False] * 9])
    for label, kw in (
        ("plain", {}),
        ("add_bias_kv", {"add_bias_kv": True}),
        ("add_zero_attn", {"add_zero_attn": True}),
        ("kdim=24 vdim=40", {"kdim": 24, "vdim": 40}),
    ):
        theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True, **kw)
        ours = MultiheadAttention.from_torch(theirs)
        oracle = _oracle(ours)
        q = torch.randn(2, 9, 32)
        k, v = torch.randn(2, 9, ours.kdim), torch.randn(2, 9, ours.vdim)
        for mask_name, attn, kpm in (("no mask", None, None), ("causal", causal, None), ("padding", None, padding)):
            for nw in (True, False):
                kwargs = {"attn_mask": attn, "key_padding_mask": kpm, "need_weights": nw}
                a, wa = theirs(q, k, v, **kwargs)
                b, wb = ours(q, k, v, **kwargs)
                c, wc = oracle(q.double(), k.double(), v.double(), **kwargs)
                vs_torch = max(_err(a, b), _err(wa, wb))
                ours_f64 = max(_err(b, c), _err(wb, wc))
                torch_f64 = max(_err(a, c), _err(wa, wc))
                ok = vs_torch < 1e-5 and ours_f64 <= 2 * torch_f64 + 1e-6
                rows.append((f"{label}, {mask_name}, need_weights={nw}", vs_torch, ours_f64, torch_f64, ok))

    x = torch.randn(2, 12, 32)
    extras: tuple[tuple[str, dict, dict], ...] = (
        ("GQA (num_kv_heads=2)", {"num_kv_heads": 2}, {}),
        ("RoPE", {"rotary": RotaryEmbedding(8)}, {"is_causal": True}),
        ("window=3, causal", {"window": 3}, {"is_causal": True}),
        ("GQA + RoPE + window", {"num_kv_heads": 2, "rotary": RotaryEmbedding(8), "window": (4, 0)}, {}),
    )
    for label, ctor, call in extras:
        ours = MultiheadAttention(32, 4, **ctor)
        oracle = _oracle(ours)
        for nw in (True, False):
            b, wb = ours(x, x, x, need_weights=nw, **call)
            c, wc = oracle(x.double(), x.double(), x.double(), need_weights=nw, **call)
            err = max(_err(b, c), _err(wb, wc))
            rows.append((f"{label}, need_weights={nw}", None, err, None, err < 1e-5))

    # the KV cache: prefill 7 tokens, decode 5 one at a time; equals full causal attention in float64
    ours = MultiheadAttention(32, 4, num_kv_heads=2, rotary=RotaryEmbedding(8)).eval()
    oracle = _oracle(ours)
    cache = KVCache(batch_size=2, max_len=16, num_kv_heads=2, head_dim=8)
    with torch.no_grad():
        steps = [ours(x[:, :7], x[:, :7], x[:, :7], need_weights=False, kv_cache=cache)[0]]
        for t in range(7, 12):
            tok = x[:, t : t + 1]
            steps.append(ours(tok, tok, tok, need_weights=False, kv_cache=cache)[0])
        full, _ = oracle(x.double(), x.double(), x.double(), is_causal=True, need_weights=False)
    err = _err(torch.cat(steps, dim=1), full)
    rows.append(("KV cache: prefill 7 + decode 5 (GQA + RoPE)", None, err, None, err < 1e-5))

    width = max(len(r[0]) for r in rows)
    print(f"{'configuration':{width}}  {'ours-torch':>10}  {'ours-f64':>9}  {'torch-f64':>9}")
    for label, *errors, ok in rows:
        shown = ["-" if e is None else f"{e:.1e}" for e in errors]
        print(f"{label:{width}}  {shown[0]:>10}  {shown[1]:>9}  {shown[2]:>9}  {'ok' if ok else 'MISMATCH'}")
    bad = sum(not r[4] for r in rows)
    print(f"\n{len(rows) - bad} of {len(rows)} configurations agree" + ("" if not bad else f"; {bad} MISMATCH"))
    return 1 if bad else 0


# ---- plot ------------------------------------------------------------------------------------------------
def plot(argv: list[str]) -> int:
    from .viz import main as plot_main

    try:
        return plot_main(argv)
    except ImportError as err:  # matplotlib is the optional `viz` extra
        print(f"multihead plot: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="multihead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"multihead {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,check,plot}")
    sub.add_parser("demo", help="the page's five examples, torch vs ours, a small LM generating")
    # bench and plot parse their own options (so `multihead bench --help` lists bench's)
    sub.add_parser("bench", help="benchmarks against torch and the floor", add_help=False)
    sub.add_parser("check", help="parity against torch and the float64 reference")
    sub.add_parser("plot", help="the page's example 5 as a picture", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmarks import bench

        return bench.main(rest)
    if args.command == "plot":
        return plot(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return demo() if args.command == "demo" else check()


if __name__ == "__main__":
    sys.exit(main())
