"""megatron-bigmac: communication-efficient Mixture-of-Experts for megatron-core.

The megatron-core compatibility shims (compat.py) are applied by the modules that build models
(config.py and everything importing it), so light entry points such as data preprocessing do not
pay for importing megatron-core's model code.
"""

__version__ = "0.1.0"
