"""A full-precision Llama -> a Hugging Face checkpoint directory: config.json + safetensors in HF's layout
(DESIGN.md), readable by our loader and by transformers' AutoModelForCausalLM. Sharded as
model-0000i-of-0000N.safetensors with model.safetensors.index.json when larger than max_shard_bytes.

Two users: engine/export.py (a merged model, merge_lora's output) and the benchmark (a random-weight model for
the transformers side to load): `save_hf_checkpoint(Llama(cfg).to(dtype), path)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .config import LlamaConfig
from .files import atomic_dir
from .lora import LoRALinear
from .quant import Linear4bit


def save_hf_checkpoint(model: nn.Module, dir, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """`model`: a Llama of plain nn.Linear layers (merge_lora(model) for a trained one), on any device and in
    any one dtype, which transformers then loads by default. Written atomically; returns Path(dir)."""
    if any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules()):
        raise ValueError("save_hf_checkpoint: the model has LoRA or 4-bit layers; export merge_lora(model)")
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF omits the tied copy (safetensors refuses shared storage anyway)
    return write_hf_checkpoint(sd, model.config, dir, max_shard_bytes)


def write_hf_checkpoint(state_dict: dict[str, torch.Tensor], config: LlamaConfig, dir,
                        max_shard_bytes: int = 2 * 1024**3) -> Path:
    """The files themselves, for a state dict already under HF's keys: shards filled in key order up to
    max_shard_bytes (a tensor larger than that gets a shard of its own), the index, and config.json."""
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    shards, size = [{}], 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    dtypes = {v.dtype for v in tensors.values()}
    hf_config = config.to_hf_dict()
    if len(dtypes) == 1:  # transformers loads in this dtype by default
        hf_config["torch_dtype"] = hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    with atomic_dir(dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(dir)
