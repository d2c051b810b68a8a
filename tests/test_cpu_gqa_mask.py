"""Masked attention with grouped k/v on the CPU (model/llama.py attention_path, cpu_flash_takes_grouped_kv): where
this torch's CPU flash kernel takes a mask together with grouped k/v (torch 2.13's does), the mask path keeps k/v on
their n_kv heads, with the loss and gradients of k/v copied to every head, and the ledger counts what it keeps."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import model.llama as llama
from engine import ledger
from engine.ledger import Setup
from model.load import load_config

from .test_packed_attention import assert_same, lora_model, packed_batch, step


@pytest.fixture
def probe_once_more():
    """The probe's answer is cached per process: forget it before and after a test that changes what it sees."""
    llama.cpu_flash_takes_grouped_kv.cache_clear()
    yield
    llama.cpu_flash_takes_grouped_kv.cache_clear()


def copies(monkeypatch):
    """Count the k/v copies Attention.attend makes (repeat_interleave, its only way of copying them)."""
    calls = []
    real = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                        lambda t, *a, **kw: calls.append(t.shape) or real(t, *a, **kw))
    return calls


def test_this_torch_cpu_flash_kernel_takes_a_mask_with_grouped_kv():
    # the environment's torch (2.13): if a new one refuses, the rest of this file has nothing to check
    assert llama.cpu_flash_takes_grouped_kv(True) and llama.cpu_flash_takes_grouped_kv(False)


@pytest.mark.parametrize("over", [{}, {"num_key_value_heads": 1}], ids=["gqa", "mqa"])
def test_masked_gqa_on_the_cpu_keeps_kv_grouped_with_the_loss_and_grads_of_copied_kv(over, monkeypatch):
    model = lora_model(**over)
    batch = packed_batch([[3, 13], [8, 2, 1, 5]], 16)
    real = llama.attention_path
    # the reference: the same mask path with k/v copied to every head, as attention_path chose before
    monkeypatch.setattr(llama, "attention_path", lambda nh, nkv, *a, **kw: dataclasses.replace(
        real(nh, nkv, *a, **kw), expand_kv=nkv != nh))
    copied = step(model, *batch, segments=False)
    monkeypatch.setattr(llama, "attention_path", real)
    calls = copies(monkeypatch)
    grouped = step(model, *batch, segments=False)
    assert calls == []  # no k/v copy in forward or backward
    assert_same(grouped, copied)


def test_a_cached_decode_step_on_the_cpu_keeps_kv_grouped(tiny_config, monkeypatch):
    torch.manual_seed(0)
    model = llama.Llama(tiny_config).eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        want = model(ids)[:, -1]
        cache = llama.KVCache(tiny_config, 2, 16, torch.float32, "cpu")
        model.hidden(ids[:, :8], cache=cache)  # prefill: the KV cache's mask from here on
        calls = copies(monkeypatch)
        got = model.lm_head(model.hidden(ids[:, 8:], cache=cache))[:, -1]
    assert calls == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_cpu_ledger_counts_grouped_kv_on_the_mask_path():
    cfg = load_config("smollm2-135m")  # 9 query heads, 3 kv heads of 64
    s = Setup(seq_len=512, batch_size=2, pack=True, pack_mask=True, device="cpu", precision="fp32")
    rows = dict(ledger.block_saved(cfg, s))
    assert rows["k after RoPE"] == rows["v"] == 2 * 512 * 3 * 64 * 4  # n_kv heads: no copy
    assert not any("copied" in k or "math kernel" in k for k in rows)
    assert rows["SDPA additive mask (packed rows)"] == 2 * 512 * 512 * 4


def test_where_the_cpu_flash_kernel_refuses_grouped_kv_they_are_copied(monkeypatch, probe_once_more):
    real = F.scaled_dot_product_attention

    def no_grouped_kv(q, k, v, *a, enable_gqa=False, **kw):
        if enable_gqa and q.shape[1] != k.shape[1]:
            raise RuntimeError("No available kernel. Aborting execution.")  # what a refusing build says
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_grouped_kv)
    assert not llama.cpu_flash_takes_grouped_kv(True)
    assert llama.attention_path(9, 3, "cpu", masked=True).expand_kv
    assert not llama.attention_path(9, 9, "cpu", masked=True).expand_kv  # no GQA, nothing to copy
    rows = dict(ledger.block_saved(load_config("smollm2-135m"), Setup(seq_len=64, batch_size=1, pack=True,
                                                                       pack_mask=True, device="cpu", precision="fp32")))
    assert rows["k after RoPE, copied to all heads"] == 64 * 9 * 64 * 4
    model = lora_model()
    calls = copies(monkeypatch)
    step(model, *packed_batch([[7, 9]], 16), segments=False)  # runs, on copies
    assert calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_masked_sdpa_backward_grows_on_the_cpu_as_the_ledger_counts(precision):
    """Attention.attend with a boolean mask, SmolLM2's 9/3 heads: the backward's peak grows from 2048 to 4096
    tokens by dq, dk and dv at the heads the ledger says SDPA is fed (ledger.attention_backward_working), n_kv
    on torch 2.13 (with k/v copied it grew twice that). Per-thread buffers, the same at both sizes, drop out of
    the growth; the (T, T) mask is made before the measured backward, so it is not in it."""
    from engine import memory

    cfg = load_config("smollm2-135m")
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    s = Setup(seq_len=2048, batch_size=1, pack=True, pack_mask=True, device="cpu", precision=precision)
    kv = nh if ledger.attention(cfg, s).expand_kv else nkv
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    attn = llama.Attention(cfg)
    g = torch.Generator().manual_seed(0)

    def peak(T):
        q, k, v = (torch.randn(1, T, h, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()
                   for h in (nh, nkv, nkv))  # (B, T, heads, hd) memory, as Attention.project leaves it
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        out = attn.attend(q, k, v, mask)  # (B, T, n*hd)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        return memory.peak_allocated_bytes(lambda: torch.autograd.grad(out, (q, k, v), grad))[1]

    grown = peak(4096) - peak(2048)
    want = 2048 * (nh + 2 * kv) * hd * s.cbytes
    assert kv == nkv and abs(grown - want) <= 0.02 * want, (grown, want)
