"""Where a Triton grouped GEMM's time goes at small BigMac's first expert GEMM (262 k rows, K = 192,
N = 768, 64 experts, bf16): the one-program-per-tile kernel of the GELU-epilogue attempt (aeae421,
without its column mask, N being a multiple of the tile here) with six epilogues, per tile config and tile order, against torch._grouped_mm (CUTLASS), the GELU
passes and a plain copy (triton.testing.do_bench, µs). Epilogues: the product only; two stores, no
GELU; pre and gelu(pre); gelu(pre) only; the backward (dy @ W2) * gelu'(pre); the backward's load
of pre without the GELU maths. The 192-wide tile fails to compile (Triton blocks are powers of two).

    python benchmarks/triton_grouped_gemm_epilogues.py > benchmarks/results/train_mfu/h100_triton_grouped_gemm_epilogues.txt
"""
# Where the fused kernel's time goes: the one-program-per-tile grouped GEMM with different epilogues.
import torch, triton, sys
import triton.language as tl
import torch.nn.functional as F
from triton.testing import do_bench

SQ = tl.constexpr(0.7071067811865476); IS = tl.constexpr(0.3989422804014327)

@triton.jit
def kern(a_ptr, b_ptr, out_ptr, aux_ptr, ends_ptr, N: tl.constexpr, K: tl.constexpr,
         sam, sak, sbe, sbk, sbn, NUM_GROUPS: tl.constexpr, GP2: tl.constexpr, EPI: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_ORDER: tl.constexpr):
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    if GROUP_ORDER:
        tile_m = pid // num_n
        tile_n = pid % num_n
    else:
        tile_m = pid % (tl.num_programs(0) // num_n)
        tile_n = pid // (tl.num_programs(0) // num_n)
    groups = tl.arange(0, GP2)
    ends = tl.load(ends_ptr + groups, mask=groups < NUM_GROUPS, other=0)
    starts = tl.load(ends_ptr + groups - 1, mask=(groups > 0) & (groups < NUM_GROUPS), other=0)
    gt = tl.where(groups < NUM_GROUPS, tl.cdiv(ends - starts, BLOCK_M), 0)
    thr = tl.cumsum(gt, 0)
    group = tl.sum((thr <= tile_m).to(tl.int32), 0)
    if group >= NUM_GROUPS:
        return
    isg = groups == group
    first = tl.sum(tl.where(isg, thr - gt, 0), 0)
    row_start = tl.sum(tl.where(isg, starts, 0), 0) + (tile_m - first) * BLOCK_M
    row_end = tl.sum(tl.where(isg, ends, 0), 0)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * sam + ks[None, :] * sak
    b_ptrs = b_ptr + group.to(tl.int64) * sbe + ks[:, None] * sbk + cols[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.static_range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    ok = row_ok[:, None]
    if EPI == 0:    # the product only
        tl.store(out_ptr + offs, acc.to(tl.bfloat16), mask=ok)
    elif EPI == 1:  # two stores, no GELU
        tl.store(out_ptr + offs, acc.to(tl.bfloat16), mask=ok)
        tl.store(aux_ptr + offs, (acc * 0.5).to(tl.bfloat16), mask=ok)
    elif EPI == 2:  # gelu (erf): pre and act
        tl.store(out_ptr + offs, acc.to(tl.bfloat16), mask=ok)
        tl.store(aux_ptr + offs, (0.5 * acc * (1.0 + tl.math.erf(acc * SQ))).to(tl.bfloat16), mask=ok)
    elif EPI == 3:  # act only (erf)
        tl.store(aux_ptr + offs, (0.5 * acc * (1.0 + tl.math.erf(acc * SQ))).to(tl.bfloat16), mask=ok)
    elif EPI == 4:  # gelu backward
        p = tl.load(aux_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        d = 0.5 * (1.0 + tl.math.erf(p * SQ)) + p * IS * tl.exp(-0.5 * p * p)
        tl.store(out_ptr + offs, (acc * d).to(tl.bfloat16), mask=ok)
    else:           # backward's load of pre, no maths
        p = tl.load(aux_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (acc * p).to(tl.bfloat16), mask=ok)

torch.manual_seed(0)
M, d, f, E = 262144, 192, 768, 64
counts = torch.bincount(torch.randint(0, E, (M,), device="cuda"), minlength=E)
ends = counts.cumsum(0).to(torch.int32)
x = torch.randn(M, d, device="cuda").bfloat16()
w1 = (torch.randn(E, f, d, device="cuda") * d**-0.5).bfloat16()
w2 = (torch.randn(E, d, f, device="cuda") * f**-0.5).bfloat16()
dy = torch.randn(M, d, device="cuda").bfloat16()
pre = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
dact = torch._grouped_mm(dy, w2, offs=ends)
out = torch.empty_like(pre); aux = torch.empty_like(pre)
print(f"cutlass fc1 {do_bench(lambda: torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends))*1e3:.0f} us, gelu {do_bench(lambda: F.gelu(pre))*1e3:.0f}, "
      f"dgrad {do_bench(lambda: torch._grouped_mm(dy, w2, offs=ends))*1e3:.0f}, gelu_bwd {do_bench(lambda: torch.ops.aten.gelu_backward(dact, pre))*1e3:.0f}, "
      f"clone {do_bench(lambda: pre.clone())*1e3:.0f}, 2 clones {do_bench(lambda: (pre.clone(), pre.clone()))*1e3:.0f}", flush=True)
w1t = w1.transpose(-2, -1)
for cfg in [(64, 64, 64, 4, 2), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3), (64, 192, 64, 4, 3)]:
    bm, bn, bk, w, s = cfg
    if f % bn:
        continue
    line = []
    for order in (1, 0):
        grid = ((triton.cdiv(M, bm) + E) * (f // bn),)
        for epi in range(6):
            fwd = epi < 4
            a, b, aux_ = (x, w1t, aux) if fwd else (dy, w2, pre)
            run = lambda: kern[grid](a, b, out, aux_, ends, f, d, a.stride(0), a.stride(1), *b.stride(), E, 64, epi,
                                     bm, bn, bk, order, num_warps=w, num_stages=s)
            try:
                line.append(f"{do_bench(run, warmup=5, rep=25)*1e3:4.0f}")
            except Exception as e:
                line.append("fail"); print(str(e)[:200])
    print(cfg, "tile-major [plain, 2 stores, gelu, act only, gelu_bwd, bwd load only]:", line[:6], " n-major:", line[6:], flush=True)
run = lambda: kern[((triton.cdiv(M, 64) + E) * (f // 64),)](x, w1t, out, aux, ends, f, d, x.stride(0), x.stride(1), *w1t.stride(), E, 64, 2, 64, 64, 64, 1, num_warps=4, num_stages=2)
run(); print("fwd check", (out.float() - pre.float()).abs().max().item(), (aux.float() - F.gelu(pre.float())).abs().max().item())
