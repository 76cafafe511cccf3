"""megatron_bigmac.loss.vocab_parallel_cross_entropy against megatron-core's unfused
tensor_parallel.vocab_parallel_cross_entropy: same per-token losses and logit gradients, on one
rank and with the vocabulary split over TP=2 (gloo), for fp32 and bf16 logits."""

import pytest
import torch
from distributed import run_distributed
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

import megatron_bigmac  # noqa: F401  (compat shims)
from megatron_bigmac.loss import vocab_parallel_cross_entropy

SEQ, BATCH, VOCAB = 6, 3, 40


def compare(rank, world, dtype):
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(SEQ, BATCH, VOCAB, generator=g)).to(dtype)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    weights = torch.rand(SEQ, BATCH, generator=g)
    shard = full.chunk(world, dim=-1)[rank]

    results = []
    for loss_fn in (lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target),
                    lambda x: vocab_parallel_cross_entropy(x, target, ps.get_tensor_model_parallel_group())):
        logits = shard.clone().requires_grad_(True)
        loss = loss_fn(logits)
        (loss * weights).sum().backward()
        results.append((loss.detach(), logits.grad))
    (want_loss, want_grad), (loss, grad) = results
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol)
    # Against the textbook formula on the full vocabulary.
    reference = torch.nn.functional.cross_entropy(full.float().view(-1, VOCAB), target.view(-1),
                                                  reduction="none").view(SEQ, BATCH)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_megatron_vocab_parallel_cross_entropy(world, dtype):
    run_distributed(compare, world, dtype)


def compare_compiled_on_gpu(rank, world):
    ps.initialize_model_parallel()
    torch.manual_seed(0)
    logits = (3 * torch.randn(128, 4, 50304, device="cuda")).bfloat16()
    target = torch.randint(0, 50304, (128, 4), device="cuda")
    weights = torch.rand(128, 4, device="cuda")
    out = []
    for fn in (lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target),
               lambda x: vocab_parallel_cross_entropy(x, target)):
        x = logits.clone().requires_grad_(True)
        loss = fn(x)
        (loss * weights).sum().backward()
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[1][1].float(), out[0][1].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the compiled kernels)")
def test_compiled_kernels_match_megatron_on_gpu():
    """On a GPU the loss runs as torch.compile'd kernels: same results as megatron-core's."""
    run_distributed(compare_compiled_on_gpu, 1, backend="nccl")
