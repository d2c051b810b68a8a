"""LoRA layers, the swap and the merge. Adapter files in PEFT's layout: test_adapter.py; merged HF checkpoints:
test_hf_checkpoint.py (both use the tiny-model helpers below)."""
import logging
import math

import pytest
import torch
import torch.nn as nn

from engine.report import lora_report
from model import load_model
from model.lora import LoRALinear, apply_lora, lora_layer, lora_state_dict, merge_lora
from model.quant import Linear4bit
from tests.conftest import save_tiny_hf

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


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


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_forward_and_gradients_equal_the_plain_expression(quantized, dtype):
    """The layer adds the branch inside one GEMM (addmm, alpha=scaling); values and gradients (input, A, B) are
    those of base(x) + (x A^T B^T) * scaling computed op by op, and in bf16 no further from the fp32 truth."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False)
    if quantized:
        base = Linear4bit.from_weight(base.weight, compute_dtype=dtype)
    layer = lora_layer(base, r=4, alpha=8).to(dtype)
    nn.init.normal_(layer.lora_B.weight)

    def run(fn, x_dtype):
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(x_dtype).requires_grad_()
        layer.zero_grad()
        y = fn(x)
        y.float().pow(2).sum().backward()
        return y.float(), x.grad.float(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()

    def plain(x):
        h = x @ layer.lora_A.weight.to(x.dtype).T @ layer.lora_B.weight.to(x.dtype).T
        return base(x) + h * layer.scaling

    def truth(x):  # the same inputs, everything after them in fp32
        w = layer.dequantize(torch.float32) if quantized else layer.weight.float()
        xf = x.float()
        return xf @ w.T + xf @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scaling

    ours, ref, exact = run(layer, dtype), run(plain, dtype), run(truth, dtype)
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)
    else:
        for a, b, t in zip(ours, ref, exact):
            err, ref_err = (a - t).abs().max(), (b - t).abs().max()
            assert err <= 1.5 * ref_err + 1e-3 * t.abs().max(), (err, ref_err)


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
