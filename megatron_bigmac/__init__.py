"""megatron-bigmac: communication-efficient Mixture-of-Experts for megatron-core.

Importing the package applies the megatron-core compatibility shims (see compat.py) once.
"""

from megatron_bigmac import compat as _compat

_compat.apply()

__version__ = "0.1.0"
