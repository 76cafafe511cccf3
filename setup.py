from setuptools import find_packages, setup

setup(
    name="megatron-bigmac",
    version="0.1.0",
    description="Communication-efficient MoE (BigMac, Fine-Grained, Vanilla) for megatron-core",
    packages=find_packages(include=["megatron_bigmac", "megatron_bigmac.*"]),
    package_data={"megatron_bigmac": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first (CPU wheel here, CUDA build on GPUs); any 2.6+ has _grouped_mm.
        "torch>=2.6",
        # 0.16.1 is the newest release that installs on Python 3.11; compat.py is gated on it.
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
        # dist_checkpointing's async writer needs psutil; without it megatron-core 0.16 hangs on save.
        "psutil",
        # GPT-2 BPE for the trainer and data preparation (HF `tokenizers` is the checked fallback).
        "tiktoken",
    ],
    extras_require={
        "data": ["datasets", "tokenizers"],
        "report": ["matplotlib"],
        "test": ["pytest"],
    },
)
