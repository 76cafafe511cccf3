"""The ONLY place that works around megatron-core / PyTorch versions.

Every shim below names the versions it is for and why it exists. `apply()` is idempotent and is
called once when `megatron_bigmac` is imported. Shims split in two groups:

* everywhere (GPU too): bugs of megatron-core 0.16.x that bite without transformer-engine;
* CPU-only hosts (no CUDA device): megatron-core's MoE path assumes CUDA for streams, RNG and
  allocation. These let the stock code and ours run on CPU with gloo (tests, CI, the README
  command). None of them is active when `torch.cuda.is_available()`.

See ../shared/design/MCORE_CPU.md for the measurements behind each one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

#: megatron-core release lines these shims were written against (and tested on).
SUPPORTED_MCORE = ("0.16.",)

_applied = False

#: How megatron-core 0.16 announces at import that transformer-engine / apex are absent (their
#: starts, as `warnings` filters and PYTHONWARNINGS match them). Both are optional here.
OPTIONAL_ACCELERATOR_WARNINGS = ("Transformer Engine and Apex are not installed",
                                 "Apex is not installed")


def mcore_version() -> str:
    return importlib.metadata.version("megatron-core")


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def apply() -> None:
    """Apply every shim that this megatron-core / host needs. Safe to call twice."""
    global _applied
    if _applied:
        return
    version = mcore_version()
    if not version.startswith(SUPPORTED_MCORE):
        # Other releases may have fixed or moved what these shims patch: never patch them blindly.
        logger.warning(
            "megatron-core %s is not one of %s: compatibility shims are not applied", version,
            SUPPORTED_MCORE,
        )
        _applied = True
        return
    _quiet_optional_accelerator_warnings()
    _bind_te_general_gemm()
    _all_to_all_int_splits()
    _gloo_uneven_all_gather()
    _quiet_unknown_mlp_warning()
    _distributed_optimizer_step_per_param()
    _distributed_optimizer_load_template()
    _foreach_multi_tensor_ops()
    if cpu_only():
        _cpu_current_device()
        _cpu_cuda_device_requests()
        _cpu_cuda_synchronize()
        _cpu_dispatcher_streams()
        _cpu_rng_tracker()
    _applied = True


# --------------------------------------------------------------------------------------------
# Everywhere
# --------------------------------------------------------------------------------------------


def _quiet_optional_accelerator_warnings() -> None:
    """0.16.x warns at import, module by module, that transformer-engine and apex are absent and
    it falls back to torch. For this project that is the designed path (both are optional
    accelerators), so those eight lines are noise in every command's output."""
    for message in OPTIONAL_ACCELERATOR_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def _bind_te_general_gemm() -> None:
    """0.16.x: `moe_utils.RouterGatingLinearFunction` tests `te_general_gemm is not None`, but the
    name is only bound when transformer-engine imports, so the router raises NameError without TE
    (on CPU and GPU alike). Bind it to None so the router takes its torch matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _as_int_list(splits):
    if splits is None or isinstance(splits, list):
        return splits
    if torch.is_tensor(splits):
        return splits.tolist()
    return [int(s) for s in splits]


def _all_to_all_int_splits() -> None:
    """0.16.x: the alltoall dispatcher hands split sizes to `_AllToAll` as CPU tensors (CPU) or
    numpy arrays (GPU); torch>=2.13's `all_to_all_single` binding accepts only sequences of ints.
    Converting to lists of ints is exact, so it is applied on every device."""
    from megatron.core.tensor_parallel import mappings

    forward = mappings._AllToAll.forward

    def forward_with_int_splits(ctx, group, input, output_split_sizes, input_split_sizes):
        return forward(
            ctx, group, input, _as_int_list(output_split_sizes), _as_int_list(input_split_sizes)
        )

    mappings._AllToAll.forward = staticmethod(forward_with_int_splits)


def _gloo_uneven_all_gather() -> None:
    """0.16.x: with expert tensor parallelism the alltoall dispatcher all-gathers a different
    number of tokens from each rank (`_gather_along_first_dim(..., output_split_sizes)`), which
    gloo rejects ("invalid tensor size"); NCCL accepts it. On gloo groups only, pad every rank's
    rows to the largest split, gather evenly, and drop the padding: the same result. (The
    backward, an uneven reduce-scatter, works on gloo as it is.)"""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather = mappings._gather_along_first_dim

    def gather_uneven_on_gloo(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or dist.get_backend(group) != "gloo":
            return gather(input_, group, output_split_sizes, use_global_buffer)
        rows = max(output_split_sizes)
        padded = input_.new_zeros((rows,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = gather(padded, group).split(rows)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, output_split_sizes)])

    mappings._gather_along_first_dim = gather_uneven_on_gloo


class _DropUnknownMoELayerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


def _quiet_unknown_mlp_warning() -> None:
    """0.16.x: TransformerLayer recognises MoE layers by identity (`module in (MoELayer, ...)`),
    so it logs "Unknown MLP type" once per layer for MoELayer subclasses such as BigMacMoELayer,
    which get their process groups from the spec's params instead (specs.get_moe_module_spec)."""
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        _DropUnknownMoELayerWarning()
    )


