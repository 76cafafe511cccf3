"""The project's MoE layers in Megatron-LM's own ``pretrain_gpt.py``.

``patches/megatron-lm/core_r0.16.0/`` changes a few lines of ``pretrain_gpt.py`` to call the
functions here (``scripts/apply_megatron_lm_patch.sh MEGATRON_LM_DIR`` applies it)::

    from megatron_bigmac.megatron_lm import add_bigmac_args, bigmac_builder, help_with_extra_args
    extra_args_provider = partial(add_bigmac_args, then=<Megatron-LM's own provider>)
    help_with_extra_args(extra_args_provider)
    pretrain(..., partial(model_provider, bigmac_builder(gpt_builder)), ...,
             extra_args_provider=extra_args_provider)

and then::

    torchrun ... pretrain_gpt.py --transformer-impl local --num-experts 64 --moe-router-topk 8 \
        --moe-structure bigmac --moe-low-rank-ratio 0.25 [--moe-expert-activation gelu] ...

Without ``--moe-structure`` the patched script builds exactly what the unpatched one builds (the
import of ``megatron_bigmac`` still applies :mod:`megatron_bigmac.compat`'s shims process-wide).
With it, the model config is a :class:`~megatron_bigmac.config.BigMacConfig` made by Megatron-LM's
``core_transformer_config_from_args(args, config_class=BigMacConfig)`` (so every Megatron-LM
argument still applies), and the transformer layer spec is
:func:`~megatron_bigmac.specs.get_moe_gpt_layer_spec`, handed to Megatron-LM's ``gpt_builder``
through its ``--spec`` extension point (``args.spec`` names :data:`LAYER_SPEC` while the model is
built). The builder also makes Megatron-LM's training loop count FLOPs (the logged throughput,
``--log-throughput``) with :func:`num_floating_point_operations`, i.e. ``megatron_bigmac.costs``.
Megatron-LM itself is never imported here: ``bigmac_builder`` takes its builder and config
function as arguments or from the running ``pretrain_gpt.py``.
"""

from __future__ import annotations

import argparse
import sys
import types
from functools import partial
from typing import Callable, Optional

from megatron_bigmac.config import EXPERT_ACTIVATIONS, LATENT_INITS, STRUCTURES

#: The layer spec of the model being built; Megatron-LM's ``--spec`` names it while it builds.
LAYER_SPEC = None

_STRUCTURE_DEFAULT_FFN = "bigmac: h, fine_grained: r*h, vanilla: 4h"


def add_bigmac_args(
    parser: argparse.ArgumentParser, then: Optional[Callable] = None
) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the project's MoE arguments, then ``then(parser)``
    (the script's own provider, e.g. ModelOpt's) when given."""
    group = parser.add_argument_group(title="megatron-bigmac MoE")
    group.add_argument(
        "--moe-structure", choices=STRUCTURES, default=None,
        help="MoE layer structure from megatron-bigmac: bigmac (descend h -> r*h, dispatch and "
             "experts at r*h, ascend r*h -> h), fine_grained (experts h -> r*h -> h) or vanilla "
             "(experts h -> 4h -> h). Every layer is MoE; needs --num-experts. Unset: Megatron-LM's "
             "own layers. Without --moe-ffn-hidden-size the experts' inner width is the "
             f"structure's ({_STRUCTURE_DEFAULT_FFN}), not --ffn-hidden-size.",
    )
    group.add_argument(
        "--moe-low-rank-ratio", type=float, default=0.25,
        help="r: BigMac's latent width and Fine-Grained's expert width are r*hidden_size "
             "(0 < r < 1, r*h an integer). Default 0.25.",
    )
    group.add_argument(
        "--moe-expert-activation", choices=EXPERT_ACTIVATIONS, default="gelu",
        help="Activation inside the experts of --moe-structure. Default gelu.",
    )
    group.add_argument(
        "--moe-latent-init", choices=LATENT_INITS, default="variance_preserving",
        help="How BigMac's shared W_down/W_up start: variance_preserving (N(0, 1/h), "
             "N(0, 1/(r*h)); default) or megatron (init_method, output_layer_init_method, as "
             "megatron-core's latent MoE; trains much slower, see BigMacConfig).",
    )
    if then is not None:
        parser = then(parser)
    return parser


def help_with_extra_args(extra_args_provider: Callable, argv=None) -> None:
    """Print Megatron-LM's --help including ``extra_args_provider``'s arguments, and exit, when
    -h/--help is on the command line. Needed because Megatron-LM 0.16's
    ``inprocess_restart.maybe_wrap_for_inprocess_restart`` parses the command line (with no extra
    arguments) before ``pretrain`` does, so its --help never shows them. Otherwise a no-op."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from megatron.training.arguments import parse_args

        parse_args(extra_args_provider)  # argparse prints the help and raises SystemExit(0)


