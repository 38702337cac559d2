"""Fused attention for the UNet's self- and cross-attention, forward and backward, in Triton.

FlashAttention-2 (Dao 2023): each program owns a block of queries, streams the keys/values past them
with an online softmax, and never writes the (N × M) score matrix; it saves only the log-sum-exp per
query, from which the backward recomputes the probabilities block by block.

Written for SD's shapes:
- head dims 40 / 80 / 160 (SD 1.x) are not powers of two. `tl.dot` needs power-of-two tiles, and padding
  to 64 / 128 / 256 wastes 37% of every matmul. We split the head dim into two power-of-two column
  chunks, 40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32, and do two dots per product: 0% waste at 80 and
  160, 17% at 40 (SD 2.x's 64 needs one chunk).
- cross-attention has 77 keys: the key block is widened to hold all of them, so the loop runs once; and
  in the backward, one key block per head is too few programs to fill a GPU, so the dK/dV pass also
  splits the queries into chunks and sums the partial results.
- the head dim is a compile-time constant and every offset carries an alignment promise, so rows are
  read as 16-byte vectors and the loads pipeline (cp.async) — which triton cannot prove on its own
  for a head stride of 40 elements. `python -m minidream.kernels.compile_check` shows what ptxas made of it.

File order: kernels → launch plans → custom ops (forward, backward) → public function. The tests hold it to the
definition, `minidream.models.attention.math_attention`.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Kernels. Every tensor is (B, H, N, D) with the last dim contiguous; the head dim is read as a chunk
# of D0 columns plus, when D1 > 0, a chunk of D1 columns starting at D0 (masked past D).

@triton.jit
def _head(ptr, b, h, stride_b, stride_h, ALIGN: tl.constexpr):
    """The (b, h) slice of a (B, H, ·, D) tensor. ALIGN = 8 promises that every offset is a multiple of 8
    elements (16 bytes in bf16): triton cannot see that 40 or 320 are, and without the promise it loads
    each element alone instead of 16-byte vectors (and cannot pipeline the loads)."""
    return ptr + tl.multiple_of(b * stride_b + h * stride_h, ALIGN)


@triton.jit
def _load_tile(ptr, rows, row_stride, n_rows, cols, D, ALIGN: tl.constexpr):
    # the promise goes on the product: a hint on a kernel argument itself is dropped (it has no defining op)
    row_offsets = tl.multiple_of(rows[:, None] * row_stride, [ALIGN, ALIGN])
    return tl.load(ptr + row_offsets + cols[None, :], mask=(rows[:, None] < n_rows) & (cols[None, :] < D), other=0.0)


@triton.jit
def _store_tile(ptr, rows, row_stride, n_rows, cols, D, value, ALIGN: tl.constexpr):
    row_offsets = tl.multiple_of(rows[:, None] * row_stride, [ALIGN, ALIGN])
    tl.store(ptr + row_offsets + cols[None, :], value, mask=(rows[:, None] < n_rows) & (cols[None, :] < D))


# A head-dim tile is a pair (the D0 columns, the D1 columns). When D1 == 0 the second is the first again, never
# read: `if D1 > 0` is decided at compile time (D1 is a constexpr), so the D1 half of each helper is not even built.

@triton.jit
def _load_pair(ptr, rows, row_stride, n_rows, D, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr):
    t0 = _load_tile(ptr, rows, row_stride, n_rows, tl.arange(0, D0), D, ALIGN)
    t1 = t0
    if D1 > 0:
        t1 = _load_tile(ptr, rows, row_stride, n_rows, D0 + tl.arange(0, D1), D, ALIGN)
    return t0, t1


@triton.jit
def _store_pair(ptr, rows, row_stride, n_rows, D, x0, x1, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr):
    """The fp32 accumulators (x0, x1), cast to the tensor's type and written."""
    _store_tile(ptr, rows, row_stride, n_rows, tl.arange(0, D0), D, x0.to(ptr.dtype.element_ty), ALIGN)
    if D1 > 0:
        _store_tile(ptr, rows, row_stride, n_rows, D0 + tl.arange(0, D1), D, x1.to(ptr.dtype.element_ty), ALIGN)