def _distributed_optimizer_step_per_param() -> None:
    """0.16.x without transformer-engine/apex (torch Adam keeps a per-parameter `step`):
    `DistributedOptimizer.load_state_dict` puts ONE shared `step` tensor, taken from the saved
    param groups, into every parameter's state, and then `load_parameter_state_from_*` copies the
    load template's per-parameter state over it, so the step restored is the template's (1, from
    the dummy step that builds it) instead of the saved iteration count; torch's foreach Adam then
    also increments that one tensor once per parameter. Measured on 2 gloo ranks: a resumed run
    matched the uninterrupted one at the first step and drifted from the second. Restore the
    saved count, one tensor per parameter."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # fused Adam keeps `step` in the param groups, which load correctly
    load_state_dict = distrib_optimizer.DistributedOptimizer.load_state_dict

    def load_state_dict_with_saved_steps(self, state_dict):
        load_state_dict(self, state_dict)
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            return
        saved = float(steps.pop())
        fused = self.optimizer.defaults.get("fused")
        for param, state in self.optimizer.state.items():
            if torch.is_tensor(state.get("step")):
                # torch's fused Adam keeps the count on the parameter's device, foreach's on
                # the host (training/optimizer.py switches to fused).
                device = param.device if fused else state["step"].device
                state["step"] = torch.tensor(saved, dtype=torch.float32, device=device)

    distrib_optimizer.DistributedOptimizer.load_state_dict = load_state_dict_with_saved_steps


def _distributed_optimizer_load_template() -> None:
    """0.16.x without transformer-engine/apex: `DistributedOptimizer.sharded_state_dict(...,
    is_loading=True)` starts with `self.load_state_dict(self.state_dict())`, and `state_dict()`
    asserts that torch's Adam state holds one 'step' (optimizer/distrib_optimizer.py,
    state_dict). Before the first step that state is empty, so a fresh optimizer cannot build the
    template a checkpoint loads into: this trainer's resume and Megatron-LM's `--load` with
    `--use-distributed-optimizer` (its stock models too) stop at that assert. Fill the state
    first with megatron-core's own `_init_optimizer_states_with_dummy_values` (one zero-gradient
    step), as its fsdp_dtensor path does; the checkpoint overwrites everything that step set."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # fused Adam keeps `step` in the param groups: no per-parameter state to assert on
    sharded_state_dict = distrib_optimizer.DistributedOptimizer.sharded_state_dict

    def sharded_state_dict_with_state(self, model_sharded_state_dict=None, is_loading=False,
                                      *args, **kwargs):
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args,
                                  **kwargs)

    distrib_optimizer.DistributedOptimizer.sharded_state_dict = sharded_state_dict_with_state


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract (a [1] fp32 tensor, None) with torch's foreach
    kernels: the norm stays on the device, no host round trip."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=torch.cuda.current_device()), None
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    return torch.linalg.vector_norm(norms).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract (dst = src * scale, dtypes may differ) in a few
    foreach launches instead of two kernels per tensor."""
    sources, destinations = tensor_lists[0], tensor_lists[1]
    if not sources:
        return
    if scale != 1.0:
        sources = torch._foreach_mul(sources, scale)
    torch._foreach_copy_(destinations, sources)


def _foreach_multi_tensor_ops() -> None:
    """0.16.x without transformer-engine/apex falls back to `local_multi_tensor_l2_norm`, which
    builds `torch.tensor([...])` from one device scalar per gradient: a host-device sync per
    parameter (hundreds per step in gradient clipping), then a `float()` of the total; and to
    `local_multi_tensor_scale`, two kernels per tensor for clipping and for copying fp32 main
    weights into the bf16 model after every step. Replace both, where they are the fallbacks,
    by torch's foreach kernels (same results; tests/test_moe_core.py checks them)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale


