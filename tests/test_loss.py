"""The memory-lean loss equals the plain full-logits cross-entropy, and its normalisation makes the gradient
independent of how a step's rows are split into micro-batches."""
import pytest
import torch
import torch.nn.functional as F

from engine.loss import CausalLMLoss, chunked_ce_sum, supervised_tokens
from engine.precision import Precision
from engine.train import forward_backward
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


def test_lm_head_never_sees_unlabelled_positions():
    model = _tiny()
    ids, labels = _rows()
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    chunked_ce_sum(model.hidden(ids), labels, model.lm_head, chunk=8)
    assert sum(s[0] for s in seen) == supervised_tokens(labels)  # rows of logits == supervised tokens, not B*T
    assert all(len(s) == 2 for s in seen)


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
