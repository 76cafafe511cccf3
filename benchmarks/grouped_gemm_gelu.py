"""The Triton grouped GEMM with a GELU epilogue (megatron_bigmac/moe/fused_mlp.py), one kernel per
tile config, against torch._grouped_mm (CUTLASS) followed by the separate GELU pass it replaces,
at the small BigMac and Vanilla expert shapes per layer and micro-batch (triton.testing.do_bench).

    python benchmarks/grouped_gemm_gelu.py > benchmarks/results/train_mfu/h100_grouped_gemm_gelu.txt
"""
# Kernel-level: fused grouped GEMM + GELU epilogue per tile config vs CUTLASS _grouped_mm + GELU pass.
import torch, triton, itertools, sys
import torch.nn.functional as F
from triton.testing import do_bench
from megatron_bigmac.moe import fused_mlp as fm
torch.manual_seed(0)
SH = {"bigmac": (262144, 192, 768, 64), "vanilla": (65536, 768, 3072, 4)}
for name in sys.argv[1:] or list(SH):
    M, d, f, E = SH[name]
    picks = torch.randint(0, E, (M,), device="cuda")
    counts = torch.bincount(picks, minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    x = torch.randn(M, d, device="cuda").bfloat16()
    w1 = (torch.randn(E, f, d, device="cuda") * d**-0.5).bfloat16()
    w2 = (torch.randn(E, d, f, device="cuda") * f**-0.5).bfloat16()
    dy = torch.randn(M, d, device="cuda").bfloat16()
    pre = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
    t_fc1 = do_bench(lambda: torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends))
    t_gelu = do_bench(lambda: F.gelu(pre))
    t_dg = do_bench(lambda: torch._grouped_mm(dy, w2, offs=ends))
    dact = torch._grouped_mm(dy, w2, offs=ends)
    t_gb = do_bench(lambda: torch.ops.aten.gelu_backward(dact, pre))
    t_copy = do_bench(lambda: pre.clone())
    print(f"{name}: cutlass fc1 {t_fc1*1e3:.0f} us + gelu {t_gelu*1e3:.0f} = {(t_fc1+t_gelu)*1e3:.0f};  cutlass dgrad {t_dg*1e3:.0f} + gelu_bwd {t_gb*1e3:.0f} = {(t_dg+t_gb)*1e3:.0f};  clone of pre {t_copy*1e3:.0f} us", flush=True)
    res = []
    cfgs = [(bm, bn, 64, w, s) for bm in (64, 128) for bn in (64, 128, 256) for w in (4, 8) for s in (2, 3, 4)
            if not (bm * bn >= 128 * 256 and w == 4)]
    cfgs += [(256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 128, 128, 8, 2), (128, 256, 32, 8, 4)]
    for bm, bn, bk, w, s in cfgs:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        def fwd():
            return fm._grouped_gemm_gelu_kernel[(lambda m: ((triton.cdiv(M, bm) + E) * triton.cdiv(f, bn),))](
                x, w1.transpose(-2, -1), out, aux, ends, f, d, x.stride(0), x.stride(1),
                *w1.transpose(-2, -1).stride(), NUM_GROUPS=E, GROUPS_POW2=triton.next_power_of_2(E),
                EPILOGUE="gelu", num_warps=w, num_stages=s, **cfg)
        def bwd():
            return fm._grouped_gemm_gelu_kernel[(lambda m: ((triton.cdiv(M, bm) + E) * triton.cdiv(f, bn),))](
                dy, w2, out, pre, ends, f, d, dy.stride(0), dy.stride(1), *w2.stride(),
                NUM_GROUPS=E, GROUPS_POW2=triton.next_power_of_2(E),
                EPILOGUE="gelu_grad", num_warps=w, num_stages=s, **cfg)
        out = torch.empty_like(pre); aux = torch.empty_like(pre)
        try:
            tf = do_bench(fwd, warmup=5, rep=20); tb = do_bench(bwd, warmup=5, rep=20)
        except Exception as e:
            print("cfg", bm, bn, bk, w, s, "failed", str(e)[:80]); continue
        res.append((tf, tb, (bm, bn, bk, w, s)))
    ok_f = (out.float() - (torch.ops.aten.gelu_backward(dact, pre)).float()).abs().max().item()
    for tf, tb, c in sorted(res)[:6]:
        print(f"  fwd {tf*1e3:5.0f} us  bwd {tb*1e3:5.0f} us  {c}")
    print("  best bwd:", [(round(tb*1e3), c) for tf, tb, c in sorted(res, key=lambda r: r[1])[:6]], "maxdiff", ok_f, flush=True)
