"""What a checkpoint is and how it computes. `model` never imports `data` or `engine`."""
from .config import LlamaConfig
from .llama import Llama
from .load import load_model, load_tokenizer

__all__ = ["LlamaConfig", "Llama", "load_model", "load_tokenizer"]
