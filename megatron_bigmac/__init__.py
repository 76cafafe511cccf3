"""megatron-bigmac: communication-efficient Mixture-of-Experts for megatron-core.

Importing the package applies the megatron-core compatibility shims (compat.py) once, so that
megatron-core calls made before any of our modules (e.g. model_parallel_cuda_manual_seed on a
CPU host) already see them.
"""

from megatron_bigmac import compat as _compat

_compat.apply()

__version__ = "0.1.0"
