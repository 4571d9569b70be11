"""The network in plain PyTorch (no process groups): see docs/architecture.md, 'The model'."""

from .config import ModelConfig
from .transformer import MiniMaxForCausalLM, ModelOutput

__all__ = ["MiniMaxForCausalLM", "ModelConfig", "ModelOutput"]
