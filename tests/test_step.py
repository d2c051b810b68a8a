"""engine/step.py: the optimizer the trainer builds, per device."""
import torch

from engine.config import TrainConfig
from engine.step import make_optimizer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(16, 8, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]


def test_cuda_gets_one_fused_adamw_and_the_cpu_keeps_the_per_parameter_loop():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    assert make_optimizer(cfg, _params(), torch.device("cuda")).defaults["fused"] is True
    assert not make_optimizer(cfg, _params(), torch.device("cpu")).defaults["fused"]


def test_fused_adamw_updates_equal_the_per_parameter_loop():
    """What the CUDA choice changes, checked where a fused AdamW also exists (the CPU): the same weights after
    several steps with weight decay, to float rounding."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    runs = {}
    for device in ("cpu", "cuda"):  # "cuda" only selects fused=True; the tensors stay on the CPU
        params = _params()
        opt = make_optimizer(cfg, params, torch.device(device))
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[device] = [p.detach().clone() for p in params]
    for a, b in zip(runs["cpu"], runs["cuda"]):
        assert not torch.equal(a, _params()[0 if a.dim() == 2 else 1])  # they moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_optimizer_state_survives_the_checkpoint_files_bit_for_bit():
    """Resume with the fused optimizer: state written through checkpoint's safetensors+JSON split and read back
    continues exactly like the uninterrupted optimizer."""
    from engine.checkpoint import optimizer_from_files, optimizer_to_files

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)

    def grads(step):
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]

    def run(params, opt, steps):
        for s in steps:
            for p, gr in zip(params, grads(s)):
                p.grad = gr
            opt.step()

    a = _params()
    opt_a = make_optimizer(cfg, a, torch.device("cuda"))
    run(a, opt_a, range(6))

    b = _params()
    opt_b = make_optimizer(cfg, b, torch.device("cuda"))
    run(b, opt_b, range(3))
    tensors, js = optimizer_to_files(opt_b.state_dict())
    b2 = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_b2 = make_optimizer(cfg, b2, torch.device("cuda"))
    opt_b2.load_state_dict(optimizer_from_files(tensors, js))
    run(b2, opt_b2, range(3, 6))
    for x, y in zip(a, b2):
        assert torch.equal(x, y)


def test_cpu_heap_trim_runs_before_each_block_of_a_training_forward_only(tiny_config, monkeypatch):
    """engine.step.trim_cpu_heap: malloc_trim(0) once per decoder block in a training forward on the CPU; never in
    backward (checkpointed blocks recompute there), in eval mode, under no_grad, or with trim_cpu_heap off."""
    from engine import step as step_mod
    from engine.ledger import Setup
    from engine.memory import random_batch, training_model

    calls = []
    monkeypatch.setattr(step_mod, "_malloc_trim", lambda: calls.append)
    s = Setup(seq_len=16, batch_size=2, precision="fp32", device="cpu", quantize="none")
    model = training_model(tiny_config, s, "cpu")
    assert model.gradient_checkpointing
    ids, labels = random_batch(tiny_config, s)
    h = model.hidden(ids)
    assert calls == [0] * tiny_config.num_hidden_layers
    h.float().pow(2).mean().backward()  # recomputes every block
    assert len(calls) == tiny_config.num_hidden_layers
    with torch.no_grad():
        model.hidden(ids)
    model.eval()
    model.hidden(ids)
    assert len(calls) == tiny_config.num_hidden_layers

    calls.clear()
    from engine.step import prepare_model
    from model.load import load_model

    plain = load_model(tiny_config, init="random", seed=0, device="cpu", quantize="none")
    prepare_model(plain, TrainConfig(seq_len=16, batch_size=2, trim_cpu_heap=False, checkpointing=True), "cpu")
    plain.hidden(ids)
    assert calls == []