@triton.jit
def _zeros_pair(ROWS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """fp32 accumulators of a pair."""
    z0 = tl.zeros([ROWS, D0], dtype=tl.float32)
    z1 = z0
    if D1 > 0:
        z1 = tl.zeros([ROWS, D1], dtype=tl.float32)
    return z0, z1


@triton.jit
def _dot_t(a0, a1, b0, b1, D1: tl.constexpr):
    """a bᵀ over the whole head dim: the sum of the two chunks' products, (rows of a, rows of b)."""
    s = tl.dot(a0, tl.trans(b0))
    if D1 > 0:
        s += tl.dot(a1, tl.trans(b1))
    return s


@triton.jit
def _rescale(acc0, acc1, alpha, D1: tl.constexpr):
    """acc · alpha per row (the online softmax's correction). With D1 == 0 the second accumulator is passed through
    untouched, so the compiler drops it from the loop rather than carrying a dead copy."""
    acc0 = acc0 * alpha[:, None]
    if D1 > 0:
        acc1 = acc1 * alpha[:, None]
    return acc0, acc1


@triton.jit
def _add_dot(acc0, acc1, p, b0, b1, D1: tl.constexpr):
    """acc + p b for each chunk of b (p cast to b's type: the tensor cores' inputs)."""
    acc0 += tl.dot(p.to(b0.dtype), b0)
    if D1 > 0:
        acc1 += tl.dot(p.to(b1.dtype), b1)
    return acc0, acc1


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N_Q, N_KV, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q = _head(Q, b, h, sqb, sqh, ALIGN)
    K = _head(K, b, h, skb, skh, ALIGN)
    V = _head(V, b, h, svb, svh, ALIGN)
    O = _head(O, b, h, sob, soh, ALIGN)  # written in the layout the caller allocated (the UNet's: (B, N, H·D))
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_pair(Q, rows, sqn, N_Q, D, D0, D1, ALIGN)
    acc0, acc1 = _zeros_pair(BLOCK_M, D0, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - max)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k0, k1 = _load_pair(K, cols, skn, N_KV, D, D0, D1, ALIGN)
        s = _dot_t(q0, q1, k0, k1, D1)
        s = tl.where(cols[None, :] < N_KV, s * qk_scale, float("-inf"))
        # online softmax: rescale what was accumulated under the old max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1 = _load_pair(V, cols, svn, N_KV, D, D0, D1, ALIGN)
        acc0, acc1 = _rescale(acc0, acc1, alpha, D1)
        acc0, acc1 = _add_dot(acc0, acc1, p, v0, v1, D1)
        m_i = m_new
    _store_pair(O, rows, son, N_Q, D, acc0 / l_i[:, None], acc1 / l_i[:, None], D0, D1, ALIGN)
    tl.store(LSE + bh * N_Q + rows, m_i + tl.math.log2(l_i), mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     s_split, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     H, N_Q, N_KV, Q_CHUNK, D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                     ALIGN: tl.constexpr):
    """One block of keys/values; loop over one chunk of the queries. dV = Pᵀ dO, dK = scale · dSᵀ Q,
    dS = P ∘ (dP − Δ). With few keys (cross-attention: 77, one block) the key blocks alone are too few
    programs to fill the GPU, so the queries are split into chunks (program_id 2) whose partial dK/dV
    land in separate fp32 slices that the caller sums; with many keys there is one chunk."""
    pid_n, bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    Q = _head(Q, b, h, sqb, sqh, ALIGN)
    K = _head(K, b, h, skb, skh, ALIGN)
    V = _head(V, b, h, svb, svh, ALIGN)
    DO = _head(DO, b, h, sdb, sdh, ALIGN)
    # dK/dV in k's and v's layout, or this chunk's slice of the (chunks, B, H, M, D) partial sums
    DK = _head(DK + split * s_split, b, h, sdkb, sdkh, ALIGN)
    DV = _head(DV + split * s_split, b, h, sdvb, sdvh, ALIGN)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0, k1 = _load_pair(K, cols, skn, N_KV, D, D0, D1, ALIGN)
    v0, v1 = _load_pair(V, cols, svn, N_KV, D, D0, D1, ALIGN)
    dk0, dk1 = _zeros_pair(BLOCK_N, D0, D1)
    dv0, dv1 = _zeros_pair(BLOCK_N, D0, D1)
    q_start = split * Q_CHUNK
    for start in range(q_start, tl.minimum(q_start + Q_CHUNK, N_Q), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0, q1 = _load_pair(Q, rows, sqn, N_Q, D, D0, D1, ALIGN)
        do0, do1 = _load_pair(DO, rows, sdn, N_Q, D, D0, D1, ALIGN)
        sT = _dot_t(k0, k1, q0, q1, D1)  # (BLOCK_N, BLOCK_M): scores, transposed
        dpT = _dot_t(v0, v1, do0, do1, D1)
        lse = tl.load(LSE + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(rows[None, :] < N_Q, pT, 0.0)  # padding queries contribute nothing
        dsT = pT * (dpT - delta[None, :])
        dv0, dv1 = _add_dot(dv0, dv1, pT, do0, do1, D1)
        dk0, dk1 = _add_dot(dk0, dk1, dsT, q0, q1, D1)
    _store_pair(DV, cols, sdvn, N_KV, D, dv0, dv1, D0, D1, ALIGN)
    _store_pair(DK, cols, sdkn, N_KV, D, dk0 * sm_scale, dk1 * sm_scale, D0, D1, ALIGN)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sdqb, sdqh, sdqn,
                   H, N_Q, N_KV, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   ALIGN: tl.constexpr):
    """One block of queries; loop over all keys. dQ = scale · dS K. A separate pass, so no atomics."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q = _head(Q, b, h, sqb, sqh, ALIGN)
    K = _head(K, b, h, skb, skh, ALIGN)
    V = _head(V, b, h, svb, svh, ALIGN)
    DO = _head(DO, b, h, sdb, sdh, ALIGN)
    DQ = _head(DQ, b, h, sdqb, sdqh, ALIGN)  # dQ in q's layout
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_pair(Q, rows, sqn, N_Q, D, D0, D1, ALIGN)
    do0, do1 = _load_pair(DO, rows, sdn, N_Q, D, D0, D1, ALIGN)
    dq0, dq1 = _zeros_pair(BLOCK_M, D0, D1)
    lse = tl.load(LSE + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k0, k1 = _load_pair(K, cols, skn, N_KV, D, D0, D1, ALIGN)
        v0, v1 = _load_pair(V, cols, svn, N_KV, D, D0, D1, ALIGN)
        s = _dot_t(q0, q1, k0, k1, D1)
        dp = _dot_t(do0, do1, v0, v1, D1)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(cols[None, :] < N_KV, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq0, dq1 = _add_dot(dq0, dq1, ds, k0, k1, D1)
    _store_pair(DQ, rows, sdqn, N_Q, D, dq0 * sm_scale, dq1 * sm_scale, D0, D1, ALIGN)


# ---------------------------------------------------------------------------------------------
# Launch configuration. A *plan* is everything one launch needs: (kernel, grid, args, constexprs, options).
# `_forward`/`_backward` run plans; `kernels/compile_check.py` compiles the same plans for a GPU that is
# not here, so what CI checks is exactly what a GPU launches.

def head_chunks(D: int) -> tuple[int, int]:
    """Split D into two power-of-two chunks (each >= 16, what tl.dot accepts): 40 -> (32, 16),
    64 -> (64, 0), 80 -> (64, 16), 160 -> (128, 32)."""
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    return d0, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def launch_config(kernel: str, n_kv: int, D: int) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of one kernel ("fwd", "dkdv", "dq") on a GPU.

    Chosen from `python -m minidream.kernels.compile_check` so that at sm_90 nothing spills registers and shared
    memory fits, preferring large tiles; the backward follows the Triton tutorial's shapes (dK/dV: few queries ×
    many keys; dQ: many queries × few keys). Not yet tuned by timing. Measured on one H100 (2026-11-25, bf16,
    benchmarks/results/attention-NVIDIA_H100_80GB_HBM3.json), forward + backward at SD 1.5's shapes takes
    0.48–1.37 ms: 0.22–0.53× the best SDPA backend (cuDNN at most shapes), slowest against it at cross-attention
    with head dim 80 (0.96 vs 0.21 ms) — which is why `--attention auto` picks SDPA."""
    short = n_kv <= 128  # cross-attention's 77 keys: one key block, the loop body runs once
    if kernel == "fwd":
        if D <= 64:
            return (128, 128, 8, 3) if short else (128, 64, 4, 3)
        if D <= 128:
            return (128, 128, 8, 2) if short else (128, 64, 8, 3)
        return 64, 64, 4, 2
    if kernel == "dkdv":  # BLOCK_N keys stay resident while the queries stream past in blocks of BLOCK_M
        if D <= 64:
            return 32, 128, 4, 2
        if D <= 128:
            return (64, 128, 8, 2) if short else (64, 64, 8, 2)
        return 64, 64, 8, 2
    if D <= 64:  # dq: BLOCK_M queries stay resident while the keys stream past
        return (128, 128, 8, 2) if short else (128, 32, 4, 2)
    if D <= 128:
        return (64, 128, 8, 2) if short else (128, 64, 8, 2)
    return 64, 64, 4, 2


def _config(kernel, q, n_kv, D):
    """The block sizes (constexprs) and launch options of one kernel for q's device."""
    if _interpreting(q):  # small tiles keep the interpreter fast; warps/stages mean nothing there
        return dict(BLOCK_M=16, BLOCK_N=16), {}
    bm, bn, warps, stages = launch_config(kernel, n_kv, D)
    return dict(BLOCK_M=bm, BLOCK_N=bn), dict(num_warps=warps, num_stages=stages)


def _align(*tensors) -> int:
    """8 when every tensor starts 16-byte aligned and all its strides but the last are multiples of 8
    elements (true for SD's head dims 40/64/80/160 in any layout the UNet produces), else 1 (no promise)."""
    ok = all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in tensors)
    return 8 if ok else 1


def _fwd_plan(q, k, v, o, lse, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    d0, d1 = head_chunks(D)
    blocks, options = _config("fwd", q, M, D)
    args = (q, k, v, o, lse, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), H, N, M, D)
    grid = (triton.cdiv(N, blocks["BLOCK_M"]), B * H)  # a program per block of queries of each (batch, head)
    return _fwd_kernel, grid, args, dict(blocks, D0=d0, D1=d1, ALIGN=_align(q, k, v, o)), options


def query_chunks(q, M: int) -> tuple[int, int]:
    """(chunks, rows per chunk) the dK/dV pass splits the queries into: enough programs to fill a GPU
    (~512) when key blocks × heads alone are fewer, each chunk at least 4 query blocks long."""
    B, H, N, D = q.shape
    blocks, _ = _config("dkdv", q, M, D)
    bm, programs = blocks["BLOCK_M"], triton.cdiv(M, blocks["BLOCK_N"]) * B * H
    splits = max(1, min(triton.cdiv(N, 4 * bm), 512 // programs))
    chunk = triton.cdiv(triton.cdiv(N, bm), splits) * bm
    return triton.cdiv(N, chunk), chunk


def _dkdv_outputs(q, k, v):
    """Where the dK/dV pass writes: dK, dV themselves (in k's and v's layout), or (chunks, B, H, M, D) fp32
    partial sums when query_chunks splits the queries (the caller sums them)."""
    splits, _ = query_chunks(q, k.shape[2])
    if splits == 1:
        return torch.empty_like(k), torch.empty_like(v)
    return tuple(torch.empty(splits, *t.shape, device=t.device, dtype=torch.float32) for t in (k, v))


def _bwd_plans(q, k, v, do, lse, delta, dq, dk, dv, scale):
    """dk, dv: (B, H, M, D), or (chunks, B, H, M, D) fp32 partial sums when query_chunks splits the queries."""
    B, H, N, D = q.shape
    M = k.shape[2]
    d0, d1 = head_chunks(D)
    splits, chunk = query_chunks(q, M)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    align = dict(ALIGN=_align(q, k, v, do, dq, dk, dv))
    blocks, options = _config("dkdv", q, M, D)
    s_split = dk.stride(0) if dk.ndim == 5 else 0
    out_strides = (s_split, *dk.stride()[-4:-1], *dv.stride()[-4:-1])
    # dK/dV: a program per block of keys of each (batch, head) and chunk of the queries (query_chunks says how many)
    dkdv = (_bwd_dkdv_kernel, (triton.cdiv(M, blocks["BLOCK_N"]), B * H, splits),
            (q, k, v, do, lse, delta, dk, dv, scale * LOG2E, scale, *strides, *out_strides, H, N, M, chunk, D),
            dict(blocks, D0=d0, D1=d1, **align), options)
    blocks, options = _config("dq", q, M, D)
    # dQ: a program per block of queries of each (batch, head), as the forward
    dq_ = (_bwd_dq_kernel, (triton.cdiv(N, blocks["BLOCK_M"]), B * H),
           (q, k, v, do, lse, delta, dq, scale * LOG2E, scale, *strides, *dq.stride()[:3], H, N, M, D),
           dict(blocks, D0=d0, D1=d1, **align), options)
    return [dkdv, dq_]


def _launch(plan):
    kernel, grid, args, constexprs, options = plan
    kernel[grid](*args, **constexprs, **options)


def _forward(q, k, v, scale):
    B, H, N, D = q.shape
    o = _output(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _launch(_fwd_plan(q, k, v, o, lse, scale))
    return o, lse


def _output(q):
    """O, allocated (B, N, H, D) and seen as (B, H, N, D): the layout the UNet's output projection reads, so its
    `transpose(1, 2).reshape(B, N, H·D)` is a view, not a copy."""
    B, H, N, D = q.shape
    return torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)


def _backward(q, k, v, o, lse, do, scale):
    delta = (o.float() * do.float()).sum(-1)  # Δ_i = Σ_d dO_id O_id = rowsum(P ∘ dP)
    dq = torch.empty_like(q)  # gradients in their inputs' layout: the projections' backward needs no copy
    dk, dv = _dkdv_outputs(q, k, v)
    for plan in _bwd_plans(q, k, v, do, lse, delta, dq, dk, dv, scale):
        _launch(plan)
    if dk.ndim == 5:  # partial sums, one slice per query chunk
        dk, dv = torch.empty_like(k).copy_(dk.sum(0)), torch.empty_like(v).copy_(dv.sum(0))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The custom ops and the public function. As torch.library ops (not an autograd.Function), torch.compile traces
# *through* the attention: each op is one opaque node whose output shapes the fake implementations give, and the
# backward is an op too, so the compiled backward graph calls the Triton kernels directly.

@torch.library.custom_op("minidream::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(O, log-sum-exp per query in log2 units) for q (B, H, N, D), k, v (B, H, M, D)."""
    return _forward(q, k, v, scale)


@flash_attention_op.register_fake
def _(q, k, v, scale):
    B, H, N, D = q.shape
    return _output(q), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("minidream::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                lse: torch.Tensor, do: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                            torch.Tensor]:
    """(dQ, dK, dV), each in its input's layout."""
    return _backward(q, k, v, o, lse, do, scale)


@flash_attention_backward_op.register_fake
def _(q, k, v, o, lse, do, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)  # a by-product the backward reuses, not a result
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _grads(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do.stride(-1) != 1:
        do = do.contiguous()
    return (*flash_attention_backward_op(q, k, v, o, lse, do, ctx.scale), None)


flash_attention_op.register_autograd(_grads, setup_context=_save)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q (B, H, N, D), k and v (B, H, M, D); fp16/bf16 (fp32 too), any N, M,
    head dims 16..256, any strides with the head dim contiguous (the UNet's per-head views of its projections are
    read in place). On CPU it runs only under TRITON_INTERPRET=1 (the tests)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"are not (B, H, N, D), (B, H, M, D), (B, H, M, D)")
    if q.shape[3] > 256:
        raise ValueError(f"flash_attention: head dim {q.shape[3]} > 256 is not supported")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: dtypes must match and be fp16, bf16 or fp32 (got {q.dtype}, {k.dtype}, "
                         f"{v.dtype})")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return flash_attention_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))[0]
