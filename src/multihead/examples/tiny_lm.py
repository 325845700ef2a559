"""A tiny decoder-only language model built from multihead's pieces, with greedy generation that runs
either through per-layer KV caches (prefill once, then one token per step) or by recomputing causal
attention over the whole prefix each step. Both give the same tokens.

    python examples/tiny_lm.py          # train on a toy pattern for a few seconds, then generate

Blocks are pre-norm: x + attn(norm(x)), then x + mlp(norm(x)); attention is our
`MultiheadAttention` with grouped-query heads and rotary position embedding.

Notation: B batch, T tokens, E embed dim, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from multihead import MultiheadAttention
from multihead.cache import KVCache
from multihead.rotary import RotaryEmbedding


@dataclass
class Config:
    vocab: int = 16
    dim: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    max_len: int = 64  # longest prompt + generation


class Block(nn.Module):
    def __init__(self, cfg: Config, **factory) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, **factory)
        rope = RotaryEmbedding(cfg.dim // cfg.heads, max_seq_len=cfg.max_len, device=factory.get("device"))
        self.attn = MultiheadAttention(
            cfg.dim, cfg.heads, dropout=0.0, bias=False, num_kv_heads=cfg.kv_heads, rotary=rope, **factory
        )
        self.norm2 = nn.RMSNorm(cfg.dim, **factory)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim, **factory), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim, **factory)
        )

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        h = self.norm1(x)  # (B, T, E)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=True, kv_cache=cache)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: Config, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim, **factory)
        self.blocks = nn.ModuleList(Block(cfg, **factory) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, **factory)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False, **factory)

    def forward(self, ids: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """ids (B, T) -> logits (B, T, V). With caches, ids continue the cached sequences."""
        x = self.embed(ids)  # (B, T, E)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def new_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One KV cache per layer, on the model's device and dtype."""
        w = self.head.weight
        head_dim = self.cfg.dim // self.cfg.heads
        return [
            KVCache(batch_size, max_len, self.cfg.kv_heads, head_dim, device=w.device, dtype=w.dtype)
            for _ in self.blocks
        ]

    @torch.no_grad()
    def generate(
        self, prompt_ids: Tensor, max_new_tokens: int, use_cache: bool = True, prompt_lengths: Tensor | None = None
    ) -> Tensor:
        """Greedy continuation: prompt_ids (B, T) -> new tokens (B, max_new_tokens).

        Prompts of different lengths are right-padded to T, with prompt_lengths (B,) their real
        lengths (default: all T); padding tokens are never attended to by real tokens.
        """
        batch, length = prompt_ids.shape
        device = prompt_ids.device
        lengths = torch.full((batch,), length, device=device) if prompt_lengths is None else prompt_lengths.to(device)
        rows = torch.arange(batch, device=device)
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        if use_cache:
            caches = self.new_caches(batch, length + max_new_tokens)
            logits = self(prompt_ids, caches)[rows, lengths - 1]  # prefill: (B, V) at each last real token
            if prompt_lengths is not None:
                for cache in caches:
                    cache.rewind(lengths)  # drop the padding: each sequence continues at its own length
            for i in range(max_new_tokens):
                out[:, i] = logits.argmax(-1)
                if i + 1 < max_new_tokens:
                    logits = self(out[:, i : i + 1], caches)[:, -1]  # (B, V)
            return out
        # no cache: every step recomputes causal attention over the whole (right-padded) prefix
        tokens = torch.cat([prompt_ids, prompt_ids.new_zeros(batch, max_new_tokens)], dim=1)
        for i in range(max_new_tokens):
            end = length + i if prompt_lengths is None else int(lengths.max())
            logits = self(tokens[:, :end])[rows, lengths - 1]  # (B, V)
            out[:, i] = logits.argmax(-1)
            tokens[rows, lengths] = out[:, i]
            lengths = lengths + 1
        return out


# ---- the demo: learn to count with a stride, then continue a few prompts -----------------------
def toy_batch(batch: int, length: int, vocab: int, g: torch.Generator) -> Tensor:
    """Sequences start + stride * t (mod vocab), stride in {1, 2, 3}: the model must read the stride
    off the context, which takes attention."""
    start = torch.randint(vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(length)) % vocab  # (B, T)


def train(model: TinyLM, steps: int = 60, batch: int = 32, length: int = 16, seed: int = 0) -> float:
    """A few dozen Adam steps of next-token prediction on `toy_batch`; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        ids = toy_batch(batch, length + 1, model.cfg.vocab, g)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def main(steps: int = 60, new_tokens: int = 12) -> dict:
    """Train a tiny model with a fixed seed, generate with and without the KV cache, print both.
    Runs on one CPU thread (a model this small gains nothing from more, and loses a lot when the
    cores are busy); the caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(steps, new_tokens)
    finally:
        torch.set_num_threads(threads)


def _demo(steps: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = TinyLM(Config())
    loss = train(model, steps=steps)
    t_train = time.perf_counter() - t0
    prompts = torch.tensor([[3, 5, 7, 9], [0, 1, 2, 3]])  # stride 2, stride 1
    t0 = time.perf_counter()
    cached = model.generate(prompts, new_tokens, use_cache=True)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = model.generate(prompts, new_tokens, use_cache=False)
    t_full = time.perf_counter() - t0
    match = torch.equal(cached, full)
    print(
        f"tiny LM: {sum(p.numel() for p in model.parameters())} parameters, {steps} steps in {t_train:.1f} s, loss {loss:.3f}"
    )
    for b in range(prompts.shape[0]):
        print(f"  prompt {prompts[b].tolist()}")
        print(f"    with cache    -> {cached[b].tolist()}")
        print(f"    without cache -> {full[b].tolist()}")
    print(f"  identical: {match}  (cache {1e3 * t_cached:.0f} ms, recompute {1e3 * t_full:.0f} ms)")
    return {"loss": loss, "cached": cached.tolist(), "full": full.tolist(), "match": match}


if __name__ == "__main__":
    main()
