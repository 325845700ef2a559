"""The Triton kernels behind `attend/triton.py` (imported on first use: importing triton is not free).

Five kernels, one tile recipe (`_scores`, `_keep`) shared by all, so every pass sees the same
probabilities:
- `_forward`: online softmax (FlashAttention-2) over key tiles: the output and the row log-sum-exp.
- `_weights`: one (query tile, key tile) of the weights: recompute each head's scores, P = exp(S - lse),
  and write their mean over heads (one program loops over all heads: no atomics, deterministic) or
  each head's P.
- `_backward_delta_w`: the weights' share of delta, rowsum(P_dropped * dW), when the weights get a gradient.
- `_backward_dkdv`: one key tile of one kv head: dK, dV summed over the group's query heads and every
  query tile in registers (deterministic).
- `_backward_dq`: one query tile of one head: dQ over every key tile.

Scores are in natural units (s = scale * q.k + mask), so a float64 run (the interpreter's gradcheck)
is exact. A masked-out score is -inf; a row with no visible key has lse = +inf, so P = exp(s - lse) = 0
there, in every pass.

Notation: B batch, H heads, Hkv kv heads, G = H // Hkv, L query length, S key length, D head dim
(padded to BLOCK_D); a program's tile is BLOCK_M query rows by BLOCK_N keys.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in ACC. UPCAST (bfloat16 under the interpreter, whose bfloat16 dot is wrong):
    the same products in float32, exact for bfloat16 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _scores(
    q,
    k,
    offs_m,
    offs_n,
    b,
    h,
    L,
    S,
    offset,
    left,
    right,
    scale,
    KP,
    skpb,
    DM,
    sdb,
    sdh,
    sdm,
    sdn,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_KP: tl.constexpr,
    DENSE: tl.constexpr,
    PREC: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) masked scores: scale * q k^T + float mask parts, -inf where hidden."""
    s = _dot(q, tl.trans(k), PREC, ACC, UPCAST) * scale
    rows = offs_m[:, None]
    cols = offs_n[None, :]
    inside = (rows < L) & (cols < S)
    hidden = ~inside
    if HAS_RIGHT:  # key j visible only if j <= i + offset + right
        hidden = hidden | (cols > rows + offset + right)
    if HAS_LEFT:  # ... and j >= i + offset - left
        hidden = hidden | (cols < rows + offset - left)
    if HAS_KP:  # key padding, additive (B, S): 0 or -inf, or the user's floats
        kp = tl.load(KP + b.to(tl.int64) * skpb + offs_n, mask=offs_n < S, other=0.0)
        s = s + kp.to(ACC)[None, :]
    if DENSE != 0:  # (1|B, 1|H, L, S): broadcast dims have stride 0
        ptrs = DM + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + rows * sdm + cols * sdn
        if DENSE == 1:  # bool, True = hidden
            hidden = hidden | (tl.load(ptrs, mask=inside, other=1) != 0)
        else:  # float, added
            s = s + tl.load(ptrs, mask=inside, other=0.0).to(ACC)
    return tl.where(hidden, float("-inf"), s)


@triton.jit
def _keep(seed, bh, offs_m, offs_n, S, p_drop):
    """Dropout's keep-mask of a tile of head bh = b * H + h: a function of (seed, b, h, i, j) only."""
    return tl.rand(seed + bh, offs_m[:, None] * S + offs_n[None, :]) >= p_drop


