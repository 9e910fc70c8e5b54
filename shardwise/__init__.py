"""shardwise: one Hydra-configured trainer for distributed (MoE-first) LLM pretraining."""
__version__ = "0.1.0"
