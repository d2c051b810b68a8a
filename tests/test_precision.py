"""engine/precision.py: which dtype a run trains and answers in, decided from the device and the CPU's features."""
import pytest
import torch

from engine import precision as P


@pytest.mark.parametrize("native", [True, False])
def test_answering_on_the_cpu_uses_bf16_only_where_the_cpu_multiplies_it(monkeypatch, native):
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: native)
    assert P.inference_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert P.inference_dtype("fp32", "cpu") == torch.float32
    assert P.inference_dtype("bf16", "cpu") == torch.bfloat16  # asked for: allowed (slow where emulated)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        P.inference_dtype("fp16", "cpu")


def test_training_auto_stays_fp32_on_the_cpu_and_bf16_needs_native_support(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: True)
    cpu = torch.device("cpu")
    assert P.resolve("auto", cpu) == "fp32"  # pinned loss curves and resume tests stay fp32
    assert P.resolve("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="needs a GPU"):
        P.resolve("fp16", cpu)
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: False)
    with pytest.raises(ValueError, match="AMX"):
        P.resolve("bf16", cpu)


def test_bf16_is_refused_on_a_t4_although_torch_says_it_is_supported(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation (its including_emulation defaults to True), so it says yes
    on a T4 (sm 75): the sm >= 80 check must look at the compute capability itself."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda", 0)
    for cap, ok in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap: c)
        if ok:
            assert P.resolve("bf16", gpu) == "bf16" and P.inference_dtype("bf16", gpu) == torch.bfloat16
            continue
        with pytest.raises(ValueError, match="sm >= 80"):
            P.resolve("bf16", gpu)
        with pytest.raises(ValueError, match="sm >= 80"):
            P.inference_dtype("bf16", gpu)
        assert P.resolve("auto", gpu) == "fp16"


def test_cpu_feature_probe_answers_a_bool():
    assert type(P.cpu_bf16_native()) is bool


@pytest.mark.skipif(not P.cpu_bf16_native(), reason="this CPU has no native bf16 (AMX / AVX-512 BF16)")
def test_bf16_training_step_on_the_cpu_tracks_fp32(tiny_config):
    """Forward and backward of a model with working adapters (LoRA B non-zero) under CPU bf16 autocast: logits,
    loss and every LoRA gradient within bf16 rounding of fp32 (measured: 0.4%, 0.01%, 0.7%), where dropping the
    adapters would move the logits by 40%."""
    from model.llama import Llama
    from model.lora import apply_lora, lora_layers

    torch.manual_seed(0)
    model = apply_lora(Llama(tiny_config), r=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    got = {}
    for mode in ("fp32", "bf16"):
        model.zero_grad()
        with P.Precision(mode, torch.device("cpu")).autocast():
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        assert torch.isfinite(loss)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        got[mode] = logits.detach().float(), loss.item(), grads
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    (l32, loss32, g32), (l16, loss16, g16) = got["fp32"], got["bf16"]
    assert rel(l16, l32) < 2e-2 and rel(g16, g32) < 3e-2
    assert loss16 == pytest.approx(loss32, rel=2e-3)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_the_frozen_base_is_stored_in_the_compute_dtype_and_only_the_adapters_in_fp32(tiny_config, mode):
    """What the module docstring says is stored in which dtype: embeddings, norm weights and lm_head in
    param_dtype (nothing frozen upcast to fp32, as peft's prepare_model_for_kbit_training would), NF4 codes in
    uint8 with fp32 scales, the LoRA weights in fp32."""
    from model.load import load_model
    from model.lora import apply_lora

    dtype = P.dtype_of(mode)  # Precision.param_dtype, which train.py loads the base in
    model = apply_lora(load_model(tiny_config, dtype=dtype, quantize="nf4", double_quant=True, init="random"), r=4)
    stored = {name: t.dtype for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert {d for n, d in stored.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in stored.items() if "norm" in n or "embed" in n or "lm_head" in n} == {dtype}
    assert {d for n, d in stored.items() if n.endswith(("proj.weight", "absmax_q"))} == {torch.uint8}
    assert {d for n, d in stored.items() if n.endswith(("absmax_scale", "absmax_offset"))} == {torch.float32}
