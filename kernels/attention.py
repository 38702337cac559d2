"""Fused attention for the UNet's self- and cross-attention, forward and backward, in Triton.

FlashAttention-2 (Dao 2023): each program owns a block of queries, streams the keys/values past them
with an online softmax, and never writes the (N × M) score matrix; it saves only the log-sum-exp per
query, from which the backward recomputes the probabilities block by block.

Written for SD's shapes:
- head dims 40 / 80 / 160 (SD 1.x) are not powers of two. `tl.dot` needs power-of-two tiles, and padding
  to 64 / 128 / 256 wastes 37% of every matmul. We split the head dim into two power-of-two column
  chunks, 40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32, and do two dots per product: 0% waste at 80 and
  160, 17% at 40 (SD 2.x's 64 needs one chunk).
- cross-attention has 77 keys: the key block is widened to hold all of them, so the loop runs once.

File order: kernels → autograd.Function → public function → reference.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Kernels. Every tensor is (B, H, N, D) with the last dim contiguous; the head dim is read as a chunk
# of D0 columns plus, when D1 > 0, a chunk of D1 columns starting at D0 (masked past D).

@triton.jit
def _load_tile(ptr, rows, row_stride, n_rows, cols, D):
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < D), other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N_Q, N_KV, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = tl.arange(0, D0)
    q0 = _load_tile(Q, rows, sqn, N_Q, c0, D)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(Q, rows, sqn, N_Q, c1, D)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - max)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k0 = _load_tile(K, cols, skn, N_KV, c0, D)
        s = tl.dot(q0, tl.trans(k0))
        if D1 > 0:
            k1 = _load_tile(K, cols, skn, N_KV, c1, D)
            s += tl.dot(q1, tl.trans(k1))
        s = tl.where(cols[None, :] < N_KV, s * qk_scale, float("-inf"))
        # online softmax: rescale what was accumulated under the old max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_tile(V, cols, svn, N_KV, c0, D)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0)
        if D1 > 0:
            v1 = _load_tile(V, cols, svn, N_KV, c1, D)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1)
        m_i = m_new
    out_mask = rows[:, None] < N_Q
    tl.store(O + rows[:, None] * son + c0[None, :], (acc0 / l_i[:, None]).to(O.dtype.element_ty),
             mask=out_mask & (c0[None, :] < D))
    if D1 > 0:
        tl.store(O + rows[:, None] * son + c1[None, :], (acc1 / l_i[:, None]).to(O.dtype.element_ty),
                 mask=out_mask & (c1[None, :] < D))
    tl.store(LSE + bh * N_Q + rows, m_i + tl.math.log2(l_i), mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     H, N_Q, N_KV, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """One block of keys/values; loop over all queries. dV = Pᵀ dO, dK = scale · dSᵀ Q, dS = P ∘ (dP − Δ)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdb + h * sdh  # dO has q's layout; dK/dV are written contiguous
    DK += bh * N_KV * D
    DV += bh * N_KV * D
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, D0)
    k0 = _load_tile(K, cols, skn, N_KV, c0, D)
    v0 = _load_tile(V, cols, svn, N_KV, c0, D)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        k1 = _load_tile(K, cols, skn, N_KV, c1, D)
        v1 = _load_tile(V, cols, svn, N_KV, c1, D)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    for start in range(0, N_Q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0 = _load_tile(Q, rows, sqn, N_Q, c0, D)
        do0 = _load_tile(DO, rows, sdn, N_Q, c0, D)
        sT = tl.dot(k0, tl.trans(q0))  # (BLOCK_N, BLOCK_M): scores, transposed
        dpT = tl.dot(v0, tl.trans(do0))
        if D1 > 0:
            q1 = _load_tile(Q, rows, sqn, N_Q, c1, D)
            do1 = _load_tile(DO, rows, sdn, N_Q, c1, D)
            sT += tl.dot(k1, tl.trans(q1))
            dpT += tl.dot(v1, tl.trans(do1))
        lse = tl.load(LSE + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(rows[None, :] < N_Q, pT, 0.0)  # padding queries contribute nothing
        dsT = pT * (dpT - delta[None, :])
        dv0 += tl.dot(pT.to(do0.dtype), do0)
        dk0 += tl.dot(dsT.to(q0.dtype), q0)
        if D1 > 0:
            dv1 += tl.dot(pT.to(do1.dtype), do1)
            dk1 += tl.dot(dsT.to(q1.dtype), q1)
    mask = cols[:, None] < N_KV
    tl.store(DV + cols[:, None] * D + c0[None, :], dv0.to(DV.dtype.element_ty), mask=mask & (c0[None, :] < D))
    tl.store(DK + cols[:, None] * D + c0[None, :], (dk0 * sm_scale).to(DK.dtype.element_ty), mask=mask & (c0[None, :] < D))
    if D1 > 0:
        tl.store(DV + cols[:, None] * D + c1[None, :], dv1.to(DV.dtype.element_ty), mask=mask & (c1[None, :] < D))
        tl.store(DK + cols[:, None] * D + c1[None, :], (dk1 * sm_scale).to(DK.dtype.element_ty), mask=mask & (c1[None, :] < D))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   H, N_Q, N_KV, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """One block of queries; loop over all keys. dQ = scale · dS K. A separate pass, so no atomics."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdb + h * sdh
    DQ += bh * N_Q * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = tl.arange(0, D0)
    q0 = _load_tile(Q, rows, sqn, N_Q, c0, D)
    do0 = _load_tile(DO, rows, sdn, N_Q, c0, D)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(Q, rows, sqn, N_Q, c1, D)
        do1 = _load_tile(DO, rows, sdn, N_Q, c1, D)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse = tl.load(LSE + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k0 = _load_tile(K, cols, skn, N_KV, c0, D)
        v0 = _load_tile(V, cols, svn, N_KV, c0, D)
        s = tl.dot(q0, tl.trans(k0))
        dp = tl.dot(do0, tl.trans(v0))
        if D1 > 0:
            k1 = _load_tile(K, cols, skn, N_KV, c1, D)
            v1 = _load_tile(V, cols, svn, N_KV, c1, D)
            s += tl.dot(q1, tl.trans(k1))
            dp += tl.dot(do1, tl.trans(v1))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(cols[None, :] < N_KV, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq0 += tl.dot(ds.to(k0.dtype), k0)
        if D1 > 0:
            dq1 += tl.dot(ds.to(k1.dtype), k1)
    mask = rows[:, None] < N_Q
    tl.store(DQ + rows[:, None] * D + c0[None, :], (dq0 * sm_scale).to(DQ.dtype.element_ty), mask=mask & (c0[None, :] < D))
    if D1 > 0:
        tl.store(DQ + rows[:, None] * D + c1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=mask & (c1[None, :] < D))


# ---------------------------------------------------------------------------------------------
# Launch configuration

def head_chunks(D: int) -> tuple[int, int]:
    """Split D into two power-of-two chunks (each >= 16, what tl.dot accepts): 40 -> (32, 16),
    64 -> (64, 0), 80 -> (64, 16), 160 -> (128, 32)."""
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    return d0, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _blocks(n_kv: int, D: int, interpret: bool) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, num_warps, num_stages."""
    if interpret:
        return 16, 16, 4, 1
    # Short key sequences (cross-attention on 77 tokens) fit one block: the loop body runs once.
    block_n = triton.next_power_of_2(n_kv) if n_kv <= 128 and D <= 128 else 64
    if D <= 64:
        return 128, min(block_n, 128), 4, 3
    if D <= 128:
        return 128, min(block_n, 64 if n_kv > 128 else block_n), 8, 2
    return 64, min(block_n, 64), 4, 2


def _forward(q, k, v, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    d0, d1 = head_chunks(D)
    interp = _interpreting(q)
    bm, bn, warps, stages = _blocks(M, D, interp)
    o = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, bm), B * H)
    extra = {} if interp else {"num_warps": warps, "num_stages": stages}
    _fwd_kernel[grid](q, k, v, o, lse, scale * LOG2E,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                      H, N, M, D, BLOCK_M=bm, BLOCK_N=bn, D0=d0, D1=d1, **extra)
    return o, lse


def _backward(q, k, v, o, lse, do, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    d0, d1 = head_chunks(D)
    interp = _interpreting(q)
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # Δ_i = Σ_d dO_id O_id = rowsum(P ∘ dP)
    dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H, M, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, H, M, D, device=q.device, dtype=v.dtype)
    bm, bn, warps, stages = (16, 16, 4, 1) if interp else (64, 64, 4, 2) if D > 64 else (64, 128 if M > 64 else 64, 4, 2)
    extra = {} if interp else {"num_warps": warps, "num_stages": stages}
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _bwd_dkdv_kernel[(triton.cdiv(M, bn), B * H)](q, k, v, do, lse, delta, dk, dv, scale * LOG2E, scale, *strides,
                                                   H, N, M, D, BLOCK_M=bm, BLOCK_N=bn, D0=d0, D1=d1, **extra)
    _bwd_dq_kernel[(triton.cdiv(N, bm), B * H)](q, k, v, do, lse, delta, dq, scale * LOG2E, scale, *strides,
                                                 H, N, M, D, BLOCK_M=bm, BLOCK_N=bn, D0=d0, D1=d1, **extra)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# autograd.Function and the public function

class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.scale)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q (B, H, N, D), k and v (B, H, M, D); fp16/bf16 (fp32 too), any N, M,
    head dims 16..256. On CPU it runs only under TRITON_INTERPRET=1 (the tests)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"are not (B, H, N, D), (B, H, M, D), (B, H, M, D)")
    if q.shape[3] > 256:
        raise ValueError(f"flash_attention: head dim {q.shape[3]} > 256 is not supported")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: dtypes must match and be fp16, bf16 or fp32 (got {q.dtype}, {k.dtype}, {v.dtype})")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


def reference(q, k, v, scale: float | None = None):
    """The definition, in fp32: what the kernel is tested against."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * scale, dim=-1)
    return (p @ v.float()).to(q.dtype)
