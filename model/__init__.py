"""The network in plain PyTorch (no process groups): see DESIGN §2."""

from .config import ModelConfig
from .transformer import MiniMaxForCausalLM, ModelOutput

__all__ = ["MiniMaxForCausalLM", "ModelConfig", "ModelOutput"]
