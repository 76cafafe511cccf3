"""The run configuration: one flat dataclass whose fields are Megatron-LM's argument names in
snake_case, plus the project's MoE keys, loaded from YAML.

    cfg = load_config("configs/tiny/bigmac.yaml", ["lr=1e-3", "train_iters=50"])

* A YAML file may name a base file with ``extends: base.yaml`` (relative to itself); its keys
  override the base's. ``key=value`` overrides (parsed as YAML) come last.
* Everything is checked here, before any process group exists: unknown keys (with the closest
  valid key), types, allowed values, and combinations (batch sizes vs. data parallelism, heads
  vs. TP, experts vs. EP, ...). A problem raises ``ConfigError`` with one line that starts with
  the key, e.g. ``lr_warmup_iter: unknown key (did you mean lr_warmup_iters?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line starting with the key."""


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def _choices(*values) -> dict:
    return {"choices": values}


@dataclass
class TrainingConfig:
    """Every key a config may set. Docstrings say what each one means; defaults are Megatron-LM's
    unless said otherwise."""

    # ---------------------------------------------------------------- model
    num_layers: int = 2
    """Transformer layers; every layer's MLP is an MoE layer (the paper's setting)."""
    hidden_size: int = 64
    num_attention_heads: int = 4
    seq_length: int = 64
    """Tokens per training sample."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table; defaults to seq_length."""
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    normalization: str = field(default="LayerNorm", metadata=_choices("LayerNorm", "RMSNorm"))
    add_bias_linear: bool = True
    """Biases on the attention linears (the experts never have biases)."""
    untie_embeddings_and_output_weights: bool = False
    """False (tied) gives the paper's parameter counts."""
    make_vocab_size_divisible_by: int = 128
    """The embedding table is padded to a multiple of this (times TP): 50,257 -> 50,304."""
    attention: str = field(default="sdpa", metadata=_choices("sdpa", "local"))
    """Project key: core attention through torch SDPA (fused kernels) or megatron-core's local
    (unfused) reference."""

    layernorm_fusion: bool = True
    """Layer norms as compiled kernels on GPUs (project key; megatron_bigmac.norm.FusedNorm)."""
    moe_activation_fusion: bool = True
    """Experts' activation + gate weights as one compiled kernel each way on GPUs (project key)."""
    bias_dropout_fusion: bool = False
    """Fuse bias + dropout + residual add (megatron-core's jit_fuser, torch.compile)."""
    cross_entropy_loss_fusion: bool = False
    """megatron-core's fused cross entropy ('native': torch.compile, 'te': transformer-engine)."""
    cross_entropy_fusion_impl: str = field(default="native", metadata=_choices("native", "te"))
    cuda_graph_impl: str = field(default="none", metadata=_choices("none", "local"))
    """'local': megatron-core's own CUDA graphs (Megatron-LM's --cuda-graph-impl). The runner
    supports the whole forward-backward of an iteration as one graph (cuda_graph_scope
    full_iteration, megatron-core's FullCudaGraphWrapper): the host then launches one graph per
    step instead of thousands of kernels. Needs a GPU and a step without host syncs: a dropless
    MoE on one rank of its expert group (EP = TP = 1)."""
    cuda_graph_scope: str = field(default="full_iteration", metadata=_choices("full_iteration"))
    cuda_graph_warmup_steps: int = 3
    """Eager iterations before the capture (compilation, allocator growth)."""

    # ---------------------------------------------------------------- MoE
    num_experts: int = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    """Experts' inner width h_f; default per structure (bigmac h, fine_grained r*h, vanilla 4h)."""
    moe_aux_loss_coeff: float = 1e-3
    moe_router_load_balancing_type: str = field(
        default="aux_loss", metadata=_choices("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
    )
    moe_expert_capacity_factor: Optional[float] = None
    """None: dropless. With a factor, tokens over capacity are dropped."""
    moe_pad_expert_input_to_capacity: bool = False
    moe_token_dispatcher_type: str = field(
        default="alltoall", metadata=_choices("alltoall", "allgather", "flex")
    )
    moe_router_pre_softmax: bool = False
    """Softmax before top-k (megatron-core requires it for top-1)."""
    moe_router_dtype: Optional[str] = field(default="fp32", metadata=_choices(None, "fp32", "fp64"))
    """Precision of the router's softmax and aux loss (project default fp32, for bf16 runs)."""
    moe_z_loss_coeff: Optional[float] = None
    moe_structure: str = field(
        default="bigmac", metadata=_choices("bigmac", "fine_grained", "vanilla")
    )
    """Project key: the MoE structure (see megatron_bigmac.config)."""
    moe_low_rank_ratio: float = 0.25
    """Project key: r. BigMac's latent width and Fine-Grained's expert width are r * hidden_size."""
    moe_latent_init: str = field(
        default="variance_preserving", metadata=_choices("variance_preserving", "megatron")
    )
    """Project key: how BigMac's W_down/W_up start (see megatron_bigmac.config)."""
    moe_expert_activation: str = field(
        default="gelu", metadata=_choices("gelu", "relu", "squared_relu", "swiglu")
    )
    """Project key: the experts' activation."""

    # ---------------------------------------------------------------- parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    """Defaults to tensor_model_parallel_size (megatron-core's default)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: Optional[bool] = None
    """None: on with GPUs and data parallelism > 1 (it shards optimizer state over DP, so one
    GPU gains nothing), off on CPU; a resumed run then keeps its checkpoint's choice."""
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    distributed_backend: str = field(default="auto", metadata=_choices("auto", "nccl", "gloo"))
    """auto: nccl with GPUs, gloo on CPU."""
    distributed_timeout_minutes: int = 10

    # ---------------------------------------------------------------- precision
    bf16: bool = False
    """bf16 parameters and activations, fp32 main weights and gradient reduction (GPU only)."""
    accumulate_allreduce_grads_in_fp32: Optional[bool] = None
    """None: on with bf16 (Megatron-LM's behaviour)."""
    use_cpu_initialization: Optional[bool] = None
    """None: on for CPU runs. On, every rank draws the same global weights and keeps its shard,
    so the initial model does not depend on the parallel layout."""

    # ---------------------------------------------------------------- optimization
    micro_batch_size: int = 8
    global_batch_size: int = 16
    train_iters: int = 100
    optimizer: str = field(default="adam", metadata=_choices("adam", "sgd"))
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = field(
        default="cosine", metadata=_choices("constant", "linear", "cosine", "inverse-square-root")
    )
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_iters: Optional[int] = None
    """Defaults to train_iters."""
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    seed: int = 1234

    # ---------------------------------------------------------------- data
    data_path: List[str] = field(default_factory=list)
    """Dataset prefixes (``.bin``/``.idx`` without the suffix) cut into train/valid/test by
    ``split``. A prefix ``sample:NAME`` is the corpus shipped in megatron_bigmac/assets/sample,
    tokenized into ``data_cache_path`` on first use."""
    split: str = "969,30,1"
    train_data_path: List[str] = field(default_factory=list)
    """Separate training prefixes (instead of data_path + split)."""
    valid_data_path: List[str] = field(default_factory=list)
    data_cache_path: Optional[str] = None
    """Where tokenized samples and megatron-core's dataset indices are cached;
    default $MEGATRON_BIGMAC_CACHE or ~/.cache/megatron_bigmac."""
    mock_data: bool = False
    """Random tokens instead of a corpus (speed runs)."""
    tokenizer_dir: Optional[str] = None
    """Directory with GPT-2 vocab.json + merges.txt; default the copy shipped in the package."""
    num_workers: int = 0
    """DataLoader worker processes."""
    eod_mask_loss: bool = False

    # ---------------------------------------------------------------- evaluation
    eval_interval: int = 50
    """Validation loss every this many iterations (and after the last one)."""
    eval_iters: int = 4
    """Global batches of held-out data per evaluation; the same batches every time."""

    # ---------------------------------------------------------------- checkpointing
    save: Optional[str] = None
    """Directory for checkpoints (iter_NNNNNNN/ plus latest_checkpointed_iteration.txt)."""
    save_interval: Optional[int] = None
    """Save every this many iterations; a run with ``save`` also saves after its last iteration."""
    load: Optional[str] = None
    """A save directory (resumes from its latest checkpoint) or one iter_NNNNNNN directory."""

    exit_interval: Optional[int] = None
    """Stop after the first iteration divisible by this (Megatron-LM's --exit-interval), with a
    checkpoint when ``save`` is set: a run shortened on purpose keeps the schedule of its full
    ``train_iters`` (e.g. a 600-iteration look at a 1,200-iteration run)."""
    exit_duration_in_mins: Optional[float] = None
    """Checkpoint (when ``save`` is set) and stop once this many minutes have passed since the
    start (Megatron-LM's --exit-duration-in-mins): a time limit that needs no signal."""
    exit_signal_handler: bool = True
    """On SIGUSR1 or SIGTERM, save a checkpoint at the next iteration boundary and exit cleanly
    (what scripts/torchrun.sh and scripts/slurm/pretrain.sbatch rely on before a time limit)."""

    # ---------------------------------------------------------------- logging
    log_interval: int = 10
    log_dir: Optional[str] = None
    """Where metrics.jsonl (and TensorBoard events) go; default ``save``, else
    runs/<config's folder>/<config name> (configs/tiny/bigmac.yaml: runs/tiny/bigmac)."""
    tensorboard_dir: Optional[str] = None
    """Default <log_dir>/tensorboard, used only when tensorboard is importable."""
    peak_tflops: Optional[float] = None
    """Per-GPU dense peak used for MFU; default 989 (H100/H200 bf16) with bf16 on a GPU."""
    profile: bool = False
    """Trace iterations profile_step_start .. profile_step_end - 1 with torch.profiler: a Chrome
    trace and a kernel-time table per profiled rank under <log_dir>/profile/."""
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: List[int] = field(default_factory=lambda: [0])

    # ---------------------------------------------------------------- derived (not keys)
    def __post_init__(self):
        # Filled in by validate(); kept off the key list.
        self._world_size = 1
        # Whether validate() chose use_distributed_optimizer (a resumed run then takes the
        # checkpoint's value: training/checkpoint.py).
        self._use_distributed_optimizer_defaulted = False

    @property
    def data_parallel_size(self) -> int:
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        return self._world_size // mp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


KEYS = tuple(f.name for f in dataclasses.fields(TrainingConfig))
_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
_TYPES = typing.get_type_hints(TrainingConfig)


# -------------------------------------------------------------------------------------------
# Loading: YAML (+ extends) and key=value overrides
# -------------------------------------------------------------------------------------------


def read_yaml(path: str | Path, _seen: tuple = ()) -> Dict[str, Any]:
    """The keys of a YAML config with its ``extends`` chain resolved (the file's keys win)."""
    path = Path(path).resolve()
    if path in _seen:
        _fail("extends", f"cycle through {path}")
    if not path.is_file():
        _fail("config", f"no such file: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        _fail("config", f"{path} is not valid YAML: {' '.join(str(e).split())}")
    if not isinstance(raw, dict):
        _fail("config", f"{path} must hold a mapping of keys to values")
    base = raw.pop("extends", None)
    merged: Dict[str, Any] = {}
    for parent in [base] if isinstance(base, str) else base or []:
        merged.update(read_yaml(path.parent / parent, _seen + (path,)))
    merged.update(raw)
    return merged


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["lr=1e-3", "save=null"]`` -> ``{"lr": 1e-3, "save": None}`` (values parsed as YAML)."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            _fail(item, "an override must look like key=value")
        try:
            parsed[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed[key] = value
    return parsed


def load_config(
    path: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    world_size: Optional[int] = None,
    cuda: Optional[bool] = None,
) -> TrainingConfig:
    """Read, type-check and validate a config. ``world_size`` defaults to $WORLD_SIZE (torchrun)
    or 1; ``cuda`` to whether a GPU is visible. Raises ConfigError."""
    values = read_yaml(path) if path is not None else {}
    values.update(parse_overrides(overrides))
    cfg = from_dict(values)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    validate(cfg, world_size, cuda)
    if cfg.log_dir is None:
        cfg.log_dir = cfg.save or default_log_dir(path)
    return cfg


def default_log_dir(config_path: Optional[str]) -> str:
    """runs/<folder>/<name> of the config file: the folder keeps configs of one structure at
    different sizes (tiny/bigmac, small/bigmac) from appending to one metrics.jsonl."""
    if config_path is None:
        return os.path.join("runs", "default")
    path = Path(config_path).resolve()
    return os.path.join("runs", path.parent.name, path.stem)


def from_dict(values: Dict[str, Any]) -> TrainingConfig:
    """TrainingConfig from a dict of keys, with unknown keys and wrong types rejected."""
    kwargs = {}
    for key, value in values.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            _fail(key, f"unknown key{hint}")
        kwargs[key] = _coerce(key, value, _TYPES[key])
    return TrainingConfig(**kwargs)


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check ``value`` against the field's type; accept only lossless conversions."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, List):
        item = args[0] if args else str
        items = [value] if isinstance(value, item) and not isinstance(value, bool) else value
        if not isinstance(items, list) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in items
        ):
            _fail(key, f"expected a list of {'strings' if item is str else 'integers'}, got {value!r}")
        return list(items)
    kind = annotation
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = value
        if isinstance(value, str):  # PyYAML reads 1e3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, float) and number.is_integer():
            return int(number)  # 5.2e+3 in YAML is a float
    elif kind is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # every range check below is false for NaN
                _fail(key, f"expected a finite number, got {value}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    _fail(key, f"expected {names[kind]}, got {value!r} ({type(value).__name__})")


# -------------------------------------------------------------------------------------------
# Validation: values and combinations, before any process group exists
# -------------------------------------------------------------------------------------------

_POSITIVE = (
    "num_layers", "hidden_size", "num_attention_heads", "seq_length", "num_experts",
    "moe_router_topk", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "expert_model_parallel_size", "micro_batch_size",
    "global_batch_size", "train_iters", "eval_interval", "log_interval",
    "distributed_timeout_minutes",
)
_NON_NEGATIVE = (
    "lr", "min_lr", "lr_warmup_iters", "lr_warmup_init", "weight_decay", "clip_grad", "adam_eps",
    "eval_iters", "num_workers", "moe_aux_loss_coeff",
)


def validate(cfg: TrainingConfig, world_size: int, cuda: bool) -> None:
    """Check values and their combinations for ``world_size`` processes; fill in defaults that
    depend on the host. Raises ConfigError naming the key."""
    for key, f in _FIELDS.items():
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(cfg, key) not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            _fail(key, f"{getattr(cfg, key)!r} is not one of {shown}")
    for key in _POSITIVE:
        if getattr(cfg, key) < 1:
            _fail(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            _fail(key, f"must be >= 0, got {getattr(cfg, key)}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0 <= getattr(cfg, key) < 1:
            _fail(key, f"must be in [0, 1), got {getattr(cfg, key)}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            _fail(key, f"must be in [0, 1), got {getattr(cfg, key)}")
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range
        _fail("seed", f"must be in [0, 2**32), got {cfg.seed}")
    if cfg.expert_tensor_parallel_size is not None and cfg.expert_tensor_parallel_size < 1:
        _fail("expert_tensor_parallel_size",
              f"must be >= 1 (or null: tensor_model_parallel_size), got "
              f"{cfg.expert_tensor_parallel_size}")
    if cfg.moe_expert_capacity_factor is not None and cfg.moe_expert_capacity_factor <= 0:
        _fail("moe_expert_capacity_factor",
              f"must be > 0 (or null: dropless), got {cfg.moe_expert_capacity_factor}")

    # Model shape.
    if cfg.hidden_size % cfg.num_attention_heads:
        _fail("num_attention_heads",
              f"{cfg.num_attention_heads} does not divide hidden_size={cfg.hidden_size}")
    if cfg.max_position_embeddings is None:
        cfg.max_position_embeddings = cfg.seq_length
    if cfg.max_position_embeddings < cfg.seq_length:
        _fail("max_position_embeddings",
              f"{cfg.max_position_embeddings} < seq_length={cfg.seq_length}")

    # Parallel layout (the same arithmetic as parallel_state.initialize_model_parallel).
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    ep = cfg.expert_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or tp
    if world_size % (tp * pp):
        _fail("tensor_model_parallel_size",
              f"TP={tp} x PP={pp} does not divide the {world_size} processes")
    if cfg.num_attention_heads % tp:
        _fail("tensor_model_parallel_size",
              f"{tp} does not divide num_attention_heads={cfg.num_attention_heads}")
    if world_size % (etp * ep * pp):
        _fail("expert_model_parallel_size",
              f"EP={ep} x expert TP={etp} x PP={pp} does not divide the {world_size} processes")
    if cfg.num_experts % ep:
        _fail("expert_model_parallel_size", f"{ep} does not divide num_experts={cfg.num_experts}")
    if pp > 1:
        _fail("pipeline_model_parallel_size",
              "pipeline parallelism is not supported by this runner yet; use 1")
    if cfg.sequence_parallel and tp == 1:
        _fail("sequence_parallel", "needs tensor_model_parallel_size > 1")
    if tp > 1 and ep > 1 and not cfg.sequence_parallel:
        _fail("sequence_parallel",
              "megatron-core MoE with TP > 1 and EP > 1 needs sequence_parallel: true")
    if cfg.num_layers % pp:
        _fail("num_layers",
              f"{cfg.num_layers} is not divisible by pipeline_model_parallel_size={pp}")
    cfg._world_size = world_size
    dp = cfg.data_parallel_size
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        _fail("global_batch_size",
              f"{cfg.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
              f"= {cfg.micro_batch_size} x {dp}")

    # Host.
    if cfg.distributed_backend == "nccl" and not cuda:
        _fail("distributed_backend", "nccl needs GPUs; use gloo or auto on CPU")
    if cfg.bf16 and not cuda:
        _fail("bf16", "needs a GPU (megatron-core's mixed-precision optimizer is CUDA-only); "
                      "use bf16: false on CPU")
    if cfg.use_distributed_optimizer is None:
        cfg.use_distributed_optimizer = cuda and dp > 1
        cfg._use_distributed_optimizer_defaulted = True
    if cfg.use_cpu_initialization is None:
        cfg.use_cpu_initialization = not cuda
    if not cuda and not cfg.use_cpu_initialization:
        _fail("use_cpu_initialization", "must be true on CPU")
    if cfg.accumulate_allreduce_grads_in_fp32 is None:
        cfg.accumulate_allreduce_grads_in_fp32 = cfg.bf16
    if cfg.cuda_graph_impl != "none":
        # The captured step must not wait for the host: megatron-core's All-to-All needs its split
        # sizes on the host (EP or expert-TP > 1), token dropping and the allgather dispatcher
        # count tokens there, and a CPU has no graphs at all.
        why = ("needs a GPU" if not cuda else
               "needs expert_model_parallel_size 1 and tensor_model_parallel_size 1 (the "
               "All-to-All split sizes are host values)" if ep * etp * tp > 1 else
               "needs dropless routing (moe_expert_capacity_factor: null)"
               if cfg.moe_expert_capacity_factor is not None else
               "needs moe_token_dispatcher_type: alltoall"
               if cfg.moe_token_dispatcher_type != "alltoall" else None)
        if why:
            _fail("cuda_graph_impl", f"{cfg.cuda_graph_impl!r} {why}")
        if cfg.cuda_graph_warmup_steps < 1:
            _fail("cuda_graph_warmup_steps", f"must be >= 1, got {cfg.cuda_graph_warmup_steps}")
    if cfg.overlap_param_gather:
        # The optimizer step then leaves the all-gather of updated weights to the next forward,
        # so a checkpoint taken in between would hold stale weights (Megatron-LM disables the
        # pre-hooks around saving); not handled here yet.
        _fail("overlap_param_gather", "not supported yet (checkpoints would hold stale weights)")

    # Optimization.
    if cfg.min_lr > cfg.lr:
        _fail("min_lr", f"{cfg.min_lr} is larger than lr={cfg.lr}")
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters
    if cfg.lr_decay_iters < 1:
        _fail("lr_decay_iters", f"must be >= 1, got {cfg.lr_decay_iters}")
    if cfg.lr_warmup_iters >= cfg.lr_decay_iters:
        _fail("lr_warmup_iters",
              f"{cfg.lr_warmup_iters} must be smaller than lr_decay_iters={cfg.lr_decay_iters}")

    # Data.
    if cfg.mock_data and (cfg.data_path or cfg.train_data_path):
        _fail("mock_data", "set either mock_data or data paths, not both")
    if cfg.data_path and (cfg.train_data_path or cfg.valid_data_path):
        _fail("data_path",
              "set either data_path (+ split) or train_data_path/valid_data_path, not both")
    if not (cfg.mock_data or cfg.data_path or cfg.train_data_path):
        _fail("data_path", "no training data: set data_path, train_data_path or mock_data: true")
    if cfg.train_data_path and not cfg.valid_data_path and cfg.eval_iters > 0:
        _fail("valid_data_path",
              "needed for evaluation with train_data_path (or set eval_iters: 0)")
    if cfg.data_path:
        try:
            weights = [float(w) for w in cfg.split.replace("/", ",").split(",")]
        except ValueError:
            weights = []
        if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
            _fail("split", f"{cfg.split!r} must be three weights 'train,valid,test' with train > 0")
        if cfg.eval_iters > 0 and weights[1] <= 0:
            _fail("split", f"{cfg.split!r} leaves no validation data (or set eval_iters: 0)")

    # Checkpointing and logging.
    if cfg.exit_interval is not None and cfg.exit_interval < 1:
        _fail("exit_interval", f"must be >= 1, got {cfg.exit_interval}")
    if cfg.exit_duration_in_mins is not None and not cfg.exit_duration_in_mins > 0:
        _fail("exit_duration_in_mins", f"must be > 0, got {cfg.exit_duration_in_mins}")
    if cfg.save_interval is not None:
        if cfg.save_interval < 1:
            _fail("save_interval", f"must be >= 1, got {cfg.save_interval}")
        if cfg.save is None:
            _fail("save_interval", "needs save: <directory>")
    if cfg.save is not None:
        try:
            import psutil  # noqa: F401
        except ImportError:
            # megatron-core 0.16.1's checkpoint writer processes call psutil outside their error
            # handling: without it dist_checkpointing.save waits forever.
            _fail("save", "megatron-core's checkpoint writer needs psutil: pip install psutil")
    if cfg.profile and not 0 <= cfg.profile_step_start < cfg.profile_step_end:
        _fail("profile_step_end", f"must be > profile_step_start >= 0, got "
              f"{cfg.profile_step_start}..{cfg.profile_step_end}")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        _fail("peak_tflops", f"must be > 0, got {cfg.peak_tflops}")

    # The model itself: megatron-core's and the project's own checks, with their keys mapped back.
    from megatron_bigmac.training.model import model_config

    model_config(cfg, meta=True)
