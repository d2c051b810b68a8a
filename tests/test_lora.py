"""LoRA layers, PEFT-format adapters both ways (PEFT and transformers are the reference), merged HF export."""
import json
import logging
import math
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from model import load_model
from model.lora import (LoRALinear, apply_lora, load_adapter, lora_layer, lora_report, lora_state_dict, merge_lora,
                        save_adapter, save_hf_checkpoint)
from model.quant import Linear4bit
from tests.conftest import save_tiny_hf

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


@pytest.fixture(scope="module")
def hf_tied_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf-tied", seed=1, tie_word_embeddings=True)


def ids(seed=0, B=2, T=12, vocab=320):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def our_logits(model, x):
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_layer_keeps_base_keys_and_tensors(quantized):
    base = nn.Linear(64, 128, bias=False)
    if quantized:
        base = Linear4bit.from_weight(base.weight)
    before = base.state_dict()
    layer = lora_layer(base, r=4, alpha=8)
    sd = layer.state_dict()
    assert set(sd) == set(before) | {"lora_A.weight", "lora_B.weight"}
    for k, v in before.items():
        assert sd[k].data_ptr() == v.data_ptr(), "the base tensors are reused, not copied"
    assert sd["lora_A.weight"].shape == (4, 64) and sd["lora_B.weight"].shape == (128, 4)
    assert sd["lora_A.weight"].dtype == sd["lora_B.weight"].dtype == torch.float32
    # PEFT's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0: starts at the base
    assert sd["lora_A.weight"].abs().max() <= 1 / math.sqrt(64) and sd["lora_A.weight"].std() > 0
    assert not sd["lora_B.weight"].any()
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_is_base_plus_scaled_BA(use_rslora):
    base = nn.Linear(64, 32, bias=True)
    layer = lora_layer(base, r=4, alpha=6, use_rslora=use_rslora)
    nn.init.normal_(layer.lora_B.weight)
    scaling = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert layer.scaling == scaling
    x = torch.randn(5, 64)
    ref = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * scaling
    torch.testing.assert_close(layer(x), ref)


def test_dropout_applies_to_the_lora_branch_only():
    base = nn.Linear(64, 32, bias=False)
    layer = lora_layer(base, r=4, alpha=8, dropout=0.9).train()
    x = torch.randn(8, 64)
    assert torch.equal(layer(x), base(x))  # B = 0: whatever the dropout mask, the base output is untouched
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # random masks in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_adapters_stay_float32_under_dtype_casts(hf_dir):
    model = apply_lora(load_model(hf_dir), r=4, targets=["q_proj"])
    model.to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    out = model(ids())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- PEFT round trips


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_in_peft_with_equal_logits(hf_dir, tmp_path, use_rslora):
    ours = apply_lora(load_model(hf_dir), r=4, alpha=8, use_rslora=use_rslora)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model=str(hf_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    torch.testing.assert_close(our_logits(ours, x), hf_logits(peft_model, x), rtol=0, atol=1e-4)
    # the adapter is not a no-op: the logits moved away from the base model's
    assert (our_logits(load_model(hf_dir), x) - our_logits(ours, x)).abs().max() > 1e-2


def test_peft_adapter_loads_into_ours_with_equal_logits(hf_dir, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_model(hf_dir), tmp_path / "adapter")  # applies LoRA from adapter_config.json
    assert sorted(ours.lora_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert ours.lora_config["r"] == 8 and len(lora_state_dict(ours)) == 2 * 3 * 2
    x = ids(seed=3)
    torch.testing.assert_close(our_logits(ours, x), hf_logits(peft_model.eval(), x), rtol=0, atol=1e-4)


def test_adapter_files_hold_only_lora_weights_in_peft_layout(hf_dir, tmp_path):
    model = apply_lora(load_model(hf_dir), r=4, alpha=8, dropout=0.05)
    save_adapter(model, tmp_path / "a", base_model="org/base")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    pattern = re.compile(r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight")
    assert keys and all(pattern.fullmatch(k) for k in keys)
    assert len(keys) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (4, 128)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] == (64, 4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    assert sorted(cfg["target_modules"]) == sorted(ALL)
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["use_rslora"] is False
    assert cfg["fan_in_fan_out"] is False and cfg["inference_mode"] is True
    peft.LoraConfig.from_pretrained(tmp_path / "a")  # PEFT accepts every field


def test_saving_again_replaces_the_adapter_directory(hf_dir, tmp_path):
    model = apply_lora(load_model(hf_dir), r=4, targets=["q_proj"])
    save_adapter(model, tmp_path / "a")
    randomize_adapters(model, seed=5)
    save_adapter(model, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directories left behind
    again = load_adapter(load_model(hf_dir), tmp_path / "a")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(again)[k], v)


def test_load_adapter_shape_mismatch_is_a_one_line_error_naming_the_key(hf_dir, tmp_path):
    save_adapter(apply_lora(load_model(hf_dir), r=4), tmp_path / "a")
    model = apply_lora(load_model(hf_dir), r=8)
    with pytest.raises(ValueError) as e:
        load_adapter(model, tmp_path / "a")
    msg = str(e.value)
    assert "\n" not in msg and "adapter_model.safetensors" in msg
    assert re.search(r"base_model\.model\.model\.layers\.\d+\.\w+\.\w+_proj\.lora_[AB]\.weight has shape", msg)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_adapter(model, tmp_path / "nowhere")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("r"), "r must be a positive integer"),
    (lambda c: c.update(r="4"), "r must be a positive integer"),
    (lambda c: c.update(r=1 << 30), "has rank 4"),  # refused from the header, before allocating anything
    (lambda c: c.update(lora_alpha=None), "lora_alpha must be a positive number"),
])
def test_bad_adapter_config_is_a_one_line_error_before_allocating(hf_dir, tmp_path, edit, match):
    save_adapter(apply_lora(load_model(hf_dir), r=4), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(load_model(hf_dir), tmp_path / "a")
    assert "\n" not in str(e.value) and "adapter_config.json" in str(e.value)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_adapter(load_model(hf_dir), tmp_path / "a")


# ---------------------------------------------------------------- NF4 + LoRA


def test_nf4_model_with_lora_trains_only_adapters_and_reports_them(hf_dir):
    model = apply_lora(load_model(hf_dir, quantize="nf4"), r=4, alpha=8)
    lora = lora_state_dict(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    randomize_adapters(model)
    model.train()
    model(ids()).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in lora)
    # report: r*(in+out) per adapted layer; in a tiny layer 64 in/128 out ... all 14 layers
    per_block = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    quant_weights = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    model.eval()  # eval mode must not hide the adapters
    report = lora_report(model)
    assert f"trainable  {2 * per_block:>13,} params" in report
    assert f"quantized  {quant_weights:>13,} weights" in report
    held = sum(m.nbytes() for m in model.modules() if isinstance(m, Linear4bit))
    assert held == quant_weights // 2 + quant_weights // 64 * 4
    assert f"ratio {held / (2 * quant_weights):.3f}" in report  # 0.281: about a quarter of fp16


# ---------------------------------------------------------------- merge and export


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merged_model_equals_base_plus_adapter(hf_dir, quantize):
    model = apply_lora(load_model(hf_dir, quantize=quantize), r=4, alpha=8)
    randomize_adapters(model)
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in merged.modules())
    assert all(type(m.model.layers[0].self_attn.q_proj) is nn.Linear for m in [merged])
    x = ids(seed=4)
    torch.testing.assert_close(our_logits(merged, x), our_logits(model, x), rtol=0, atol=1e-5)


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
