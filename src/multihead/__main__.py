"""Command line: `python -m multihead demo | bench | check`.

demo   the reference page's five examples, then torch's module and ours on the same weights
       (largest difference, time of each), then a small decoder generating with a KV cache
bench  benchmarks against torch.nn.MultiheadAttention and the floor (see benchmarks/)
check  a quick parity sweep against torch and the float64 reference on this machine
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import MultiheadAttention


def _median_ms(fn, rounds: int = 7) -> float:
    fn()  # warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.05:  # repeat long enough to rise above timer noise
        fn()
        n += 1
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return 1e3 * sorted(samples)[rounds // 2]


def compare_with_torch(batch: int = 4, length: int = 100, embed_dim: int = 512, num_heads: int = 8) -> dict:
    """torch's module and ours built from the same weights, on the page's example 1 shapes."""
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
            t_torch = _median_ms(lambda nw=need_weights: theirs(q, k, v, need_weights=nw))
            t_ours = _median_ms(lambda nw=need_weights: ours(q, k, v, need_weights=nw))
            result[need_weights] = (diff, t_torch, t_ours)
    return result


def demo() -> int:
    from .examples import page_examples

    page_examples.main()
    print(
        f"\n=== torch.nn.MultiheadAttention vs multihead, same weights (B=4, L=100, E=512, H=8, {torch.get_num_threads()} threads)"
    )
    for need_weights, (diff, t_torch, t_ours) in compare_with_torch().items():
        print(
            f"need_weights={need_weights!s:5}: largest difference {diff:.2e}   "
            f"torch {t_torch:7.3f} ms   ours {t_ours:7.3f} ms   speedup {t_torch / t_ours:4.2f}x"
        )
    from .examples import tiny_lm

    print("\n=== A small decoder-only model (GQA + RoPE + KV cache) generating")
    tiny_lm.main()
    return 0


def check() -> int:
    """A small parity sweep; exit status 1 if anything disagrees."""
    torch.manual_seed(0)
    worst = 0.0
    for kw in (dict(), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(kdim=24, vdim=40)):
        for mask in (None, "causal", "padding"):
            theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True, **kw)
            ours = MultiheadAttention.from_torch(theirs)
            q = torch.randn(2, 9, 32)
            k, v = torch.randn(2, 9, ours.kdim), torch.randn(2, 9, ours.vdim)
            attn = torch.ones(9, 9, dtype=torch.bool).triu(1) if mask == "causal" else None
            kpm = torch.tensor([[False] * 7 + [True] * 2, [False] * 9]) if mask == "padding" else None
            for nw in (True, False):
                a = theirs(q, k, v, attn_mask=attn, key_padding_mask=kpm, need_weights=nw)
                b = ours(q, k, v, attn_mask=attn, key_padding_mask=kpm, need_weights=nw)
                err = (a[0] - b[0]).abs().max().item()
                worst = max(worst, err)
                print(f"{str(kw):38} mask={mask!s:8} need_weights={nw!s:5} max|diff|={err:.2e}")
    ok = worst < 1e-5
    print(f"\nworst difference {worst:.2e}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multihead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["demo", "bench", "check"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        return demo()
    if args.command == "check":
        return check()
    from .benchmarks import bench

    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
