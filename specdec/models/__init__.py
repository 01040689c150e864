"""Target models: pure-functional Llama-family decoders."""

from specdec.models.config import ModelConfig, RopeScaling, UnsupportedModelError
from specdec.models.llama import forward, lm_head, to_device

__all__ = ["ModelConfig", "RopeScaling", "UnsupportedModelError", "forward", "lm_head", "to_device"]
