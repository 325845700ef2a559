"""`MultiheadAttention.explain(...)`: which backend serves a call, why the others do not, and what the
call costs (estimated FLOPs and peak bytes of the chosen path and of torch's).

Runs only the checks and the mask building of the forward (no projection, no attention): the
backends decide from shapes, dtypes and the `AttentionMask`, so q/k/v are stand-ins that hold no
memory. Notation: B batch, L query length, S key length, E embed dim, H heads, Hkv key/value heads,
D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from . import attend
from .attend import blockwise, windowed
from .masks import AttentionMask, build_mask
from .validation import check_inputs

if TYPE_CHECKING:
    from .module import MultiheadAttention

__all__ = ["Explanation", "explain_call"]


@dataclass(frozen=True)
class Explanation:
    """What `MultiheadAttention.forward` would do with these arguments.

    backend: the backend that serves the call (forced: `module.backend` chose it).
    reasons: for each other backend (in priority order), why it does not serve this call (its own
        refusals, with thresholds; or that it could, but comes later in the priority list or another
        was forced).
    flops / peak_bytes: estimated (from shapes, not measured) cost of our path (projections + attention; peak bytes are the
        memory the call allocates beyond its inputs and parameters). torch_flops / torch_peak_bytes:
        the same estimate for `torch.nn.MultiheadAttention`'s path on this call.
    shape: B, L, S, H, Hkv, D as the backends see them (S counts bias_k / zero-attention keys).
    """

    backend: str
    forced: bool
    reasons: dict[str, list[str]]
    flops: int
    peak_bytes: int
    torch_flops: int
    torch_peak_bytes: int
    shape: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.shape.items())
        lines = [f"backend: {self.backend}{' (forced)' if self.forced else ''}   [{dims}]"]
        lines += [f"  not {name}: {'; '.join(why)}" for name, why in self.reasons.items()]
        lines.append(f"cost (ours):  {_flops(self.flops)}, peak {_bytes(self.peak_bytes)}")
        lines.append(f"cost (torch): {_flops(self.torch_flops)}, peak {_bytes(self.torch_peak_bytes)}")
        return "\n".join(lines)


def explain_call(
    module: MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    kv_cache=None,
) -> Explanation:
    if kv_cache is not None:
        raise ValueError("explain does not take kv_cache (a decoding step always attends causally over the cache)")
    weight = module.out_proj.weight
    batched = check_inputs(
        query,
        key,
        value,
        embed_dim=module.embed_dim,
        kdim=module.kdim,
        vdim=module.vdim,
        batch_first=module.batch_first,
        param=weight,
    )
    b_dim, l_dim = (0, 1) if module.batch_first else (1, 0)
    batch = query.shape[b_dim] if batched else 1
    q_len = query.shape[l_dim] if batched else query.shape[0]
    k_len = key.shape[l_dim] if batched else key.shape[0]
    H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    mask = build_mask(
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        batch=batch,
        heads=H,
        q_len=q_len,
        k_len=k_len,
        batched=batched,
        device=query.device,
        window=module.window,
        batch_first=module.batch_first,
    )
    extra = int(module.bias_k is not None) + int(module.add_zero_attn)
    if extra:
        mask = mask.pad_keys(extra)
    S = mask.k_len
    # stand-ins with the right shape, dtype and device that hold no memory
    stand_in = query.new_empty(())
    q = stand_in.expand(batch, H, q_len, D)
    k = v = stand_in.expand(batch, Hkv, S, D)

    forced = module.backend is not None
    chosen = attend.choose(q, k, v, mask, need_weights=need_weights, backend=module.backend)
    reasons = {}
    for name, why in attend.explain(q, k, v, mask, need_weights=need_weights).items():
        if name == chosen.name:
            continue
        if not why:  # it could serve: say why it does not
            why = [
                f"could serve; backend forced to {chosen.name!r}"
                if forced
                else f"could serve; {chosen.name} comes first"
            ]
        reasons[name] = _with_thresholds(name, why, mask)
    item = query.element_size()
    projections = _projection_flops(module, batch, q_len, k_len)
    ours_flops = projections + _attention_flops(chosen.name, batch, H, q_len, S, D, mask)
    torch_flops = projections + 4 * batch * H * q_len * S * D + 5 * batch * H * q_len * S
    io = (batch * q_len * module.embed_dim * 3 + 2 * batch * S * Hkv * D) * item  # q, k, v, out, out-proj
    ours_peak = io + _attention_bytes(
        chosen.name, batch, H, q_len, S, D, item, mask, need_weights, average_attn_weights
    )
    torch_peak = io + _torch_attention_bytes(batch, H, q_len, S, D, item, mask, need_weights, average_attn_weights)
    return Explanation(
        backend=chosen.name,
        forced=forced,
        reasons=reasons,
        flops=int(ours_flops),
        peak_bytes=int(ours_peak),
        torch_flops=int(torch_flops),
        torch_peak_bytes=int(torch_peak),
        shape={"B": batch, "L": q_len, "S": S, "H": H, "Hkv": Hkv, "D": D},
    )


# ---- why not, with the thresholds ---------------------------------------------------------------
def _with_thresholds(name: str, reasons: list[str], mask: AttentionMask) -> list[str]:
    if name != "windowed" or "window too wide to pay" not in reasons:
        return reasons
    chunk = windowed.chunk_size(mask)
    share = windowed.visited_share(mask)
    detail = (
        f"window too wide to pay: pays when L >= 4 * chunk = {4 * chunk} and the band visits at most "
        f"{windowed.MAX_SHARE:.0%} of the L * S pairs; here L = {mask.q_len} and it visits {share:.0%}"
    )
    return [detail if r == "window too wide to pay" else r for r in reasons]


# ---- cost estimates -----------------------------------------------------------------------------
def _projection_flops(module: MultiheadAttention, batch: int, q_len: int, k_len: int) -> int:
    E, kv = module.embed_dim, module.num_kv_heads * module.head_dim
    q_and_out = 2 * 2 * batch * q_len * E * E
    return q_and_out + 2 * batch * k_len * kv * (module.kdim + module.vdim)


def _attention_flops(name: str, B: int, H: int, L: int, S: int, D: int, mask: AttentionMask) -> float:
    """Two matmuls (scores, weighted sum) and ~5 flops per score for the softmax; the windowed
    backend visits only its band."""
    share = windowed.visited_share(mask) if name == "windowed" else 1.0
    return share * (4 * B * H * L * S * D + 5 * B * H * L * S)


def _mask_bytes(mask: AttentionMask, H: int, item: int) -> int:
    """The dense mask an SDPA call is handed (broadcast shape of every part), 0 when none is."""
    if mask.is_empty or mask.is_plain_causal:
        return 0
    b = mask.batch if mask.key_padding is not None or (mask.dense is not None and mask.dense.shape[0] > 1) else 1
    h = H if mask.dense is not None and mask.dense.shape[1] > 1 else 1
    rows = mask.q_len if mask.has_band or mask.dense is not None else 1
    return b * h * rows * mask.k_len * (1 if mask.is_bool else item)


def _attention_bytes(name, B, H, L, S, D, item, mask, need_weights, average) -> int:
    weights = (B * L * S if average else B * H * L * S) * item if need_weights else 0
    out = B * H * L * D * item
    if name == "sdpa":
        return out + _mask_bytes(mask, H, item)
    if name == "windowed":
        chunk = windowed.chunk_size(mask)
        left, right = mask.band_limits()
        band = min(S, chunk + (left or 0) + (right or 0))
        return out + 3 * B * H * chunk * band * item
    if name == "blockwise":
        batches, rows = blockwise.choose_tiles(B, H, L, S, item, mask.device)
        return out + weights + 2 * batches * H * rows * S * max(item, 4)  # a tile's scores and probabilities
    return out + weights + 3 * B * H * L * S * item  # reference: scores, probabilities, mask


def _torch_attention_bytes(B, H, L, S, D, item, mask, need_weights, average) -> int:
    """torch's F.multi_head_attention_forward: with weights it materialises the (B*H, L, S) scores
    and probabilities (and the merged float mask); without, SDPA with the merged mask."""
    merged = 0 if mask.is_empty else B * H * L * S * item  # key padding merges into a (B*H, L, S) float mask
    out = B * H * L * D * item
    if need_weights:
        averaged = B * L * S * item if average else 0
        return out + merged + 2 * B * H * L * S * item + averaged
    return out + merged


def _flops(n: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
