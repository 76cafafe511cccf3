"""Pretrain a GPT MoE model (BigMac, Fine-Grained or Vanilla) from a YAML config.

    torchrun --nproc_per_node 2 -m megatron_bigmac.train --config configs/tiny/bigmac.yaml
    python -m megatron_bigmac.train --config configs/tiny/bigmac.yaml train_iters=20 lr=3e-3

Every ``key=value`` after the config overrides that key. The config is checked completely before
any process group exists; a mistake stops the run with one line naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


#: Import-time warnings of megatron-core about optional accelerators this project does not use.


def quiet_spawned_processes() -> None:
    """megatron-core's checkpoint writer spawns fresh interpreters that re-import it: keep their
    import-time warnings off the console (PYTHONWARNINGS matches the start of the message)."""
    from megatron_bigmac.compat import OPTIONAL_ACCELERATOR_WARNINGS

    filters = [f"ignore:{m}" for m in OPTIONAL_ACCELERATOR_WARNINGS]
    existing = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(([existing] if existing else []) + filters)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_bigmac.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/{tiny,small,paper}/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet_spawned_processes()
    from megatron_bigmac.training.metrics import quiet_known_warnings

    quiet_known_warnings()
    from megatron_bigmac import compat

    compat.apply()  # megatron-core shims, before any of its code runs
    from megatron_bigmac.training.checkpoint import checkpoint_to_resume
    from megatron_bigmac.training.config import ConfigError, load_config
    from megatron_bigmac.training.data import check_prefixes

    try:
        cfg = load_config(args.config, args.overrides)
        # What only reading files can tell, also before any process group exists: a checkpoint
        # that cannot resume this config, data files that are missing.
        resume = checkpoint_to_resume(cfg)
        check_prefixes(cfg, samples=False)
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"config error: {e}", file=sys.stderr)
        return 2

    from megatron_bigmac.training.distributed import destroy_distributed
    from megatron_bigmac.training.trainer import Trainer

    try:
        Trainer(cfg, resume).train()
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
