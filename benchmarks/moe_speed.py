"""BigMac vs Fine-Grained vs stock megatron-core vs Vanilla: training and inference speed, side by side.

    torchrun --nproc_per_node 2 benchmarks/moe_speed.py --hidden 1024 --topk 8 --out results.json
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 torchrun ...     # communication-bound (NCCL over sockets)

All variants are built in ONE process group with the same GPT shape (default: 4 layers, 64
experts, seq 2048, r = 0.25, bf16, EP = world size) and timed interleaved, round by round, after
warm-up:

    stock         megatron-core's own TE-free local spec (SequentialMLP experts h -> r*h -> h,
                  unfused attention): what a megatron-core user gets without transformer-engine
    fine_grained  this project, same maths as stock (grouped-GEMM experts, SDPA attention)
    bigmac        this project, dispatch/combine at r*h
    vanilla       this project, 4 experts h -> 4h -> h, top-2 (equal MoE parameters)

A training step is forward + backward + megatron-core DDP gradient reduction + the megatron-core
Adam step. Per variant: step time (median, p10-p90 of --steps), forward dispatch+combine and expert
time (CUDA events around MoELayer's stages), communication kernel time per step (profiler, NCCL
kernels), tokens/s, MFU, peak memory; inference: prefill throughput at prompt 128 and the time to
generate 1 and 10 tokens (greedy, no KV cache: each token re-runs the prefix) per batch size.
Results are written as JSON; numbers are only compared within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

import megatron_bigmac.config  # noqa: F401  (applies the megatron-core compat shims)
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bigmac import costs
from megatron_bigmac.config import BigMacConfig
from megatron_bigmac.specs import build_gpt_model

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
VOCAB = 50304


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=None, help="default: hidden / 64")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.25, help="r")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per step")
    p.add_argument("--variants", default="stock,fine_grained,bigmac,vanilla")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; steps split across them")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--infer-batches", default="1,8,64")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the DP gradient all-reduce with backward (off by default, as in "
                   "Megatron-LM; over sockets it contends with the All-to-All and was slower)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU")
    p.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    return p.parse_args()


# ---------------------------------------------------------------------------- models
def model_config(args, variant, dtype):
    heads = args.heads or max(1, args.hidden // 64)
    common = dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads,
        num_moe_experts=args.experts, moe_router_topk=args.topk,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-3,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, add_bias_linear=False, use_cpu_initialization=not torch.cuda.is_available(),
    )
    if variant == "stock":
        return TransformerConfig(**common, moe_ffn_hidden_size=round(args.ratio * args.hidden))
    if variant == "vanilla":
        common.update(num_moe_experts=4, moe_router_topk=2,
                      expert_model_parallel_size=min(4, common["expert_model_parallel_size"]))
        return BigMacConfig(**common, moe_structure="vanilla")
    return BigMacConfig(**common, moe_structure=variant, moe_low_rank_ratio=args.ratio)


def build(args, variant, dtype, device):
    config = model_config(args, variant, dtype)
    torch.manual_seed(1234)
    if variant == "stock":
        spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                         max_sequence_length=args.seq, position_embedding_type="learned_absolute")
    else:
        model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=args.seq)
    model = model.to(device)
    if config.bf16:
        model = Float16Module(config, model)  # as Megatron-LM: bf16 params, fp32 logits/loss
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,  # as Megatron-LM does for bf16
            overlap_grad_reduce=args.overlap_grad_reduce,
        ),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=config.bf16, params_dtype=dtype,
                        use_distributed_optimizer=False, clip_grad=1.0),
        [ddp],
    )
    return config, ddp, optimizer


def flops_per_step(args, variant, config):
    """Model FLOPs of one training step on ALL ranks (costs.py, Megatron's convention)."""
    structure = "fine_grained" if variant == "stock" else config.moe_structure
    latent = round(args.ratio * args.hidden) if structure == "bigmac" else None
    shape = costs.MoEModelShape(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=config.num_attention_heads,
        seq_length=args.seq, padded_vocab_size=VOCAB, num_experts=config.num_moe_experts,
        topk=config.moe_router_topk, structure=structure,
        expert_ffn_hidden_size=config.moe_ffn_hidden_size, latent_size=latent, linear_bias=False,
    )
    return costs.training_flops_per_iteration(shape, args.micro_batch * dist.get_world_size())


# ---------------------------------------------------------------------------- timing
class StageTimer:
    """CUDA events around MoELayer.dispatch / routed_experts_compute / combine (forward only)."""

    def __init__(self, enabled):
        self.enabled, self.pending, self.totals = enabled, [], {}
        self.originals = {}

    @contextmanager
    def installed(self):
        if not self.enabled:
            yield
            return
        for name in ("dispatch", "routed_experts_compute", "combine"):
            original = getattr(MoELayer, name)
            self.originals[name] = original

            def timed(layer, *a, _name=name, _original=original, **kw):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = _original(layer, *a, **kw)
                end.record()
                self.pending.append((_name, start, end))
                return out

            setattr(MoELayer, name, timed)
        try:
            yield
        finally:
            for name, original in self.originals.items():
                setattr(MoELayer, name, original)

    def collect(self):
        torch.cuda.synchronize()
        for name, start, end in self.pending:
            self.totals.setdefault(name, []).append(start.elapsed_time(end))
        self.pending.clear()


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(ddp, optimizer, tokens, positions):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    optimizer.step()


def comm_kernel_ms(ddp, optimizer, tokens, positions):
    """NCCL kernel time of one training step, from the profiler (GPU only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(ddp, optimizer, tokens, positions)
        synchronize()
    total = 0.0
    for event in prof.events():
        if event.device_type.name == "CUDA" and "nccl" in event.name.lower():
            total += event.device_time
    return total / 1e3


@torch.no_grad()
def inference(ddp, args, batches, device, repeats=3):
    """Prefill of a --prompt-token prompt, and greedy generation of 1 and 10 tokens (no KV cache:
    each token re-runs the whole prefix). Each timing is the median of `repeats` after one
    untimed run of the same lengths."""
    model = ddp.module
    model.eval()

    def generate(prompt, new_tokens):
        tokens = prompt
        positions = torch.arange(tokens.shape[1], device=device).expand(tokens.shape[0], -1)
        out = model(tokens, positions, None)
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, out[:, -1:].argmax(-1)], dim=1)
            positions = torch.arange(tokens.shape[1], device=device).expand(tokens.shape[0], -1)
            out = model(tokens, positions, None)

    def seconds(prompt, new_tokens):
        generate(prompt, new_tokens)
        times = []
        for _ in range(repeats):
            synchronize()
            dist.barrier()
            start = time.perf_counter()
            generate(prompt, new_tokens)
            synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    results = {}
    for batch in batches:
        prompt = torch.randint(0, VOCAB, (batch, args.prompt), device=device)
        prefill = seconds(prompt, 0)
        results[batch] = {
            "prefill_tokens_per_s": batch * args.prompt * dist.get_world_size() / prefill,
            "generate_1_s": seconds(prompt, 1),
            "generate_10_s": seconds(prompt, 10),
        }
    model.train()
    return results


# ---------------------------------------------------------------------------- main
def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(1234)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    variants = args.variants.split(",")

    built = {v: build(args, v, dtype, device) for v in variants}
    torch.manual_seed(rank)
    tokens = torch.randint(0, VOCAB, (args.micro_batch, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).expand(args.micro_batch, -1)

    step_ms = {v: [] for v in variants}
    timers = {v: StageTimer(cuda) for v in variants}
    for v in variants:  # warm-up: kernels, allocator, NCCL channels
        for _ in range(args.warmup):
            train_step(built[v][1], built[v][2], tokens, positions)
    for rnd in range(args.rounds):
        for v in variants:
            _, ddp, optimizer = built[v]
            with timers[v].installed():
                for _ in range(max(1, args.steps // args.rounds)):
                    synchronize()
                    dist.barrier()
                    start = time.perf_counter()
                    train_step(ddp, optimizer, tokens, positions)
                    synchronize()
                    step_ms[v].append((time.perf_counter() - start) * 1e3)
                if cuda:
                    timers[v].collect()
        if rank == 0:
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{v} {statistics.median(step_ms[v]):.1f} ms" for v in variants), flush=True)

    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((f for name, f in PEAK_BF16_FLOPS.items() if name in gpu), None)
    results = {}
    for v in variants:
        config, ddp, optimizer = built[v]
        times = sorted(step_ms[v])
        median = statistics.median(times)
        flops = flops_per_step(args, v, config)
        row = {
            "step_ms_median": median,
            "step_ms_p10": times[len(times) // 10],
            "step_ms_p90": times[(len(times) * 9) // 10],
            "tokens_per_s": args.micro_batch * args.seq * world / (median / 1e3),
            "model_tflops_per_gpu": flops / world / (median / 1e3) / 1e12,
        }
        if peak and dtype == torch.bfloat16:
            row["mfu"] = row["model_tflops_per_gpu"] * 1e12 / peak
        if cuda:
            n_layers = args.layers
            for stage, values in timers[v].totals.items():
                # values: one per layer per timed step; report per step
                row[f"fwd_{stage}_ms"] = sum(values) / max(1, len(values) // n_layers)
            row["comm_kernel_ms"] = comm_kernel_ms(ddp, optimizer, tokens, positions)
            torch.cuda.reset_peak_memory_stats()
            train_step(ddp, optimizer, tokens, positions)
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not args.no_inference:
            row["inference"] = inference(ddp, args, [int(b) for b in args.infer_batches.split(",")], device)
        results[v] = row

    if rank == 0:
        report = {
            "command": "torchrun --nproc_per_node {} benchmarks/moe_speed.py ".format(world)
            + " ".join(os.sys.argv[1:]),
            "device": gpu, "world_size": world, "dtype": str(dtype),
            "network": "sockets" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "default",
            "args": vars(args), "results": results,
            "ratios": {
                f"bigmac_speedup_over_{v}": results[v]["step_ms_median"] / results["bigmac"]["step_ms_median"]
                for v in variants if v != "bigmac" and "bigmac" in results
            },
        }
        if not args.no_inference and "bigmac" in results:
            largest = max(results["bigmac"]["inference"])
            report["ratios"].update({
                f"bigmac_prefill_speedup_over_{v}_batch{largest}":
                    results["bigmac"]["inference"][largest]["prefill_tokens_per_s"]
                    / results[v]["inference"][largest]["prefill_tokens_per_s"]
                for v in variants if v != "bigmac"
            })
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        for v in variants:
            r = results[v]
            print(f"{v:>13}: {r['step_ms_median']:8.1f} ms/step  {r['tokens_per_s']:10.0f} tok/s"
                  + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else "")
                  + (f"  comm {r['comm_kernel_ms']:.1f} ms" if "comm_kernel_ms" in r else "")
                  + (f"  mem {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""))
        print(json.dumps(report["ratios"]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
