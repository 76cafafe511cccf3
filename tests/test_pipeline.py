"""Pipeline parallelism composes with all three structures: a GPT of MoE layers run by
megatron-core's pipeline schedule with PP=2 (2 gloo processes) gives the loss and every
parameter gradient of the same model with PP=1."""

from __future__ import annotations

import re

import torch
from distributed import run_distributed

STRUCTURES = {"bigmac": (8, 2), "fine_grained": (8, 2), "vanilla": (4, 2)}
LAYERS, SEQ, MICRO, MICROBATCHES, VOCAB = 2, 16, 2, 2, 64


def _global_name(name: str, layer_offset: int) -> str:
    """This stage's parameter name in the PP=1 model (its layers are numbered from 0)."""
    return re.sub(r"decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def run_pipeline(rank, world, tmp):
    import megatron_bigmac  # noqa: F401  (compat shims)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_bigmac.config import BigMacConfig
    from megatron_bigmac.specs import get_moe_gpt_layer_spec

    ps.initialize_model_parallel(pipeline_model_parallel_size=world)
    model_parallel_cuda_manual_seed(1)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    offset = ps.get_pipeline_model_parallel_rank() * LAYERS // world
    for structure, (experts, topk) in STRUCTURES.items():
        config = BigMacConfig(
            num_layers=LAYERS, hidden_size=32, num_attention_heads=4, moe_structure=structure,
            num_moe_experts=experts, moe_router_topk=topk, moe_aux_loss_coeff=1e-2,
            pipeline_model_parallel_size=world, pipeline_dtype=torch.float32,
            use_cpu_initialization=True, init_method_std=0.2, hidden_dropout=0.0,
            attention_dropout=0.0, add_bias_linear=False,
        )
        model = GPTModel(config=config, transformer_layer_spec=get_moe_gpt_layer_spec(config),
                         vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=first,
                         post_process=last, share_embeddings_and_output_weights=False)
        reference = tmp / f"{structure}_weights.pt"
        if world == 1:
            torch.save(model.state_dict(), reference)
        else:  # the PP=1 model's weights, this stage's share
            full = torch.load(reference)
            model.load_state_dict({k: full[_global_name(k, offset)]
                                   for k in model.state_dict()}, strict=True)

        generator = torch.Generator().manual_seed(3)
        batches = iter([torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=generator)
                        for _ in range(MICROBATCHES)])
        positions = torch.arange(SEQ).expand(MICRO, -1)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch[:, :-1], positions, None, labels=batch[:, 1:])

            def loss_func(losses):
                loss = losses.float().mean()
                return loss, {"lm loss": loss.detach()}

            return output, loss_func

        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model],
            num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MICRO,
            forward_only=False,
        )
        grads = {_global_name(n, offset): p.grad.clone() for n, p in model.named_parameters()}
        assert all(g.abs().sum() > 0 for g in grads.values()), structure
        loss = torch.stack([x["lm loss"] for x in losses]).mean().item() if last else None
        torch.save({"grads": grads, "loss": loss}, tmp / f"{structure}_pp{world}_rank{rank}.pt")
    ps.destroy_model_parallel()


def test_pipeline_parallel_2_matches_pp1_for_every_structure(tmp_path):
    run_distributed(run_pipeline, 1, tmp_path)
    run_distributed(run_pipeline, 2, tmp_path)
    for structure in STRUCTURES:
        pp1 = torch.load(tmp_path / f"{structure}_pp1_rank0.pt")
        stages = [torch.load(tmp_path / f"{structure}_pp2_rank{r}.pt") for r in range(2)]
        merged = {**stages[0]["grads"], **stages[1]["grads"]}
        assert set(merged) == set(pp1["grads"]), structure
        for name, grad in pp1["grads"].items():
            torch.testing.assert_close(merged[name], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{structure} {name}: {m}")
        assert stages[0]["loss"] is None
        assert abs(stages[1]["loss"] - pp1["loss"]) < 1e-6, (structure, stages[1]["loss"], pp1["loss"])
