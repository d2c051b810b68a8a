"""What a checkpoint is and how it computes. `model` never imports `data` or `engine`."""
from .adapter import load_adapter, save_adapter
from .config import LlamaConfig
from .llama import Llama
from .load import load_model, load_tokenizer
from .lora import apply_lora

__all__ = ["LlamaConfig", "Llama", "load_model", "load_tokenizer", "apply_lora", "save_adapter", "load_adapter"]
