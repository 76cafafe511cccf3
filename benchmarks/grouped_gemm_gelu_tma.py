"""A persistent variant of the grouped GEMM with GELU epilogues (inductor's grouped-mm template
layout: one program per SM, TMA loads), per tile config, against torch._grouped_mm (CUTLASS) and the
separate GELU pass: "plain" stores the product only, "gelu-fwd" stores pre and gelu(pre),
"gelu-bwd" stores (dy @ W2) * gelu'(pre).

    python benchmarks/grouped_gemm_gelu_tma.py > benchmarks/results/train_mfu/h100_grouped_gemm_gelu_tma.txt
"""
# Persistent TMA grouped GEMM with GELU epilogues (inductor-template style) vs CUTLASS + GELU pass.
import torch, triton, itertools, sys
import triton.language as tl
import torch.nn.functional as F
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

SQ = tl.constexpr(0.7071067811865476); IS = tl.constexpr(0.3989422804014327)

@triton.jit
def kern(a_desc, b_desc, out_ptr, aux_ptr, ends_ptr, N: tl.constexpr, K: tl.constexpr,
         B_ROWS: tl.constexpr, NUM_GROUPS: tl.constexpr, EPI: tl.constexpr, B_K_MAJOR: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_SMS: tl.constexpr):
    tidx = tl.program_id(0)
    iterated = 0
    m_end = 0
    num_n = tl.cdiv(N, BLOCK_N)
    for g in tl.range(NUM_GROUPS):
        m_start = m_end
        m_end = tl.load(ends_ptr + g)
        num_m = tl.cdiv(m_end - m_start, BLOCK_M)
        num_tiles = num_m * num_n
        while tidx >= iterated and tidx < iterated + num_tiles:
            gidx = tidx - iterated
            tile_m = gidx % num_m
            tile_n = gidx // num_m
            m0 = (m_start + tile_m * BLOCK_M).to(tl.int32)
            n0 = tile_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in tl.static_range(0, K, BLOCK_K):
                a = a_desc.load([m0, k])
                if B_K_MAJOR:
                    b = b_desc.load([g * B_ROWS + n0, k])
                    acc = tl.dot(a, b.T, acc)
                else:
                    b = b_desc.load([g * B_ROWS + k, n0])
                    acc = tl.dot(a, b, acc)
            rows = m0 + tl.arange(0, BLOCK_M)
            cols = n0 + tl.arange(0, BLOCK_N)
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            ok = (rows < m_end)[:, None] & (cols < N)[None, :]
            if EPI == 0:
                tl.store(out_ptr + offs, acc.to(tl.bfloat16), mask=ok)
            elif EPI == 1:
                tl.store(out_ptr + offs, acc.to(tl.bfloat16), mask=ok)
                tl.store(aux_ptr + offs, (0.5 * acc * (1.0 + tl.math.erf(acc * SQ))).to(tl.bfloat16), mask=ok)
            else:
                p = tl.load(aux_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                d = 0.5 * (1.0 + tl.math.erf(p * SQ)) + p * IS * tl.exp(-0.5 * p * p)
                tl.store(out_ptr + offs, (acc * d).to(tl.bfloat16), mask=ok)
            tidx += NUM_SMS
        iterated += num_tiles

NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
def launch(a, b2d, b_rows, b_k_major, out, aux, ends, N, K, E, epi, bm, bn, bk, w, s):
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b2d, [bn, bk] if b_k_major else [bk, bn])
    kern[(NUM_SMS,)](a_desc, b_desc, out, aux, ends, N, K, b_rows, E, epi, b_k_major, bm, bn, bk, NUM_SMS,
                     num_warps=w, num_stages=s)

torch.manual_seed(0)
SH = {"bigmac": (262144, 192, 768, 64), "vanilla": (65536, 768, 3072, 4)}
for name in sys.argv[1:] or list(SH):
    M, d, f, E = SH[name]
    counts = torch.bincount(torch.randint(0, E, (M,), device="cuda"), minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    x = torch.randn(M, d, device="cuda").bfloat16()
    w1 = (torch.randn(E, f, d, device="cuda") * d**-0.5).bfloat16()
    w2 = (torch.randn(E, d, f, device="cuda") * f**-0.5).bfloat16()
    dy = torch.randn(M, d, device="cuda").bfloat16()
    pre = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
    dact = torch._grouped_mm(dy, w2, offs=ends)
    t_fc1 = do_bench(lambda: torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends))
    t_gelu = do_bench(lambda: F.gelu(pre))
    t_dg = do_bench(lambda: torch._grouped_mm(dy, w2, offs=ends))
    t_gb = do_bench(lambda: torch.ops.aten.gelu_backward(dact, pre))
    print(f"{name}: cutlass fc1 {t_fc1*1e3:.0f} us + gelu {t_gelu*1e3:.0f} = {(t_fc1+t_gelu)*1e3:.0f};  cutlass dgrad {t_dg*1e3:.0f} + gelu_bwd {t_gb*1e3:.0f} = {(t_dg+t_gb)*1e3:.0f}", flush=True)
    out = torch.empty_like(pre); aux = torch.empty_like(pre)
    res = []
    for bm, bn, w, s in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)):
        if bm * bn >= 128 * 256 and w == 4:
            continue
        bk = 64
        try:
            f0 = lambda: launch(x, w1.view(E * f, d), f, True, out, aux, ends, f, d, E, 0, bm, bn, bk, w, s)
            f1 = lambda: launch(x, w1.view(E * f, d), f, True, out, aux, ends, f, d, E, 1, bm, bn, bk, w, s)
            f2 = lambda: launch(dy, w2.view(E * d, f), d, False, out, pre, ends, f, d, E, 2, bm, bn, bk, w, s)
            t0 = do_bench(f0, warmup=5, rep=20); f0(); e0 = (out.float() - pre.float()).abs().max().item()
            t1 = do_bench(f1, warmup=5, rep=20); f1(); e1 = (aux.float() - F.gelu(pre).float()).abs().max().item()
            t2 = do_bench(f2, warmup=5, rep=20); f2(); e2 = (out.float() - torch.ops.aten.gelu_backward(dact, pre).float()).abs().max().item()
        except Exception as e:
            print("cfg", bm, bn, w, s, "failed", str(e)[:200], flush=True); continue
        res.append((t1 + t2, t0, t1, t2, (bm, bn, bk, w, s), (e0, e1, e2)))
    for tot, t0, t1, t2, c, e in sorted(res)[:8]:
        print(f"  plain {t0*1e3:4.0f} us  gelu-fwd {t1*1e3:4.0f} us  gelu-bwd {t2*1e3:4.0f} us  {c}  maxerr {e[0]:.2g} {e[1]:.2g} {e[2]:.2g}", flush=True)
    print("  best plain:", sorted((round(r[1]*1e3), r[4]) for r in res)[:3], "best fwd:", sorted((round(r[2]*1e3), r[4]) for r in res)[:3], "best bwd:", sorted((round(r[3]*1e3), r[4]) for r in res)[:3], flush=True)