@triton.jit
def _key_range(m0, L, S, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):  # fmt: skip
    """Keys [lo, hi) the band lets query rows [m0, m0 + BLOCK_M) see; lo a multiple of BLOCK_N."""
    lo = 0
    hi = S
    if HAS_LEFT:
        lo = tl.maximum(m0 + offset - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(tl.minimum(m0 + BLOCK_M, L) + offset + right, S)
    return lo, hi


@triton.jit
def _forward(
    Q, K, V, Out, Lse, KP, DM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    skpb, sdb, sdh, sdm, sdn,
    H, G, L, S, offset, left, right, scale, seed, p_drop, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KP: tl.constexpr, DENSE: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(L, BLOCK_M), B * H): out (BLOCK_M, D) and lse (BLOCK_M,) of one head."""
    ACC: tl.constexpr = Lse.dtype.element_ty  # float32 (float64 for float64 inputs)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & d_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)  # running row max
    l_i = tl.zeros((BLOCK_M,), ACC)  # running row sum of exp (before dropout)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    lo, hi = _key_range(m0, L, S, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < S) & d_ok
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, L, S, offset, left, right, scale, KP, skpb, DM, sdb, sdh, sdm, sdn,
                    HAS_LEFT, HAS_RIGHT, HAS_KP, DENSE, PREC, ACC, UPCAST)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, S, p_drop), p * keep_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, ACC, UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: zero output, lse = +inf (so every P of the row is 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & d_ok)
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _weights(
    Q, K, Lse, W, KP, DM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, swb, swh, swm, swn,
    skpb, sdb, sdh, sdm, sdn,
    H, G, L, S, offset, left, right, scale, seed, p_drop, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KP: tl.constexpr, DENSE: tl.constexpr,
    DROPOUT: tl.constexpr, AVERAGE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(L, BLOCK_M), cdiv(S, BLOCK_N), B (AVERAGE) or B * H): one (BLOCK_M, BLOCK_N) tile of the
    weights, the mean over heads of P (after dropout) or one head's P."""
    ACC: tl.constexpr = Lse.dtype.element_ty  # float32 (float64 for float64 inputs)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2)
    if AVERAGE:
        b = z
        h0 = z * 0
        heads = H
    else:
        b = z // H
        h0 = z % H
        heads = 1
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    # a tile the band hides entirely is written as zeros without computing anything
    lo, hi = _key_range(m0, L, S, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    heads = tl.where((n0 + BLOCK_N > lo) & (n0 < hi), heads, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for i in range(0, heads):
        h = h0 + i
        hk = h // G
        q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & d_ok, other=0.0)
        k_ptrs = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
        k = tl.load(k_ptrs, mask=(offs_n[:, None] < S) & d_ok, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, L, S, offset, left, right, scale, KP, skpb, DM, sdb, sdh, sdm, sdn,
                    HAS_LEFT, HAS_RIGHT, HAS_KP, DENSE, PREC, ACC, UPCAST)  # fmt: skip
        bh = b * H + h
        lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
        p = tl.exp(s - lse[:, None])
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, S, p_drop), p * keep_scale, 0.0)
        acc += p
    if AVERAGE:
        acc = acc / H
    w_ptrs = W + b.to(tl.int64) * swb + h0.to(tl.int64) * swh + offs_m[:, None] * swm + offs_n[None, :] * swn
    tl.store(w_ptrs, acc.to(W.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


@triton.jit
def _backward_delta_w(
    Q, K, Lse, DW, Delta, KP, DM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, swb, swh, swm, swn,
    skpb, sdb, sdh, sdm, sdn,
    H, G, L, S, offset, left, right, scale, seed, p_drop, keep_scale, dw_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KP: tl.constexpr, DENSE: tl.constexpr,
    DROPOUT: tl.constexpr, AVERAGE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(L, BLOCK_M), B * H): Delta += rowsum(P_dropped * dW_h), with dW_h = dW[b] / H (AVERAGE)
    or dW[b, h]. Each program owns its rows (no atomics)."""
    ACC: tl.constexpr = Lse.dtype.element_ty  # float32 (float64 for float64 inputs)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & d_ok, other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    dw_base = DW + b.to(tl.int64) * swb
    if not AVERAGE:
        dw_base += h.to(tl.int64) * swh
    total = tl.zeros((BLOCK_M,), ACC)
    lo, hi = _key_range(m0, L, S, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=(offs_n[:, None] < S) & d_ok, other=0.0
        )
        s = _scores(q, k, offs_m, offs_n, b, h, L, S, offset, left, right, scale, KP, skpb, DM, sdb, sdh, sdm, sdn,
                    HAS_LEFT, HAS_RIGHT, HAS_KP, DENSE, PREC, ACC, UPCAST)  # fmt: skip
        p = tl.exp(s - lse[:, None])
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, S, p_drop), p * keep_scale, 0.0)
        inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)
        dw = tl.load(dw_base + offs_m[:, None] * swm + offs_n[None, :] * swn, mask=inside, other=0.0)
        total += tl.sum(p * dw.to(ACC), 1)
    d_ptrs = Delta + bh.to(tl.int64) * L + offs_m
    delta = tl.load(d_ptrs, mask=offs_m < L, other=0.0)
    tl.store(d_ptrs, delta + total * dw_scale, mask=offs_m < L)


@triton.jit
def _backward_dkdv(
    Q, K, V, DO, Lse, Delta, DW, DK, DV, KP, DM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    swb, swh, swm, swn, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    skpb, sdb, sdh, sdm, sdn,
    H, G, L, S, offset, left, right, scale, seed, p_drop, keep_scale, dw_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KP: tl.constexpr, DENSE: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DW: tl.constexpr, AVERAGE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(S, BLOCK_N), B * Hkv): dK, dV of one key tile, summed over the G query heads of the
    kv head and over every query tile the band lets see it."""
    ACC: tl.constexpr = Lse.dtype.element_ty  # float32 (float64 for float64 inputs)
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = H // G
    b = bhk // Hkv
    hk = bhk % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    kv_ok = (offs_n[:, None] < S) & d_ok
    k_ptrs = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    k = tl.load(k_ptrs, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    # query rows that can see some key of [n0, n0 + BLOCK_N)
    lo = 0
    hi = L
    if HAS_RIGHT:  # i >= j - offset - right
        lo = tl.maximum(n0 - offset - right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # i <= j - offset + left
        hi = tl.minimum(tl.minimum(n0 + BLOCK_N, S) - offset + left, L)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        dw_base = DW + b.to(tl.int64) * swb
        if not AVERAGE:
            dw_base += h.to(tl.int64) * swh
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = (offs_m[:, None] < L) & d_ok
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * som + offs_d[None, :] * sod, mask=row_ok, other=0.0)
            lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
            delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
            s = _scores(q, k, offs_m, offs_n, b, h, L, S, offset, left, right, scale, KP, skpb, DM, sdb, sdh, sdm,
                        sdn, HAS_LEFT, HAS_RIGHT, HAS_KP, DENSE, PREC, ACC, UPCAST)  # fmt: skip
            p = tl.exp(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
            dp = _dot(do, tl.trans(v), PREC, ACC, UPCAST)  # dL/d(P after dropout)
            if HAS_DW:
                inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)
                dw = tl.load(dw_base + offs_m[:, None] * swm + offs_n[None, :] * swn, mask=inside, other=0.0)
                dp += dw.to(ACC) * dw_scale
            if DROPOUT:
                keep = _keep(seed, bh, offs_m, offs_n, S, p_drop)
                pd = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            else:
                pd = p
            dv += _dot(tl.trans(pd.to(do.dtype)), do, PREC, ACC, UPCAST)
            ds = p * (dp - delta[:, None])  # dL/dS
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, ACC, UPCAST)
    dk = dk * scale
    dk_ptrs = DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = DV + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _backward_dq(
    Q, K, V, DO, Lse, Delta, DW, DQ, KP, DM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    swb, swh, swm, swn, sdqb, sdqh, sdqm, sdqd,
    skpb, sdb, sdh, sdm, sdn,
    H, G, L, S, offset, left, right, scale, seed, p_drop, keep_scale, dw_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KP: tl.constexpr, DENSE: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DW: tl.constexpr, AVERAGE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(L, BLOCK_M), B * H): dQ of one query tile of one head."""
    ACC: tl.constexpr = Lse.dtype.element_ty  # float32 (float64 for float64 inputs)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    row_ok = (offs_m[:, None] < L) & d_ok
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    do_ptrs = DO + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)
    do = tl.load(do_ptrs, mask=row_ok, other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    dw_base = DW + b.to(tl.int64) * swb
    if not AVERAGE:
        dw_base += h.to(tl.int64) * swh
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    lo, hi = _key_range(m0, L, S, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < S) & d_ok
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, L, S, offset, left, right, scale, KP, skpb, DM, sdb, sdh, sdm, sdn,
                    HAS_LEFT, HAS_RIGHT, HAS_KP, DENSE, PREC, ACC, UPCAST)  # fmt: skip
        p = tl.exp(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PREC, ACC, UPCAST)
        if HAS_DW:
            inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)
            dw = tl.load(dw_base + offs_m[:, None] * swm + offs_n[None, :] * swn, mask=inside, other=0.0)
            dp += dw.to(ACC) * dw_scale
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, offs_m, offs_n, S, p_drop), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, ACC, UPCAST)
    dq = dq * scale
    dq_ptrs = DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok)
