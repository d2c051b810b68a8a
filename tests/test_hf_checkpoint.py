"""Merged models as HF checkpoints (sharded safetensors + config.json): ours and transformers load them with
equal logits; tied embeddings are stored once; unmerged models are refused."""
import json

import pytest
import torch
from safetensors import safe_open

from model import apply_lora, load_model
from model.hf_checkpoint import save_hf_checkpoint
from model.lora import merge_lora
from tests.conftest import save_tiny_hf
from tests.test_lora import hf_logits, ids, our_logits, randomize_adapters

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


@pytest.fixture(scope="module")
def hf_tied_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf-tied", seed=1, tie_word_embeddings=True)


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 60_000])
def test_merged_export_loads_in_ours_and_transformers(hf_dir, tmp_path, max_shard_bytes):
    model = apply_lora(load_model(hf_dir), r=4, alpha=8)
    randomize_adapters(model)
    out = save_hf_checkpoint(merge_lora(model), tmp_path / "merged", max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in out.iterdir())
    if max_shard_bytes > 10**6:
        assert files == ["config.json", "model.safetensors"]
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted(["config.json", "model.safetensors.index.json", *shards])
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in merge_lora(model).parameters())
    x = ids(seed=5)
    expected = our_logits(model, x)
    torch.testing.assert_close(our_logits(load_model(out), x), expected, rtol=0, atol=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(hf_logits(hf, x), expected, rtol=0, atol=1e-4)


def test_export_of_tied_model_omits_lm_head(hf_tied_dir, tmp_path):
    model = apply_lora(load_model(hf_tied_dir), r=4, targets=["q_proj", "up_proj"])
    randomize_adapters(model)
    merged = merge_lora(model)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    out = save_hf_checkpoint(merged, tmp_path / "m")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    x = ids(seed=6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(hf_logits(hf, x), our_logits(model, x), rtol=0, atol=1e-4)


def test_export_refuses_unmerged_models(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="merge_lora"):
        save_hf_checkpoint(apply_lora(load_model(hf_dir), r=2), tmp_path / "x")
    assert not (tmp_path / "x").exists()
