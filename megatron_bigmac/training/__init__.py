"""The pretraining runner, one small module per concern:

    config.py        YAML -> TrainingConfig, checked before any process group exists
    distributed.py   torch.distributed + megatron-core parallel_state, seeding
    model.py         BigMacConfig, GPTModel (project specs), DistributedDataParallel
    data.py          GPTDataset via BlendedMegatronDatasetBuilder, resumable batches
    optimizer.py     megatron-core optimizer and OptimizerParamScheduler (warmup + decay)
    checkpoint.py    dist_checkpointing save/load, written atomically
    metrics.py       JSONL, TensorBoard, console progress line, timers
    trainer.py       the loop that ties them together

Entry point: ``python -m megatron_bigmac.train --config configs/<name>.yaml [key=value ...]``.
"""
