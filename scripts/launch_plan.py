#!/usr/bin/env python3
"""Check that a config's parallel sizes fit a launch, before any process starts.

Used by scripts/torchrun.sh and scripts/slurm/pretrain.sbatch; it reads only YAML (no torch
import), so it answers in a fraction of a second on a login node. Configs and overrides are read
by the trainer's own code (megatron_bigmac/training/config.py), so both accept the same input.

    python scripts/launch_plan.py --config configs/paper/gpt3_xl_bigmac.yaml \
        --nnodes 4 --nproc-per-node 8 [--format text|shell] [key=value ...]

The rules are megatron-core's (parallel_state.initialize_model_parallel, 0.16):
  * world % (TP x PP x CP) == 0, and DP = world / (TP x PP x CP)           (dense layers)
  * world % (ETP x EP x PP) == 0, and expert DP = world / (ETP x EP x PP)   (MoE experts;
    ETP = expert_tensor_parallel_size, which defaults to TP)
  * num_experts % EP == 0, num_attention_heads % TP == 0
  * global_batch_size % (micro_batch_size x DP) == 0
Exit status 0 and a summary when they hold; 2 and one line per broken rule otherwise.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shlex
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


class PlanError(Exception):
    """A launch that cannot work; the message says why in one line per problem."""


@functools.lru_cache(maxsize=None)
def _trainer_config():
    """The trainer's megatron_bigmac/training/config.py (read_yaml, parse_overrides, _coerce),
    loaded from its file: it needs only yaml, while importing the package would apply its
    megatron-core shims (torch, seconds)."""
    name = "_megatron_bigmac_training_config"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "megatron_bigmac", "training", "config.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing.get_type_hints look the module up
    spec.loader.exec_module(module)
    return module


def load_config(path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """The config's keys after its ``extends`` chain and the command line's key=value overrides,
    as the trainer reads them."""
    trainer = _trainer_config()
    if not os.path.isfile(path):
        raise PlanError(f"config not found: {path}")
    try:
        merged = trainer.read_yaml(path)
        merged.update(trainer.parse_overrides(overrides))
    except (OSError, ValueError) as e:  # ConfigError is a ValueError; its message is one line
        raise PlanError(str(e)) from None
    return merged


def _int(cfg: dict, key: str, default: int | None) -> int | None:
    value = cfg.get(key)
    if value is None:
        return default
    try:
        return _trainer_config()._coerce(key, value, int)  # 16.0 and "1.6e+1" are 16, as in the trainer
    except ValueError as e:
        raise PlanError(str(e)) from None


def plan(cfg: dict, nnodes: int, nproc_per_node: int) -> dict[str, Any]:
    """Parallel layout of `nnodes x nproc_per_node` processes; raises PlanError if it can't work."""
    if nnodes < 1 or nproc_per_node < 1:
        raise PlanError(f"nodes ({nnodes}) and processes per node ({nproc_per_node}) must be >= 1")
    world = nnodes * nproc_per_node
    tp = _int(cfg, "tensor_model_parallel_size", 1)
    pp = _int(cfg, "pipeline_model_parallel_size", 1)
    cp = _int(cfg, "context_parallel_size", 1)
    ep = _int(cfg, "expert_model_parallel_size", 1)
    etp = _int(cfg, "expert_tensor_parallel_size", None) or tp
    experts = _int(cfg, "num_experts", None)
    heads = _int(cfg, "num_attention_heads", None)
    mbs = _int(cfg, "micro_batch_size", None)
    gbs = _int(cfg, "global_batch_size", None)
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", ep),
                        ("expert_tensor_parallel_size", etp)):
        if value < 1:
            raise PlanError(f"{name}: must be >= 1, got {value}")

    layout = f"{nnodes} node(s) x {nproc_per_node} process(es) = world size {world}"
    problems = []
    model = tp * pp * cp
    if world % model:
        problems.append(
            f"{layout} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {model}")
    expert = etp * ep * pp
    if world % expert:
        problems.append(
            f"{layout} is not divisible by ETP x EP x PP = {etp} x {ep} x {pp} = {expert} "
            "(megatron-core's expert groups)")
    if problems:
        step = model * expert // _gcd(model, expert)
        fits = [n for n in range(1, 9) if (n * nproc_per_node) % step == 0][:3]
        hint = (f"; with {nproc_per_node} per node, {' or '.join(map(str, fits))} node(s) fit"
                if fits else f"; the world size must be a multiple of {step}")
        procs = list(range(step, 9, step))[:3]
        if nnodes == 1 and procs:  # one node: more processes may be the fix (NPROC on CPUs)
            hint += f", or {' or '.join(map(str, procs))} process(es) on one node (--nproc/NPROC)"
        raise PlanError("; ".join(problems) + hint)
    dp = world // model
    edp = world // expert
    if experts is not None and experts % ep:
        problems.append(f"num_experts={experts} is not divisible by expert_model_parallel_size={ep}")
    if heads is not None and heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp}")
    accumulation = None
    if mbs is not None and gbs is not None:
        if gbs % (mbs * dp):
            problems.append(
                f"global_batch_size={gbs} is not divisible by micro_batch_size x DP = {mbs} x {dp} "
                f"= {mbs * dp} at world size {world}")
        else:
            accumulation = gbs // (mbs * dp)
    if problems:
        raise PlanError("; ".join(problems))
    return dict(nnodes=nnodes, nproc_per_node=nproc_per_node, world_size=world, tp=tp, pp=pp,
                cp=cp, ep=ep, etp=etp, dp=dp, expert_dp=edp, num_experts=experts,
                micro_batch_size=mbs, global_batch_size=gbs, grad_accumulation=accumulation,
                moe_structure=cfg.get("moe_structure"),
                train_iters=_int(cfg, "train_iters", None),
                data_cache_path=cfg.get("data_cache_path"))


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list, as `scontrol show hostnames` expands it, for machines without
    SLURM: "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1."""
    names, depth, start = [], 0, 0
    parts = []
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    for part in filter(None, parts):
        head, bracket, rest = part.partition("[")
        if not bracket:
            names.append(part)
            continue
        ranges, _, tail = rest.partition("]")
        tails = expand_nodelist(tail) if tail else [""]
        for r in ranges.split(","):
            lo, dash, hi = r.partition("-")
            numbers = [lo] if not dash else [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]
            names.extend(f"{head}{n}{t}" for n in numbers for t in tails)
    return names


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def describe(p: dict) -> str:
    """Two human lines: the world and the parallel sizes."""
    batch = ""
    if p["global_batch_size"] is not None and p["micro_batch_size"] is not None:
        batch = (f"; global batch {p['global_batch_size']} = micro batch {p['micro_batch_size']} x "
                 f"DP {p['dp']} x {p['grad_accumulation']} accumulation step(s)")
    return (f"world size {p['world_size']} ({p['nnodes']} node(s) x {p['nproc_per_node']} "
            f"process(es))\n"
            f"parallel sizes: TP={p['tp']} PP={p['pp']} CP={p['cp']} EP={p['ep']} ETP={p['etp']} "
            f"-> DP={p['dp']} (dense), expert DP={p['expert_dp']}{batch}")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--expand-nodelist"]:
        print("\n".join(expand_nodelist(argv[1] if len(argv) > 1 else "")))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--format", choices=("text", "shell"), default="text")
    parser.add_argument("overrides", nargs="*", help="key=value, as given to megatron_bigmac.train")
    args = parser.parse_args(argv)
    try:
        p = plan(load_config(args.config, args.overrides), args.nnodes, args.nproc_per_node)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "shell":
        for key, value in p.items():
            print(f"PLAN_{key.upper()}={shlex.quote('' if value is None else str(value))}")
        print(f"PLAN_SUMMARY={shlex.quote(describe(p))}")
    else:
        print(describe(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
