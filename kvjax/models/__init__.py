"""Models: the Llama family and the Hugging Face checkpoint loader."""

from kvjax.models.hf import load, load_config, save
from kvjax.models.llama import Llama, LlamaConfig, from_hf_config

__all__ = ["Llama", "LlamaConfig", "from_hf_config", "load", "load_config", "save"]
