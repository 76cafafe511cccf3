"""The training loop, built from megatron-core pieces and meant to be read top to bottom:

    Trainer(cfg, resume)  process groups, exit-signal handler, data, seed, model (DDP),
                          optimizer, LR schedule, resume from the checkpoint train.main checked
    .train()              evaluate; repeat train_step, log, evaluate, save (a signal: save, stop)
    .train_step()         megatron-core's forward-backward schedule over the micro-batches (its
                          finalize_model_grads reduces gradients over DP/TP/EP), then the
                          optimizer step (gradient clipping inside) and the LR schedule
    .forward_step()       one micro-batch: GPTModel -> per-token loss -> masked sum; the MoE
                          load-balancing loss reaches the gradients through megatron-core's
                          MoEAuxLossAutoScaler, so the loss function only sees the LM loss
    .evaluate()           the same held-out batches every time -> loss and perplexity
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.full_cuda_graph import FullCudaGraphWrapper
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from megatron_bigmac.costs import MoEModelShape, training_flops_per_iteration
from megatron_bigmac.training import data
from megatron_bigmac.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    same_path,
    saved_train_samples,
    save_checkpoint,
    save_config,
)
from megatron_bigmac.training.config import TrainingConfig
from megatron_bigmac.training.distributed import ExitSignal, init_distributed, set_seed
from megatron_bigmac.training.metrics import (
    H100_BF16_PEAK_TFLOPS,
    MetricsLogger,
    StepProfiler,
    StepTimers,
    format_config,
    memory_gib,
    perplexity,
    reduce_loss_sums,
)
from megatron_bigmac.training.model import build_model, padded_vocab_size, unwrap
from megatron_bigmac.training.optimizer import build_optimizer, build_scheduler


class Trainer:
    def __init__(self, cfg: TrainingConfig, resume: Optional[Tuple[Path, dict]] = None):
        """``resume``: what ``checkpoint_to_resume(cfg)`` found, called before this (it reads
        files only, so train.main runs it before any process group exists)."""
        self.cfg = cfg
        self.ctx = init_distributed(cfg)
        # cuda_graph_impl: training iterations replay one captured forward-backward (set up below).
        self.cuda_graphs = cfg.cuda_graph_impl != "none"
        if self.cuda_graphs:
            # PyTorch's whole-network capture recipe: keep all work off the legacy default
            # stream, whose implicit sync with every other stream invalidates a capture. The
            # AccumulateGrad nodes that megatron-core's DDP creates when it wraps the model run
            # on the stream current then, so this comes before anything is built.
            torch.cuda.set_stream(torch.cuda.Stream())
        # Before the data and the model, which can take minutes to build: a signal meanwhile
        # stops the run cleanly (train() checks it first) instead of killing it.
        duration_s = None if cfg.exit_duration_in_mins is None else 60 * cfg.exit_duration_in_mins
        self.exit_signal = (ExitSignal(cfg.exit_signal_handler, duration_s)
                            if cfg.exit_signal_handler or duration_s is not None else None)
        if self.ctx.is_main:
            print(f"config (saved as {cfg.log_dir}/config.yaml):\n{format_config(cfg.to_dict())}",
                  flush=True)
            save_config(cfg, cfg.log_dir)
            if cfg.save:
                save_config(cfg, cfg.save)

        # Data first: the shipped sample is tokenized once per host, the rest of the ranks wait.
        if self.ctx.local_rank == 0:
            data.prepare_samples(cfg)
        data.barrier()
        data.check_prefixes(cfg)
        self.train_data, self.valid_data, self.train_samples = data.build_datasets(
            cfg, saved_train_samples(resume[1]) if resume else None)

        # The same seed on every rank before building: data-parallel replicas start equal.
        set_seed(cfg.seed, cuda_graphs=self.cuda_graphs)
        self.model = build_model(cfg, self.ctx.device, self.ctx.pg_collection)
        self.optimizer = build_optimizer(cfg, [self.model], self.ctx.pg_collection)
        self.scheduler = build_scheduler(cfg, self.optimizer)

        # Hooks megatron-core's schedules call: gradient reduction after the last micro-batch,
        # no gradient sync before it, loss scaling, and timers.
        self.timers = StepTimers(self.ctx.device)
        config = unwrap(self.model).config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.model.no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        config.timers = self.timers
        self.forward_backward = get_forward_backward_func()
        # With cuda_graph_impl, megatron-core's FullCudaGraphWrapper (as Megatron-LM wraps it):
        # data copied into static buffers, then the captured graph replayed. Evaluation stays eager.
        self.train_forward_backward = (
            FullCudaGraphWrapper(self.forward_backward, cfg.cuda_graph_warmup_steps)
            if self.cuda_graphs else self.forward_backward
        )

        self.iteration, self.consumed_samples = load_checkpoint(
            resume, self.model, self.optimizer, self.scheduler
        )
        self.resumed_from = resume[0] if resume else None
        shape = MoEModelShape.from_config(config, cfg.seq_length, padded_vocab_size(cfg))
        self.flops_per_iteration = training_flops_per_iteration(shape, cfg.global_batch_size)
        self.peak_tflops = cfg.peak_tflops or (
            H100_BF16_PEAK_TFLOPS if cfg.bf16 and self.ctx.device.type == "cuda" else None
        )
        self.metrics = MetricsLogger(cfg.log_dir, cfg.train_iters, self.ctx.is_main,
                                     cfg.tensorboard_dir)
        self.profiler = StepProfiler(
            f"{cfg.log_dir}/profile", cfg.profile_step_start, cfg.profile_step_end,
            self.ctx.rank, cfg.profile_ranks, self.ctx.device.type == "cuda",
        ) if cfg.profile else None

    # ------------------------------------------------------------------ the loop
    def train(self) -> Optional[float]:
        """Train to ``train_iters``; returns the last validation loss (None without evaluation)."""
        cfg = self.cfg
        if self._exit_agreed():
            # Signalled during startup: stop before the first step, with a checkpoint to resume
            # from unless the latest one in ``save`` is the one this run started from.
            latest = find_checkpoint(cfg.save) if cfg.save else None
            if cfg.save and (self.resumed_from is None or latest is None
                             or not same_path(latest, self.resumed_from)):
                self.save()
            self._report_exit(self.exit_signal.reason)
            self.metrics.close()
            return None
        batches = data.batches(self.train_data, cfg, self.ctx.dp_rank, self.ctx.dp_size,
                               self.consumed_samples)
        val_loss = self.evaluate() if self.iteration == 0 else None
        self.metrics.start(self.iteration)
        loss_sums = torch.zeros(2, device=self.ctx.device)  # [lm loss sum, tokens] since last log
        interval_start, interval_steps = time.perf_counter(), 0

        while self.iteration < cfg.train_iters:
            last = self.iteration + 1 == cfg.train_iters
            exit_now = bool(cfg.exit_interval) and (self.iteration + 1) % cfg.exit_interval == 0
            log_now = last or exit_now or (self.iteration + 1) % cfg.log_interval == 0
            # Time fwd/bwd/optimizer only on logging steps (it syncs), and never inside a graph.
            self.timers.arm(log_now and not self.cuda_graphs)
            if self.profiler:
                self.profiler.step_begin(self.iteration)
            step_loss, grad_norm = self.train_step(batches)
            self.iteration += 1
            if self.profiler:
                self.profiler.step_end(self.iteration)
            self.consumed_samples += cfg.global_batch_size
            loss_sums += step_loss
            interval_steps += 1

            if log_now:
                elapsed = time.perf_counter() - interval_start
                self.log_train(loss_sums, grad_norm, elapsed, interval_steps)
                loss_sums.zero_()
                interval_start, interval_steps = time.perf_counter(), 0
            # Evaluation and saving are not training: shift the interval's start past them (a
            # reset would divide part of the interval's time by all of its steps).
            # A run stopped by exit_interval also ends with a validation.
            if last or exit_now or self.iteration % cfg.eval_interval == 0:
                paused = time.perf_counter()
                val_loss = self.evaluate()
                interval_start += time.perf_counter() - paused
            stop = self._exit_agreed() or exit_now
            periodic = cfg.save_interval and self.iteration % cfg.save_interval == 0
            if cfg.save and (last or periodic or stop):
                paused = time.perf_counter()
                self.save()
                interval_start += time.perf_counter() - paused
            if stop:
                self._report_exit(None if exit_now else self.exit_signal.reason)
                break
        self.metrics.close()
        return val_loss

    def save(self) -> None:
        save_checkpoint(self.cfg, self.iteration, self.consumed_samples, self.train_samples,
                        self.model, self.optimizer, self.scheduler)

    def _exit_agreed(self) -> bool:
        """Whether any rank received SIGUSR1/SIGTERM or ran out of exit_duration_in_mins
        (collective)."""
        return self.exit_signal is not None and self.exit_signal.agreed()

    def _report_exit(self, reason: Optional[str]) -> None:
        """reason: the ExitSignal's; None for exit_interval."""
        if self.ctx.is_main:
            saved = f" with its checkpoint in {self.cfg.save}" if self.cfg.save else ""
            why = reason
            if reason is None:
                why = f"exit_interval {self.cfg.exit_interval}"
            elif reason == "exit_duration_in_mins":
                why = f"exit_duration_in_mins {self.cfg.exit_duration_in_mins:g}"
            print(f"[{self.iteration}/{self.cfg.train_iters}] {why}: stopped{saved}", flush=True)

    def train_step(self, batches: Iterator) -> Tuple[torch.Tensor, float]:
        """One iteration over ``num_microbatches`` micro-batches; returns this rank's
        [loss sum, token count] (on the device, unsynchronized) and the global grad norm."""
        cfg = self.cfg
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.cuda_graphs and self.train_forward_backward.curr_iter("training") == \
                cfg.cuda_graph_warmup_steps:
            # The graph gets its own memory pool: hand back what the eager steps cached first.
            torch.cuda.empty_cache()
        outputs = self.train_forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=batches,
            model=[self.model],
            num_microbatches=cfg.num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size,
            forward_only=False,
            pg_collection=self.ctx.pg_collection,
        )
        self.timers("optimizer").start()
        update_successful, grad_norm, _ = self.optimizer.step()  # clips to clip_grad first
        self.timers("optimizer").stop()
        if update_successful:
            self.scheduler.step(increment=1)
        return torch.stack([o["lm loss"] for o in outputs]).sum(0), grad_norm

    def forward_step(self, data_iterator: Iterator, model):
        """One micro-batch through the model; megatron-core calls the returned loss function."""
        batch = next(data_iterator)
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}
        # GPTModel with labels returns the per-token cross entropy, [micro, seq].
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return losses, partial(self._loss_func, batch["loss_mask"])

    @staticmethod
    def _loss_func(loss_mask: torch.Tensor, losses: torch.Tensor):
        """Masked loss sum and token count: the schedule divides by the tokens (and by the
        micro-batches) for the gradient; the [sum, count] pair is kept for exact logging."""
        loss_mask = loss_mask.view(-1).float()
        loss_sum = torch.sum(losses.float().view(-1) * loss_mask)
        tokens = loss_mask.sum().to(torch.int)
        return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Loss over ``eval_iters`` global batches of the validation split, the same batches
        every time (so the curve compares like with like); logs loss and perplexity."""
        cfg = self.cfg
        if self.valid_data is None:  # eval_iters: 0
            return None
        self.model.eval()
        batches = data.batches(self.valid_data, cfg, self.ctx.dp_rank, self.ctx.dp_size)
        outputs = self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=batches,
            model=[self.model],
            num_microbatches=cfg.eval_iters * cfg.num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size,
            forward_only=True,
            pg_collection=self.ctx.pg_collection,
        )
        self.model.train()
        sums = torch.stack([o["lm loss"] for o in outputs]).sum(0)
        loss, tokens = reduce_loss_sums(sums, parallel_state.get_data_parallel_group())
        record = {"kind": "eval", "step": self.iteration, "lm_loss": loss,
                  "perplexity": perplexity(loss), "tokens": tokens}
        self.metrics.write(record)
        self.metrics.console_eval(record)
        return loss

    # ------------------------------------------------------------------ logging
    def log_train(self, loss_sums: torch.Tensor, grad_norm: float, elapsed: float,
                  steps: int) -> None:
        """One JSONL record and console line for the last ``steps`` iterations (collective:
        every rank calls it)."""
        cfg = self.cfg
        loss, _ = reduce_loss_sums(loss_sums, parallel_state.get_data_parallel_group())
        step_time = elapsed / steps
        record: Dict[str, float] = {
            "kind": "train",
            "step": self.iteration,
            "consumed_samples": self.consumed_samples,
            "lm_loss": loss,
        }
        record.update(self._moe_aux_losses(steps))
        record.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            step_time_s=step_time,
            tokens_per_s=cfg.global_batch_size * cfg.seq_length / step_time,
        )
        # The split of the logging step itself (measured with device syncs, that step only).
        split = self.timers.elapsed
        for name, key in (("forward-compute", "forward_s"), ("backward-compute", "backward_s"),
                          ("all-grads-sync", "grad_sync_s"), ("optimizer", "optimizer_s")):
            if name in split:
                record[key] = split[name]
        if self.ctx.device.type == "cuda":
            tflops = self.flops_per_iteration / step_time / self.ctx.world_size / 1e12
            record["tflops_per_gpu"] = tflops
            if self.peak_tflops:
                record["mfu"] = tflops / self.peak_tflops
        record.update(memory_gib(self.ctx.device))
        self.metrics.write(record)
        self.metrics.console_train(record)

    def _moe_aux_losses(self, steps: int) -> Dict[str, float]:
        """megatron-core's MoE losses since the last log (the load-balancing loss before its
        coefficient; z-loss when on): mean per MoE layer, micro-batch and iteration, reduced over
        ranks (collective), through megatron-core's own track_moe_metrics."""
        losses: Dict[str, torch.Tensor] = {}
        # Megatron-LM calls it every iteration (a reduction each time) and divides the sums by
        # the iterations when logging; the iterations in loss_scale give that mean in one call.
        track_moe_metrics(loss_scale=1.0 / (self.cfg.num_microbatches * steps),
                          iteration=self.iteration, total_loss_dict=losses,
                          num_layers=self.cfg.num_layers, pg_collection=self.ctx.pg_collection)
        renamed = {"load_balancing_loss": "aux_loss"}
        return {renamed.get(name, name): v.item() for name, v in losses.items()}
