"""What a GPU changes, checked on each device this machine has (tests/conftest.py DEVICES: the CPU here and in CI,
CUDA where torch sees a GPU; .ci/gpu_measure.sh runs the CUDA cases on the lent GPU with `pytest -k cuda`). Each
holds the device's kernels to a reference computed another way: bitsandbytes' NF4 kernels to our torch code, a
LoRA layer under autocast to the fp32 product, packed rows to the examples run alone, the device's AdamW with
loss scaling to the per-parameter loop, a training run with offloaded checkpoints and MLP tiles to a plain run
on the CPU."""
import contextlib

import pytest
import torch
import torch.nn as nn

from engine.config import TrainConfig
from engine.loss import CausalLMLoss

from .conftest import CUDA, DEVICES
from .test_packed_attention import lora_model, packed_batch

HALF = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b, in norm, computed in fp32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_kernels_on_the_device_equal_the_torch_reference_and_bitsandbytes(device):
    """Our quantization gives bitsandbytes' bytes on the device (its CUDA kernel there), and the dequantize the
    model runs (bitsandbytes' kernel: model.quant.dequant_path) gives the torch reference's values bit for bit,
    in every compute dtype; with double quantisation, to fp32 rounding of the decoded block scales."""
    import bitsandbytes.functional as bnbf

    from model.quant import absmax_of, dequant_path, dequantize_nf4, nf4_dequantize, nf4_quantize, quantize_absmax

    for shape in ((256, 512), (576, 1536)):
        g = torch.Generator().manual_seed(shape[0])
        w32 = torch.randn(shape, generator=g) * 0.05
        for wdtype in HALF.values():
            w = w32.to(wdtype).to(device)
            packed, absmax = nf4_quantize(w)
            q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
            assert packed.device == w.device
            assert torch.equal(packed.view(-1), q.view(-1)) and torch.equal(absmax, state.absmax), (shape, wdtype)
            for out in HALF.values():
                assert dequant_path(shape, 64, device, out).kernel == "bitsandbytes"
                fast = dequantize_nf4(packed, (absmax,), shape, 64, out)
                assert fast.dtype == out and fast.device == w.device
                assert torch.equal(fast, nf4_dequantize(packed, absmax, shape, 64, out)), (shape, wdtype, out)
        dq = quantize_absmax(absmax)
        torch.testing.assert_close(dequantize_nf4(packed, dq, shape, 64, torch.float32),
                                   nf4_dequantize(packed, absmax_of(dq), shape, 64, torch.float32), rtol=1e-6, atol=0)


# largest relative errors measured on the CPU (2026-12-07): fp32 0 (the same operations), bf16 3.7e-3, fp16 4.8e-4
LAYER_TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 3e-3}


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_nf4_layer_on_the_device_is_the_fp32_product(device, precision):
    """A LoRA layer on an NF4 base under the device's autocast: its output and the gradients of its input and of
    both fp32 adapter matrices, against x W^T + s (x A^T) B^T computed by autograd in fp32 from the same
    dequantized W."""
    from model.lora import lora_layer
    from model.quant import quantize_linear

    torch.manual_seed(0)
    layer = lora_layer(quantize_linear(nn.Linear(512, 256, bias=False)), r=8, alpha=16.0).to(device)
    nn.init.normal_(layer.lora_B.weight, 0, 0.1)  # B starts at zero: A's gradient would be zero and prove nothing
    x = torch.randn(3, 10, 512, device=device, requires_grad=True)
    dy = torch.randn(3, 10, 256, device=device)
    dtype = HALF[precision]
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        y = layer(x)
    assert y.dtype == dtype
    (y.float() * dy).sum().backward()

    w = layer.dequantize(torch.float32)
    xr, a, b = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A.weight, layer.lora_B.weight))
    yr = xr @ w.t() + layer.scaling * (xr @ a.t()) @ b.t()
    (yr * dy).sum().backward()
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32  # fp32 masters
    for name, got, want in (("output", y, yr), ("input grad", x.grad, xr.grad),
                            ("A grad", layer.lora_A.weight.grad, a.grad), ("B grad", layer.lora_B.weight.grad, b.grad)):
        assert rel(got, want) < LAYER_TOL[precision], (name, rel(got, want))


def _loss_and_grads(model, dtype, ids, labels, pos=None, seg=None, segments=True):
    model.segment_attention = segments
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = CausalLMLoss(model, chunk=16)(ids, labels, position_ids=pos, segment_ids=seg)
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# (device, GPU capability to dispatch for): on a GPU also the T4's path (sm 7.5: k/v copied to every head, which
# model.llama.attention_path decides from the reported capability, and SDPA's memory-efficient kernel, the only
# fused one a T4 has, forced here since a newer GPU would pick flash)
PATHS = [pytest.param("cpu", None, id="cpu"), pytest.param("cuda", None, marks=CUDA, id="cuda"),
         pytest.param("cuda", (7, 5), marks=CUDA, id="cuda-sm75")]
# relative error per tensor; measured on the CPU (2026-12-07), the largest of each precision: fp32 9.4e-7, bf16
# 2.6e-2 (the bf16 examples alone are that far from fp32 themselves), fp16 3.5e-3. One segment id over the whole
# row instead (the examples attend to each other): 1.45. fp32 leaves room for CUDA's kernels to sum differently.
PACKED_TOL = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.02}