def _flag_given(flag: str, argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def bigmac_config_from_args(args, config_from_args: Optional[Callable] = None, argv=None):
    """A BigMacConfig from Megatron-LM's parsed arguments (all of them, through Megatron-LM's
    ``core_transformer_config_from_args``). Raises ValueError with a one-line message naming the
    argument for combinations the project does not support."""
    from megatron_bigmac.config import BigMacConfig

    if config_from_args is None:
        from megatron.training.arguments import core_transformer_config_from_args as config_from_args
    if not args.num_experts:
        raise ValueError("--moe-structure needs --num-experts")
    if getattr(args, "multi_latent_attention", False):
        raise ValueError("--moe-structure does not support --multi-latent-attention")
    if getattr(args, "heterogeneous_layers_config_path", None):
        raise ValueError("--moe-structure does not support --heterogeneous-layers-config-path")
    freq = getattr(args, "moe_layer_freq", 1)  # an int, or one 0/1 per layer ("[1,1,...]")
    if not (freq in (1, None) or isinstance(freq, list) and set(freq) == {1}):
        raise ValueError("--moe-structure makes every layer MoE; leave --moe-layer-freq at 1")
    for flag in ("--swiglu", "--quick-geglu", "--squared-relu"):
        # Every layer is MoE, and the experts read only --moe-expert-activation: the flag would
        # change nothing but Megatron-LM's logging (and a gated FLOPs count).
        if getattr(args, flag[2:].replace("-", "_"), False):
            raise ValueError(f"--moe-structure: {flag} does not reach the experts; use "
                             f"--moe-expert-activation ({', '.join(EXPERT_ACTIVATIONS)})")
    head_width = args.hidden_size // args.num_attention_heads
    if getattr(args, "kv_channels", None) not in (None, head_width):
        # megatron_bigmac.costs (the logged FLOPs, the parameter counts) assumes h / heads.
        raise ValueError(f"--moe-structure supports --kv-channels = hidden_size / "
                         f"num_attention_heads ({head_width}) only, got {args.kv_channels}")
    if not _flag_given("--moe-ffn-hidden-size", argv):
        # Megatron-LM's validate_args filled it from --ffn-hidden-size; the structure decides.
        args.moe_ffn_hidden_size = None
    config = config_from_args(args, config_class=BigMacConfig)
    args.moe_ffn_hidden_size = config.moe_ffn_hidden_size  # for Megatron-LM's logging and our FLOPs
    return config


def num_floating_point_operations(args, batch_size, megatron_count: Optional[Callable] = None):
    """Training FLOPs of one iteration of ``batch_size`` sequences from Megatron-LM's parsed
    arguments: with --moe-structure ``megatron_bigmac.costs.training_flops_per_iteration``, else
    ``megatron_count(args, batch_size)`` (Megatron-LM's own). Megatron-LM's formula counts each
    expert as h x moe_ffn_hidden_size, about 2x BigMac's real count (experts at r*h, plus
    W_down/W_up), so its throughput would not compare across the structures."""
    if getattr(args, "moe_structure", None) is None:
        return megatron_count(args, batch_size)
    from megatron_bigmac import costs

    # The config attribute names costs reads, mapped as core_transformer_config_from_args does.
    # (--swiglu and the like are refused with --moe-structure: the experts' gating comes from
    # --moe-expert-activation, which costs reads.)
    config = types.SimpleNamespace(**dict(
        vars(args), num_moe_experts=args.num_experts,
        num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False) else None,
    ))
    shape = costs.MoEModelShape.from_config(config, seq_length=args.seq_length,
                                            padded_vocab_size=args.padded_vocab_size)
    return costs.training_flops_per_iteration(shape, int(batch_size))


def _count_flops_with_costs() -> None:
    """Point Megatron-LM's training loop at :func:`num_floating_point_operations`: it calls
    ``megatron.training.training.num_floating_point_operations`` by its module-level name (for
    the logged TFLOP/s and the checkpointed FLOPs), so replacing that attribute is enough."""
    training = sys.modules.get("megatron.training.training")  # loaded: pretrain() lives there
    if training is None:
        return
    count = training.num_floating_point_operations
    if getattr(count, "func", None) is not num_floating_point_operations:  # not yet replaced
        training.num_floating_point_operations = partial(num_floating_point_operations,
                                                         megatron_count=count)


def bigmac_builder(gpt_builder: Callable, config_from_args: Optional[Callable] = None) -> Callable:
    """Wrap Megatron-LM's ``gpt_builder`` (same signature): with ``--moe-structure`` it gets a
    BigMacConfig and the project's layer spec, and Megatron-LM counts FLOPs with
    :func:`num_floating_point_operations`; without, it is called unchanged."""

    def builder(args, pre_process=True, post_process=True, vp_stage=None, config=None,
                pg_collection=None):
        if getattr(args, "moe_structure", None) is None:
            return gpt_builder(args, pre_process, post_process, vp_stage, config=config,
                               pg_collection=pg_collection)
        from megatron_bigmac.specs import get_moe_gpt_layer_spec

        if config is None or not hasattr(config, "moe_structure"):
            config = bigmac_config_from_args(args, config_from_args)
        if getattr(args, "mtp_num_layers", None):
            raise ValueError("--moe-structure does not support --mtp-num-layers")
        _count_flops_with_costs()
        global LAYER_SPEC
        LAYER_SPEC = get_moe_gpt_layer_spec(
            config, normalization=args.normalization, pg_collection=pg_collection
        )
        user_spec = args.spec
        if user_spec is not None:
            # The user's layers would be built while the run claims a BigMac/Fine-Grained/Vanilla
            # structure (and its expert widths): refuse rather than train something else.
            raise ValueError("--moe-structure does not combine with --spec: drop one of them")
        args.spec = [__name__, "LAYER_SPEC"]
        try:
            return gpt_builder(args, pre_process, post_process, vp_stage, config=config,
                               pg_collection=pg_collection)
        finally:
            args.spec = user_spec

    builder.__name__ = builder.__qualname__ = "bigmac_gpt_builder"
    return builder
