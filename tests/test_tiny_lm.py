"""The tiny LM example: greedy generation through the KV cache equals recomputing the whole prefix."""

from __future__ import annotations

import pytest
import torch

from multihead.examples import tiny_lm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """Untrained, float64: logits are far from ties, so any cache bug shows as a different token."""
    torch.manual_seed(0)
    cfg = tiny_lm.Config(vocab=23, dim=48, heads=6, kv_heads=2, layers=2, max_len=32)
    return tiny_lm.TinyLM(cfg, dtype=torch.float64).eval()


def test_cached_logits_equal_full_pass(model):
    ids = torch.randint(23, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        caches = model.new_caches(2, 16)
        steps = [model(ids[:, :5], caches)] + [model(ids[:, t : t + 1], caches) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_generate_same_tokens_with_and_without_cache(model):
    prompts = torch.randint(23, (2, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompts, 12, use_cache=True)
    full = model.generate(prompts, 12, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, full)


def test_generate_prompts_of_different_lengths(model):
    """Right-padded prompts with their lengths: same tokens with and without cache, and the same as
    generating each prompt alone."""
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(23, (3,), generator=g), torch.randint(23, (7,), generator=g)
    prompts = torch.stack([torch.cat([short, torch.full((4,), 22)]), long])  # (2, 7), padded with 22
    lengths = torch.tensor([3, 7])
    cached = model.generate(prompts, 10, use_cache=True, prompt_lengths=lengths)
    full = model.generate(prompts, 10, use_cache=False, prompt_lengths=lengths)
    assert torch.equal(cached, full)
    assert torch.equal(cached[0], model.generate(short[None], 10, use_cache=True)[0])
    assert torch.equal(cached[1], model.generate(long[None], 10, use_cache=False)[0])


def test_main_trains_and_matches(capsys):
    result = tiny_lm.main(steps=40, new_tokens=8)
    assert result["match"]
    assert result["loss"] < 1.0
    assert "identical: True" in capsys.readouterr().out