# --------------------------------------------------------------------------------------------
# CPU-only hosts
# --------------------------------------------------------------------------------------------


def _cpu_current_device() -> None:
    """0.16.x allocates communication buffers and moves router weights with
    `device=torch.cuda.current_device()` (tensor_parallel.mappings, global memory buffer,
    Router.gating, ...), which raises on a host without CUDA. On such a host the only device is
    the CPU, so answer that; nothing else in torch is changed."""
    torch.cuda.current_device = lambda: torch.device("cpu")


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
}


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int device is a GPU index


class _CudaRequestsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_cuda_device_requests() -> None:
    """0.16.x hard-codes CUDA outside the MoE layer too: `device='cuda'` tensors and `.cuda()`
    in the pipeline schedules (the token count), optimizer, grad scaler, grad clipping, DDP
    buffers and dist_checkpointing exchange, and
    `param.type() == 'torch.cuda.FloatTensor'` checks in the optimizer and clip_grads. On a host
    with no CUDA, "cuda" can only mean "the accelerator we run on", i.e. the CPU: a torch-function
    mode (this process's main thread) places such requests on the CPU and reports CPU float
    tensors under their CUDA type names. Nothing changes where CUDA exists."""
    _CudaRequestsOnCpu().__enter__()


def _cpu_cuda_synchronize() -> None:
    """0.16.x: dist_checkpointing's `filesystem_async.preload_tensors` calls
    `torch.cuda.synchronize()` after copying tensors to host. With no device there is nothing to
    wait for."""
    torch.cuda.synchronize = lambda device=None: None


class _NullStream:
    """Stands in for the dispatcher's D2H side stream on CPU, where tensors already live on host."""

    def wait_stream(self, stream):
        pass

    def record_event(self):
        return self

    def synchronize(self):
        pass


def _cpu_dispatcher_streams() -> None:
    """0.16.x: `MoEAlltoAllTokenDispatcher.__init__` creates `torch.cuda.Stream()` and
    `_maybe_dtoh_and_synchronize` copies routing metadata to host on it. On CPU the metadata is
    already on host: give the class a null stream and make the D2H step a no-op."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NullStream()

    def host_metadata_already(self, point, tokens_per_expert=None):
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = host_metadata_already


def _cpu_rng_tracker() -> None:
    """0.16.x: the model-parallel RNG tracker (`model_parallel_cuda_manual_seed`,
    `get_cuda_rng_tracker().fork()`) reads and writes the CUDA generator. On CPU, back the same
    tracker with the CPU generator so that per-TP/EP-rank dropout streams keep their meaning (and
    no 'CPU RNG state changed within GPU RNG context' warning is raised)."""
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    initialize = mcore_random.initialize_rng_tracker

    def initialize_cpu_rng_tracker(*args, **kwargs):
        initialize(*args, **kwargs)
        if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()

    mcore_random.initialize_rng_tracker = initialize_cpu_rng_tracker
    # model_parallel_cuda_manual_seed seeds CUDA first; on CPU that is a lazy no-op, keep it.
