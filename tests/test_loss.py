"""The memory-lean loss equals the plain full-logits cross-entropy, and its normalisation makes the gradient
independent of how a step's rows are split into micro-batches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from engine.loss import CausalLMLoss, chunked_ce_sum, supervised_tokens
from engine.precision import Precision
from engine.step import forward_backward
from model import Llama, LlamaConfig
from tests.conftest import tiny_config_dict


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_hf_dict(tiny_config_dict())).train()


def _rows(n=4, T=24, seed=1):
    """n rows with different numbers of supervised tokens (row i: the last 3 + 2*i positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n, T), generator=g)
    labels = torch.full_like(ids, -100)
    for i in range(n):
        k = 3 + 2 * i
        labels[i, T - k:] = ids[i, T - k:]
    return ids, labels


def _reference(model, ids, labels):
    logits = model(ids)  # (B, T, V), the naive way
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_loss_and_grad_equal_full_logits_reference(chunk):
    model = _tiny()
    ids, labels = _rows()
    ref = _reference(model, ids, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = chunked_ce_sum(model.hidden(ids), labels, model.lm_head, chunk=chunk)
    ours.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_supervised_tokens_gives_zero_loss_with_connected_graph():
    model = _tiny()
    ids, _ = _rows(2)
    labels = torch.full_like(ids, -100)
    loss = chunked_ce_sum(model.hidden(ids), labels, model.lm_head)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()  # DDP needs every rank to run backward through the graph


class _LogitShapes(TorchDispatchMode):
    """Records the shape of every matrix product whose output's last dim is the vocabulary (the logits)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.seen = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default) and out.shape[-1] == self.vocab:
            self.seen.append(tuple(out.shape))
        return out


def test_logits_exist_only_for_labelled_positions_and_one_chunk_at_a_time():
    model = _tiny()
    ids, labels = _rows()
    hidden = model.hidden(ids)
    with _LogitShapes(model.config.vocab_size) as mode:
        loss = chunked_ce_sum(hidden, labels, model.lm_head, chunk=8)
    fwd, mode.seen = mode.seen, []
    with mode:
        loss.backward()
    n = supervised_tokens(labels)
    for seen in (fwd, mode.seen):  # forward computes each chunk once, backward recomputes it once
        assert sum(s[0] for s in seen) == n  # rows of logits == supervised tokens, not B*T
        assert all(len(s) == 2 and s[0] <= 8 for s in seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_equals_autograd_through_the_same_casts(dtype):
    """Under bf16/fp16 autocast (fp16: the T4's) the fused loss runs lm_head in that dtype and the softmax in
    fp32, like the unfused lm_head(h).float() + F.cross_entropy; loss and gradients agree to its rounding."""
    torch.manual_seed(0)
    h = torch.randn(37, 32, requires_grad=True)
    head = torch.nn.Linear(32, 320, bias=False)
    y = torch.randint(0, 320, (37,))
    labels = torch.cat([torch.full((1,), -100), y])[None]  # position t predicts labels[t + 1]
    with torch.autocast("cpu", dtype=dtype):
        ref = F.cross_entropy(head(h).float(), y, reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, head.weight))
    with torch.autocast("cpu", dtype=dtype):
        ours = chunked_ce_sum(torch.cat([h, h[:1]])[None], labels, head, chunk=10)
    gh, gw = torch.autograd.grad(ours, (h, head.weight))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh, gh_ref, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=2e-3)


_PEAK_PROBE = r"""
import sys, torch
from pathlib import Path
from engine.loss import chunked_ce_sum
N, H, V, chunk = 2048, 64, 32768, 1024
torch.manual_seed(0)
head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)  # frozen, as the QLoRA base is
hidden = torch.randn(1, N + 1, H, requires_grad=True)
labels = torch.randint(0, V, (1, N + 1))
def hwm():
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(ln for ln in lines if ln.startswith("VmHWM")).split()[1]) * 1024
def rss():
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(ln for ln in lines if ln.startswith("VmRSS")).split()[1]) * 1024
base = rss()
Path("/proc/self/clear_refs").write_text("5")
chunked_ce_sum(hidden, labels, head, chunk).backward()
print((hwm() - base) / (chunk * V * 4))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read the peak")
def test_loss_peak_memory_is_about_one_chunk_of_fp32_logits():
    """In a fresh process where glibc returns every large block at once (fixed 64 KiB mmap threshold), the
    peak resident growth through forward and backward (two chunks) is one (chunk, V) fp32 buffer, 128 MiB here,
    plus small change (measured 1.14 buffers), where autograd through F.cross_entropy in checkpointed chunks,
    this module's previous version, peaked at 3.7 buffers (logits, log-softmax and their gradients)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, check=True).stdout
    chunks = float(out.split()[-1])
    assert 0.9 < chunks < 1.5, chunks


@pytest.mark.parametrize("split", [(1, 4), (2, 2), (4, 1)])
def test_gradient_independent_of_micro_batch_split(split):
    """The same 4 rows (with unequal supervised-token counts) as 1x4, 2x2 and 4x1 micro-batches: same gradient,
    equal to the gradient of the token-mean loss over all 4 rows (tolerance: fp32 summation order)."""
    n_micro, bs = split
    ids, labels = _rows(4)
    ref_model = _tiny()
    ref = _reference(ref_model, ids, labels) / supervised_tokens(labels)
    ref.backward()
    model = _tiny()
    micro = [{"input_ids": ids[i * bs:(i + 1) * bs], "labels": labels[i * bs:(i + 1) * bs]} for i in range(n_micro)]
    loss, n = forward_backward(CausalLMLoss(model, chunk=7), micro, Precision("fp32", torch.device("cpu")), 1)
    assert n == supervised_tokens(labels)
    assert abs(loss - float(ref.detach())) < 1e-5
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def _weights(labels, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(labels.shape, generator=g) * (labels != -100)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_weighted_loss_and_grad_equal_weighted_full_logits_reference(chunk):
    model = _tiny()
    ids, labels = _rows()
    w = _weights(labels)
    logits = model(ids)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="none")
    ref = (ce * w[:, 1:].reshape(-1)).sum()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = chunked_ce_sum(model.hidden(ids), labels, model.lm_head, chunk=chunk, loss_weights=w)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("split", [(1, 4), (4, 1)])
def test_weighted_step_is_normalised_by_the_sum_of_weights(split):
    """With loss_weights the step's loss is sum(w * CE) / sum(w) over all micro-batches, whatever the split."""
    n_micro, bs = split
    ids, labels = _rows(4)
    w = _weights(labels)
    ref_model = _tiny()
    logits = ref_model(ids)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="none")
    ref = (ce * w[:, 1:].reshape(-1)).sum() / w[:, 1:][labels[:, 1:] != -100].sum()
    ref.backward()
    model = _tiny()
    micro = [{"input_ids": ids[i * bs:(i + 1) * bs], "labels": labels[i * bs:(i + 1) * bs],
              "loss_weights": w[i * bs:(i + 1) * bs]} for i in range(n_micro)]
    loss, n = forward_backward(CausalLMLoss(model, chunk=7), micro, Precision("fp32", torch.device("cpu")), 1)
    assert n == supervised_tokens(labels)  # the token count stays a token count (metrics), weights normalise
    assert abs(loss - float(ref.detach())) < 1e-5
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
