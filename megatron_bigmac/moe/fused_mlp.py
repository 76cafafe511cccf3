"""The experts' GELU inside their grouped GEMMs: a Triton grouped GEMM with a GELU epilogue.

An expert MLP ``y = gelu(x @ W1^T) @ W2^T`` as torch ops is three passes over the [T*k, h_f]
hidden rows besides the GEMMs: GELU forward (read ``pre``, write ``act``) and GELU backward
(read ``d_act`` and ``pre``, write ``d_pre``). On an H100 at small BigMac's shape (262 k rows,
192 -> 768 -> 192) those passes take 0.28 + 0.40 ms per layer and micro-batch at HBM bandwidth,
more than the GEMMs next to them (0.24 and 0.21 ms). Here the GELU is the epilogue of the two
GEMMs that produce the hidden rows:

    forward   fc1:        pre = x @ W1_e^T,  act = gelu(pre)         (both written; pre for backward)
    backward  fc2 dgrad:  d_pre = (dy @ W2_e) * gelu'(pre)           (d_act never written)

The other four GEMMs (fc2 forward, both weight gradients, fc1's input gradient) stay on
``torch._grouped_mm`` (CUTLASS), which is faster than Triton at these shapes.

Rows are grouped by expert, as the dispatcher sorts them; the group boundaries stay on the device
(no host sync, CUDA-graph safe): the grid is sized for the worst case, ``cdiv(rows, BLOCK_M) +
groups`` row tiles, and each program finds its group from the offsets.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the experts use torch ops
    triton = None


def fused_gelu_mlp_supported(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor) -> bool:
    """Hopper (or newer) bf16, shapes the kernel and ``_grouped_mm`` take (16-byte rows)."""
    if triton is None or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9 or not hasattr(torch, "_grouped_mm"):
        return False
    return all(n % 8 == 0 for n in (*weight1.shape[-2:], *weight2.shape[-2:]))


if triton is not None:
    _SQRT_HALF = tl.constexpr(0.7071067811865476)
    _INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT_HALF))

    @triton.jit
    def _gelu_grad(x):
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))
        return cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)

    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 128, 4, 3),
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (64, 256, 4, 3),
            (256, 128, 8, 3),
            (64, 128, 4, 4),
        ]
    ]

    @triton.jit
    def _grouped_gemm_gelu_kernel(
        a_ptr, b_ptr, out_ptr, aux_ptr, ends_ptr,
        N, K: tl.constexpr,
        stride_am, stride_ak,
        stride_be, stride_bk, stride_bn,
        NUM_GROUPS: tl.constexpr,
        GROUPS_POW2: tl.constexpr,
        EPILOGUE: tl.constexpr,  # "gelu": out = acc, aux = gelu(acc); "gelu_grad": out = acc * gelu'(aux)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # out[rows of group g] = a[rows of group g] @ b[g]; out and aux are [rows, N] contiguous.
        num_n_tiles = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        tile_m = pid // num_n_tiles
        tile_n = pid % num_n_tiles

        # Which group this row tile belongs to: tiles are laid out group after group.
        groups = tl.arange(0, GROUPS_POW2)
        ends = tl.load(ends_ptr + groups, mask=groups < NUM_GROUPS, other=0)
        starts = tl.load(ends_ptr + groups - 1, mask=(groups > 0) & (groups < NUM_GROUPS), other=0)
        group_tiles = tl.where(groups < NUM_GROUPS, tl.cdiv(ends - starts, BLOCK_M), 0)
        tiles_through = tl.cumsum(group_tiles, 0)
        group = tl.sum((tiles_through <= tile_m).to(tl.int32), 0)
        if group >= NUM_GROUPS:
            return  # the worst-case grid's spare tiles
        is_group = groups == group
        first_tile = tl.sum(tl.where(is_group, tiles_through - group_tiles, 0), 0)
        row_start = tl.sum(tl.where(is_group, starts, 0), 0) + (tile_m - first_tile) * BLOCK_M
        row_end = tl.sum(tl.where(is_group, ends, 0), 0)

        rows = row_start + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        col_ok = cols < N
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + group.to(tl.int64) * stride_be + ks[:, None] * stride_bk \
            + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = ks < K - k
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if EPILOGUE == "gelu":
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(aux_ptr + offsets, _gelu(acc).to(aux_ptr.dtype.element_ty), mask=ok)
        else:
            pre = tl.load(aux_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, (acc * _gelu_grad(pre)).to(out_ptr.dtype.element_ty),
                     mask=ok)

    # Tuned per (N, K) on first use, before any CUDA-graph capture (the warm-up steps are eager).
    _autotuned_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "EPILOGUE"])(
        _grouped_gemm_gelu_kernel)


def grouped_gemm_gelu(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, epilogue: str,
                      aux: torch.Tensor | None = None, block: tuple | None = None):
    """``a @ b[g]`` for the rows of each group g, with a GELU epilogue.

    a: [rows, K] (rows grouped, ``ends`` = int32 cumulative row counts per group); b: [groups,
    K, N], any strides. epilogue "gelu" returns (pre, gelu(pre)); "gelu_grad" returns
    ``(a @ b[g]) * gelu'(aux)`` for aux = pre, [rows, N]. ``block``: a fixed (BLOCK_M, BLOCK_N,
    BLOCK_K) instead of the autotuned tiles (tests under ``TRITON_INTERPRET=1``, benchmarks).
    """
    rows, k = a.shape
    groups, _, n = b.shape
    out = torch.empty(rows, n, device=a.device, dtype=a.dtype)
    if epilogue == "gelu":
        aux = torch.empty_like(out)
    else:
        assert aux is not None and aux.shape == out.shape and aux.is_contiguous()
    if rows == 0:
        return (out, aux) if epilogue == "gelu" else out

    def grid(meta):
        row_tiles = triton.cdiv(rows, meta["BLOCK_M"]) + groups
        return (row_tiles * triton.cdiv(n, meta["BLOCK_N"]),)

    if block is None:
        kernel, tiles = _autotuned_kernel, {}
    else:
        kernel, tiles = _grouped_gemm_gelu_kernel, dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), block))
    kernel[grid](
        a, b, out, aux, ends,
        n, k,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        NUM_GROUPS=groups,
        GROUPS_POW2=triton.next_power_of_2(groups),
        EPILOGUE=epilogue,
        **tiles,
    )
    return (out, aux) if epilogue == "gelu" else out


class GroupedGeluMLP(torch.autograd.Function):
    """``y = gelu(x @ W1_g^T) @ W2_g^T`` for the rows of each expert g.

    x: [rows, d] bf16, grouped by expert; weight1: [experts, f, d]; weight2: [experts, d, f];
    ends: int32 cumulative rows per expert; block: see ``grouped_gemm_gelu``. Saves x, pre and
    act, as the unfused ops do.
    """

    @staticmethod
    def forward(ctx, x, weight1, weight2, ends, block=None):
        pre, act = grouped_gemm_gelu(x, weight1.transpose(-2, -1), ends, "gelu", block=block)
        ctx.block = block
        y = torch._grouped_mm(act, weight2.transpose(-2, -1), offs=ends)
        ctx.save_for_backward(x, weight1, weight2, ends, pre, act)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight1, weight2, ends, pre, act = ctx.saved_tensors
        dy = dy.contiguous()
        d_pre = grouped_gemm_gelu(dy, weight2, ends, "gelu_grad", aux=pre, block=ctx.block)
        dx = torch._grouped_mm(d_pre, weight1, offs=ends)
        d_weight1 = torch._grouped_mm(d_pre.t(), x, offs=ends)
        d_weight2 = torch._grouped_mm(dy.t(), act, offs=ends)
        return dx, d_weight1, d_weight2, None, None
