"""shardwise: one Hydra-configured trainer for distributed (MoE-first) LLM pretraining."""
from setuptools import find_packages, setup

setup(
    name="shardwise",
    version="0.1.0",
    description="Distributed LLM/MoE training: TP/SP, PP, EP, hierarchical ZeRO, offload, fault tolerance",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["shardwise", "shardwise.*"]),
    install_requires=[
        # The exact torch is pinned in constraints.txt (pip install ... -c constraints.txt).
        "torch>=2.6",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        # Megatron's indexed dataset / GPTDataset / blending run on CPU and read users' existing data.
        "megatron-core>=0.12",
        "numpy",
        "rich>=13",
        "tqdm",
    ],
    extras_require={
        # transformers/safetensors: tests/test_hf.py compares against transformers' Llama/Mixtral.
        "dev": ["pytest>=7", "pytest-timeout", "tokenizers", "wandb", "matplotlib", "transformers>=5", "safetensors>=0.4"],
        # Plots of scripts/bench/ (JSON is written without it).
        "bench": ["matplotlib"],
        "wandb": ["wandb"],
        # Also the backend="deepspeed" offload I/O engine: its libaio op additionally needs the system
        # package libaio-dev (apt-get install -y libaio-dev) and JIT-builds on first use.
        "deepspeed": ["deepspeed>=0.16"],
        # megatron-core is already a base dependency (datasets); the extra is kept so that
        # `pip install shardwise[megatron]` in existing job scripts keeps working.
        "megatron": ["megatron-core>=0.12"],
        # Hugging Face tokenizer.json support for scripts/preprocess_data.py and weight interop.
        # (transformers does not depend on torch, so it cannot pull another one; >=5: the tested layouts.)
        "hf": ["tokenizers", "transformers>=5", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "shardwise-launch=shardwise.launch:main",
            "shardwise-validate=shardwise.recipe_check:main",
            "shardwise-export=shardwise.export:main",
            "shardwise-generate=shardwise.generate:main",
        ]
    },
)