# every path in every precision it runs in: a T4 (sm 7.5) has no bf16
PACKED_CASES = [pytest.param(dev, cap, prec, marks=p.marks, id=f"{p.id}-{prec}")
                for p in PATHS for dev, cap in [p.values] for prec in HALF if not (cap and prec == "bf16")]


@pytest.mark.parametrize("device,capability,precision", PACKED_CASES)
def test_packed_rows_on_the_device_equal_the_examples_run_alone(device, capability, precision, monkeypatch):
    """A packed row (four examples and padding) through the segment path and through the (T, T) mask: loss and
    LoRA gradients equal the sum over the examples run alone, in fp32 and under bf16 / fp16 autocast (there
    also within the half-precision error of the fp32 result). A row leaking attention across examples is off
    by far more."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.llama import attention_path

    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        path = attention_path(4, 2, device, packed=True)
        assert path.kernel == "efficient" and path.expand_kv
    model = lora_model().to(device)
    lengths = [6, 1, 4, 5]
    ids, labels, pos, seg = (t.to(device) for t in packed_batch([lengths], 20))  # 4 tokens of padding
    dtype = HALF[precision]

    def alone(dtype):
        loss, grads, t = 0.0, {}, 0
        for n in lengths:
            part_loss, part = _loss_and_grads(model, dtype, ids[:, t:t + n], labels[:, t:t + n])
            loss = loss + part_loss
            grads = {k: grads.get(k, 0) + g for k, g in part.items()}
            t += n
        return loss, grads

    kernels = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if capability else contextlib.nullcontext()
    with kernels:
        ref_loss, ref = alone(torch.float32)
        half_loss, half = alone(dtype)
        runs = {segments: _loss_and_grads(model, dtype, ids, labels, pos, seg, segments=segments)
                for segments in (True, False)}
    tol = PACKED_TOL[precision]
    for segments, (loss, grads) in runs.items():
        assert rel(loss, half_loss) < tol and rel(loss, ref_loss) < tol, (segments, loss, half_loss, ref_loss)
        assert grads.keys() == ref.keys() and ref
        for name in ref:
            assert rel(grads[name], half[name]) < tol, (segments, name, rel(grads[name], half[name]))
            assert rel(grads[name], ref[name]) < tol, (segments, name, rel(grads[name], ref[name]))


@pytest.mark.parametrize("device", DEVICES)
def test_the_devices_adamw_with_loss_scaling_equals_the_per_parameter_loop(device):
    """engine.step.make_optimizer's optimizer on the device (on CUDA one fused kernel, to which GradScaler hands
    the overflow flag) driven by fp16 loss scaling with an inf gradient at step 3: that step is skipped and not
    counted, and the weights after 6 steps equal those of the CPU's per-parameter loop run on the 5 clean
    gradients without any scaler."""
    from engine.step import make_optimizer

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)

    def params(dev):
        g = torch.Generator().manual_seed(0)
        return [nn.Parameter(torch.randn(shape, generator=g).to(dev)) for shape in ((16, 8), (8,))]

    def grads(i):
        g = torch.Generator().manual_seed(100 + i)
        return [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]

    dev = torch.device(device)
    p = params(dev)
    opt = make_optimizer(cfg, p, dev)
    assert bool(opt.defaults["fused"]) == (dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**10)
    for i in range(6):
        gs = grads(i)
        if i == 2:
            gs[0][3, 4] = float("inf")
        opt.zero_grad(set_to_none=True)
        scaler.scale(sum((t * gr.to(dev)).sum() for t, gr in zip(p, gs))).backward()  # grads: gs, scaled
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert (scaler.get_scale() < scale) == (i == 2)
    assert all(int(opt.state[t]["step"]) == 5 for t in p)

    r = params("cpu")
    ref = make_optimizer(cfg, r, torch.device("cpu"))
    for i in (0, 1, 3, 4, 5):
        for t, gr in zip(r, grads(i)):
            t.grad = gr
        ref.step()
    for a, b in zip(p, r):
        assert not torch.equal(b.detach(), params("cpu")[0 if b.dim() == 2 else 1].detach())  # they moved
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_with_offloaded_checkpoints_and_mlp_tiles_on_the_device_matches_a_plain_cpu_run(tmp_path, device):
    """engine.train end to end, 4 steps of a tiny NF4 + LoRA model in fp32: on the device with checkpointing,
    block inputs offloaded to the host and MLP tiles of 64 tokens, against a run on the CPU with none of them.
    Same losses, gradient norms and saved adapter (to float rounding; CUDA's kernels round differently)."""
    from safetensors.torch import load_file

    from engine.train import train

    from .test_train import read_metrics, tiny_cfg

    plain = tiny_cfg(tmp_path, max_steps=4, out=str(tmp_path / "plain"), device="cpu", precision="fp32",
                     checkpointing=False)
    train(plain)
    tiled = tiny_cfg(tmp_path, max_steps=4, out=str(tmp_path / "tiled"), device=device, precision="fp32",
                     checkpointing=True, offload=True, mlp_tile=64)
    train(tiled)
    rtol = 1e-5 if device == "cpu" else 1e-3
    a, b = read_metrics(plain.out), read_metrics(tiled.out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= rtol * abs(ra["loss"]), (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 10 * rtol * abs(ra["grad_norm"]), (ra, rb)
    wa = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "tiled" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=10 * rtol, atol=10 * rtol * wa[k].abs().max().item(), msg=k)
