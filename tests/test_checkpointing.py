"""Gradient checkpointing (and its CPU offload) changes memory, never numbers: the loss and every LoRA gradient
equal those of a plain forward/backward, with fp32 and NF4 base weights, with LoRA dropout active."""
import logging

import pytest
import torch
import torch.nn.functional as F

from model import load_model
from model.lora import apply_lora, lora_state_dict

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def loss_and_lora_grads(model, checkpointing, offload, segment_ids=None):
    model.set_gradient_checkpointing(checkpointing, offload=offload)
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(320, (2, 16), generator=g)
    position_ids = None
    if segment_ids is not None:  # packed rows: positions restart per sample
        starts = torch.cat([torch.ones_like(segment_ids[:, :1], dtype=torch.bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)
        idx = torch.arange(16).expand(2, 16)
        position_ids = idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values
    torch.manual_seed(1234)  # the LoRA dropout masks: checkpoint replays the RNG state at recompute
    logits = model(x[:, :-1], segment_ids=None if segment_ids is None else segment_ids[:, :-1],
                   position_ids=None if position_ids is None else position_ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", params=[None, "nf4"])
def lora_model(request, tmp_path_factory):
    from tests.conftest import save_tiny_hf

    path = save_tiny_hf(tmp_path_factory.mktemp("ckpt") / "hf", seed=2)
    model = apply_lora(load_model(path, quantize=request.param), r=4, alpha=8, dropout=0.1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_gives_identical_loss_and_lora_grads(lora_model, offload):
    loss, grads = loss_and_lora_grads(lora_model, checkpointing=False, offload=False)
    loss_c, grads_c = loss_and_lora_grads(lora_model, checkpointing=True, offload=offload)
    lora_model.set_gradient_checkpointing(False)
    assert set(grads) == set(lora_state_dict(lora_model)) and len(grads) == 2 * 7 * 2
    assert all(g.abs().sum() > 0 for g in grads.values())
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=0, msg=name)


def test_checkpointing_with_packed_segments(lora_model):
    seg = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    loss, grads = loss_and_lora_grads(lora_model, False, False, segment_ids=seg)
    loss_c, grads_c = loss_and_lora_grads(lora_model, True, False, segment_ids=seg)
    lora_model.set_gradient_checkpointing(False)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=0, msg=name)


def test_checkpointing_recomputes_instead_of_saving_block_activations(lora_model):
    """With checkpointing only each block's input survives the forward; without it, every projection's
    input and every attention/MLP intermediate does."""
    x = torch.randint(320, (2, 32))

    def saved_bytes(checkpointing):
        lora_model.set_gradient_checkpointing(checkpointing)
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lora_model(x)
        del out
        lora_model.set_gradient_checkpointing(False)
        return sum(total)

    assert saved_bytes(True) < saved_bytes(False) / 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_mlp_tiles_keep_loss_and_lora_grads(lora_model, checkpointing, packed):
    """model.llama.token_tiles: the MLP run 7 tokens at a time (30 tokens: 4 full tiles and a short one), each
    tile recomputed on its own, gives the loss and LoRA gradients of the whole-batch MLP. Dropout off: tiles draw
    their dropout masks tile by tile, so with it on the masks (not their distribution) differ."""
    seg = torch.tensor([[0] * 6 + [1] * 10, [0] * 16]) if packed else None
    drops = [m for m in lora_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops
    try:
        for m in drops:
            m.p = 0.0
        loss, grads = loss_and_lora_grads(lora_model, checkpointing, False, segment_ids=seg)
        lora_model.set_mlp_tile(7)
        loss_t, grads_t = loss_and_lora_grads(lora_model, checkpointing, False, segment_ids=seg)
    finally:
        for m in drops:
            m.p = 0.1
        lora_model.set_mlp_tile(0)
        lora_model.set_gradient_checkpointing(False)
    assert all(b.mlp_tile == 0 for b in lora_model.model.layers)
    torch.testing.assert_close(loss_t, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_t[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mlp_tiles_without_grad_give_the_same_logits(lora_model):
    x = torch.randint(320, (2, 15), generator=torch.Generator().manual_seed(5))
    lora_model.eval()
    try:
        with torch.no_grad():
            ref = lora_model(x)
            lora_model.set_mlp_tile(4)
            got = lora_model(x)
    finally:
        lora_model.set_mlp_tile(0)
        lora_model.train()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
