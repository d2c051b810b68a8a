"""Checkpoints: pickle-free optimizer/RNG round trips, atomic directories, keep_last, second-signal rollback."""
import json
import random

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from engine import dist
from engine.precision import Precision


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # a frozen part is not saved
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), foreach=False)
    for _ in range(3):
        model(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(tmp_path, step, model, opt, keep_last=3):
    dist.init("cpu")
    return ckpt.save(tmp_path, step, model=model, optimizer=opt, precision=Precision("fp32", torch.device("cpu")),
                     sampler_state={"pos": step}, counters={"train_seconds": 1.5}, keep_last=keep_last,
                     base_model="tiny")


def test_roundtrip_restores_weights_optimizer_rng_exactly(tmp_path):
    model, opt = _setup()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = _save(tmp_path, 3, model, opt)
    expect = (random.random(), np.random.rand(), torch.rand(3))
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))  # no pickle anywhere
    model2, opt2 = _setup(seed=1)  # different weights and moments
    state = ckpt.load(path, model=model2, optimizer=opt2, precision=Precision("fp32", torch.device("cpu")))
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(3), expect[2])
    assert state["step"] == 3 and state["sampler"] == {"pos": 3} and state["counters"]["train_seconds"] == 1.5
    for a, b in zip(model.parameters(), model2.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s2["param_groups"][0]["betas"] == (0.8, 0.95)
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), name


def test_a_checkpoint_resumes_only_in_the_precision_it_was_saved_in(tmp_path):
    """precision "auto" is fp16 on a T4, bf16 on an A100 and fp32 on a CPU: a run moved between them cannot
    continue exactly (the loss scaler exists only in fp16), so the load refuses, naming the flag to pass."""
    model, opt = _setup()
    path = _save(tmp_path, 3, model, opt)  # saved in fp32
    elsewhere = Precision("fp32", torch.device("cpu"))
    elsewhere.mode = "bf16"  # what "auto" resolves to on another machine
    with pytest.raises(ValueError, match=r"saved in precision fp32, resuming in bf16.*--precision fp32"):
        ckpt.load(path, model=model, optimizer=opt, precision=elsewhere)
    ckpt.load(path, model=model, optimizer=opt, precision=Precision("fp32", torch.device("cpu")))


def test_keep_last_and_latest(tmp_path):
    model, opt = _setup()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [4, 6]
    assert ckpt.latest(tmp_path).name == "step-6"


def test_interrupted_save_leaves_previous_checkpoint_newest(tmp_path, monkeypatch):
    """A second SIGTERM raises SystemExit mid-save: no step-N.tmp survives and step-2 stays the newest."""
    model, opt = _setup()
    _save(tmp_path, 2, model, opt)

    def killed(*a, **k):
        raise SystemExit(143)

    monkeypatch.setattr(ckpt, "_write_json", killed)
    with pytest.raises(SystemExit):
        _save(tmp_path, 4, model, opt)
    assert ckpt.latest(tmp_path).name == "step-2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    assert json.loads((ckpt.latest(tmp_path) / "state.json").read_text())["step"] == 2


def test_directory_without_state_json_is_not_complete(tmp_path):
    (tmp_path / "checkpoints" / "step-9").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-3.tmp").mkdir()
    assert ckpt.latest(tmp_path) is None
    ckpt.remove_partial(tmp_path)
    assert not (tmp_path / "checkpoints" / "step-3.tmp").exists()


def test_every_file_is_on_disk_before_state_json_says_the_checkpoint_is_complete(tmp_path, monkeypatch):
    model, opt = _setup()
    seen, real = [], ckpt._fsync_files

    def recording(root):
        seen.append(sorted(p.name for p in root.rglob("*") if p.is_file()))
        real(root)
    monkeypatch.setattr(ckpt, "_fsync_files", recording)
    path = _save(tmp_path, 2, model, opt)
    assert len(seen) == 1 and "state.json" not in seen[0]
    assert seen[0] == sorted(p.name for p in path.rglob("*") if p.is_file() and p.name != "state.json")


def test_a_complete_checkpoint_moved_aside_by_an_interrupted_resave_is_put_back(tmp_path):
    """Saving step N again moves the old step-N to step-N.tmp.old before the new one takes its name: a crash in
    between must not lose the newest checkpoint there is."""
    model, opt = _setup()
    _save(tmp_path, 2, model, opt)
    path = _save(tmp_path, 4, model, opt)
    root = tmp_path / "checkpoints"
    path.rename(root / "step-4.tmp.old")
    (root / "step-4.tmp").mkdir()  # the new copy, half written
    (root / "step-6.tmp.old").mkdir()  # an incomplete leftover: no state.json
    # a --resume looks before anything tidies OUT: the moved-aside step is already the newest it finds
    assert ckpt.latest(tmp_path).name == "step-4.tmp.old"
    model2, opt2 = _setup(seed=1)
    assert ckpt.load(ckpt.latest(tmp_path), model=model2, optimizer=opt2,
                     precision=Precision("fp32", torch.device("cpu")))["step"] == 4
    ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"] and ckpt.latest(tmp_path).name == "step-4"


def test_second_signal_raises_system_exit():
    flag = ckpt.StopFlag(repeat_s=0.0)
    flag._handle(15, None)
    assert flag.requested
    with pytest.raises(SystemExit):
        flag._handle(15, None)


def test_a_signal_repeated_at_once_is_one_request_then_a_later_one_exits():
    """Ctrl-C reaches a worker from the terminal, from launch.sh and from torchrun within milliseconds: one
    request to checkpoint and stop. A signal after repeat_s is the user's second one: stop at once."""
    import os
    import signal
    import time

    flag = ckpt.StopFlag(repeat_s=0.5).install()
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this (the main) thread
        assert flag.requested and flag.count == 1 and flag.signum == signal.SIGINT
        time.sleep(0.6)
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # (the handler runs at the next bytecode; never reached)
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        flag.uninstall()
