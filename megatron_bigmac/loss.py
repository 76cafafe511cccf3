"""Vocab-parallel cross entropy on bf16 logits without fp32 copies of them.

megatron-core 0.16's unfused `vocab_parallel_cross_entropy` upcasts the logits to fp32 and makes
several full passes over them (max, subtract, exp, sum, divide; the backward again): at the small
config's 32 k tokens x 50,304 vocabulary that is 6.6 GB per copy, and it measured 22% of a
training step's GPU time on an H100. Its 'native' fused variant still keeps the fp32 softmax
for the backward.

Here the same maths (max-subtracted log-sum-exp in fp32, the target logit, softmax minus one-hot
in the backward) runs as one compiled pass each way (torch.compile on GPUs): the forward reads
the bf16 logits and writes only per-token values, the backward recomputes the softmax from the
saved logits and writes the bf16 gradient directly. Across tensor-parallel ranks (vocab split)
each shard's max, sum of exponentials and target logit are combined by all-reduces, as
megatron-core does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_bigmac.kernels import compiled


def _local_log_sum_exp_parts(logits, target, vocab_start: int):
    """Over this rank's vocabulary shard: the max logit, the sum of exp(logit - max) and the
    target's logit (0 where another rank holds it), all fp32. One compiled pass over the logits."""
    logits32 = logits.float()
    logits_max = logits32.amax(dim=-1)
    sum_exp = (logits32 - logits_max.unsqueeze(-1)).exp().sum(dim=-1)
    local = target - vocab_start
    mine = (local >= 0) & (local < logits.size(-1))
    target_logit = logits32.gather(-1, local.clamp(0, logits.size(-1) - 1).unsqueeze(-1))
    return logits_max, sum_exp, torch.where(mine, target_logit.squeeze(-1), 0.0)


def _logits_grad(logits, log_normalizer, target, vocab_start: int, grad_loss):
    """d loss / d logits = (softmax - one_hot(target)) * grad_loss, in the logits' dtype. The
    one-hot is a comparison with the column index, so this is one pass that reads the logits and
    writes the gradient (a scattered one-hot would be a vocabulary-wide fp32 tensor of its own)."""
    softmax = (logits.float() - log_normalizer.unsqueeze(-1)).exp()
    columns = torch.arange(logits.size(-1), device=logits.device)
    one_hot = columns == (target - vocab_start).unsqueeze(-1)  # all False off this rank's shard
    return ((softmax - one_hot.float()) * grad_loss.unsqueeze(-1)).to(logits.dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group):
        rank, world = (tp_group.rank(), tp_group.size()) if tp_group is not None else (0, 1)
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), rank, world
        )
        logits_max, sum_exp, target_logit = compiled(_local_log_sum_exp_parts)(
            logits, target, vocab_start
        )
        if world > 1:
            # Rescale each shard's sum to the global max, then add shards up (exact maths).
            local_max = logits_max.clone()
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
            both = torch.stack([sum_exp * (local_max - logits_max).exp(), target_logit])
            dist.all_reduce(both, group=tp_group)
            sum_exp, target_logit = both[0], both[1]
        log_normalizer = logits_max + sum_exp.log()
        ctx.save_for_backward(logits, log_normalizer, target)
        ctx.vocab_start = vocab_start
        return log_normalizer - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        logits, log_normalizer, target = ctx.saved_tensors
        grad = compiled(_logits_grad)(logits, log_normalizer, target, ctx.vocab_start,
                                     grad_loss.contiguous().float())
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 tp_group=None) -> torch.Tensor:
    """Per-token cross entropy (fp32) of ``logits`` [..., vocab / TP] against ``target`` [...]:
    megatron-core's `tensor_parallel.vocab_parallel_cross_entropy`, same inputs and result."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)
