"""Packed rows without a (T, T) mask (model/llama.py's segment path): one causal SDPA call per segment gives the
logits, loss and LoRA gradients of the masked path and of each example run alone."""
import pytest
import torch

from engine.loss import CausalLMLoss
from model import LlamaConfig
from model.llama import Llama, Segments, attention_path, cpu_flash_takes_grouped_kv, segment_runs
from model.lora import apply_lora

from .conftest import tiny_config_dict

IGNORE = -100


def lora_model(seed=0, **over):
    torch.manual_seed(seed)
    model = apply_lora(Llama(LlamaConfig.from_hf_dict(tiny_config_dict(**over))), r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: A's gradients would be zero too, and prove nothing
            p.data.normal_(0, 0.1)
    return model.train()


def packed_batch(lengths_per_row, T, seed=1):
    """Rows of examples back to back, right padding as segment -1, positions restarting at 0 (as
    data.batch.collate lays them out); labels on every real token but each example's first (a prompt token
    there, so no example's last token is asked to predict the next example)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths_per_row)
    ids = torch.randint(3, 300, (B, T), generator=g)
    seg = torch.full((B, T), -1)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b, lengths in enumerate(lengths_per_row):
        t = 0
        for i, n in enumerate(lengths):
            seg[b, t:t + n], pos[b, t:t + n] = i, torch.arange(n)
            t += n
    labels = torch.where((seg >= 0) & (pos > 0), ids, IGNORE)
    return ids, labels, pos, seg


def step(model, ids, labels, pos, seg, segments=True):
    """(logits, summed loss, LoRA gradients) of one forward/backward on one attention path."""
    model.segment_attention = segments
    model.zero_grad()
    loss = CausalLMLoss(model, chunk=16)(ids, labels, position_ids=pos, segment_ids=seg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        logits = model(ids, position_ids=pos, segment_ids=seg)
    return logits, loss.detach(), grads


def assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-4)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=1e-4)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=1e-4, msg=name)


CASES = {
    "two examples": [[7, 9]],
    "padding at the end": [[5, 6]],  # 16 columns: 5 padding tokens, their own segment
    "one-token segment": [[6, 1, 9]],
    "rows segmented differently": [[3, 13], [8, 2, 1, 5], [16]],
}


@pytest.mark.parametrize("lengths", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("over", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1}],
                         ids=["gqa", "mha", "mqa"])
def test_segment_path_equals_masked_path(lengths, over):
    model = lora_model(**over)
    batch = packed_batch(lengths, 16)
    assert_same(step(model, *batch, segments=True), step(model, *batch, segments=False))


@pytest.mark.parametrize("offload", [False, True])
def test_segment_path_equals_masked_path_under_gradient_checkpointing(offload):
    model = lora_model()
    batch = packed_batch(CASES["rows segmented differently"], 16)
    plain = step(model, *batch)
    model.set_gradient_checkpointing(True, offload=offload)
    assert_same(step(model, *batch, segments=True), plain)
    assert_same(step(model, *batch, segments=False), plain)


def test_packed_row_loss_and_lora_gradients_equal_the_examples_run_alone():
    model = lora_model()
    lengths = [6, 1, 4, 5]
    ids, labels, pos, seg = packed_batch([lengths], 20)  # 4 tokens of padding
    packed = step(model, ids, labels, pos, seg)
    loss, grads, t = 0.0, {}, 0
    for n in lengths:
        _, part_loss, part_grads = step(model, ids[:, t:t + n], labels[:, t:t + n], None, None)
        loss = loss + part_loss
        grads = {k: grads.get(k, 0) + g for k, g in part_grads.items()}
        with torch.no_grad():
            torch.testing.assert_close(packed[0][:, t:t + n], model(ids[:, t:t + n]), atol=1e-5, rtol=1e-4)
        t += n
    torch.testing.assert_close(packed[1], loss, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(packed[2][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_segment_runs_are_the_lengths_of_equal_ids_row_after_row():
    seg = torch.tensor([[0, 0, 0, 1, 2, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert segment_runs(seg) == Segments((3, 1, 2, 2, 8))


def test_an_id_that_comes_back_in_its_row_falls_back_to_the_mask():
    seg = torch.tensor([[0, 0, 1, 1, 0, 0]])  # the mask lets the last two tokens see the first two
    assert segment_runs(seg) is None
    model = lora_model()
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        model.segment_attention = True
        a = model(ids, segment_ids=seg)
        model.segment_attention = False
        b = model(ids, segment_ids=seg)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_attention_input_is_segments_for_packed_rows_and_a_mask_only_when_needed(tiny_config):
    model = Llama(tiny_config)
    seg = torch.tensor([[0, 0, 1, 1]])
    assert model.attention_input(4, seg, None, 0, False, "cpu") == Segments((2, 2))
    assert model.attention_input(4, torch.zeros(2, 4, dtype=torch.long), None, 0, False, "cpu") is None  # one each
    assert model.attention_input(4, seg, torch.ones(1, 4), 0, False, "cpu").shape == (1, 1, 4, 4)  # left padding
    assert model.attention_input(4, seg, None, 0, True, "cpu").shape == (1, 1, 4, 4)  # a KV cache
    model.segment_attention = False
    assert model.attention_input(4, seg, None, 0, False, "cpu").shape == (1, 1, 4, 4)


@pytest.mark.parametrize("device,capability,kernel,expand", [
    ("cpu", None, "flash", False),
    ("cuda", (9, 0), "flash", False),  # H200: flash takes grouped k/v
    ("cuda", (7, 5), "efficient", True),  # T4: no flash; the memory-efficient kernel needs k/v on every head
])
def test_packed_rows_take_the_segment_path_on_every_device(device, capability, kernel, expand):
    path = attention_path(24, 8, device, packed=True, capability=capability)
    assert (path.segmented, path.masked, path.kernel, path.expand_kv) == (True, False, kernel, expand)
    masked = attention_path(24, 8, device, packed=True, masked=True, capability=capability)
    assert masked.masked and not masked.segmented
    # with the mask, k/v are copied, except on the CPU where its flash kernel takes them grouped (torch 2.13)
    assert masked.expand_kv == (device != "cpu" or not cpu_flash_takes_grouped_kv(True))
