"""Exact resume: N steps straight == stop (SIGTERM, or kill -9 after a save) + --resume to N.

Identical means: every metrics.jsonl field except wall-clock ones (tokens_per_s, peak_mem_bytes) equal, and the
final adapter bit-identical. LoRA dropout is on, so the RNG states really have to come back.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_train import cfg_args, read_metrics, run_train, tiny_cfg

STEPS = 24
CLOCK = {"tokens_per_s", "peak_mem_bytes"}


def _cfg(tmp, out, **over):
    return tiny_cfg(tmp, out=str(tmp / out), max_steps=STEPS, batch_size=2, grad_accum=1, lr=5e-3,
                    lora_dropout=0.1, save_every=4, keep_last=2, eval_every=8, **over)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = _cfg(tmp, "straight")
    r = run_train(cfg_args(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp, cfg


def _start(cfg):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "engine.train", *cfg_args(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, ready, what):
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < 240, f"timed out waiting for {what}"
        time.sleep(0.005)


def _same_as_straight(straight_cfg, cfg):
    a, b = read_metrics(straight_cfg.out), read_metrics(cfg.out)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in CLOCK} == {k: v for k, v in y.items() if k not in CLOCK}
    fa = Path(straight_cfg.out) / "adapter" / "adapter_model.safetensors"
    fb = Path(cfg.out) / "adapter" / "adapter_model.safetensors"
    wa, wb = load_file(fa), load_file(fb)
    assert all(wa[k].equal(wb[k]) for k in wa) and wa.keys() == wb.keys()
    assert fa.read_bytes() == fb.read_bytes()


def _steps_logged(cfg):
    p = Path(cfg.out) / "metrics.jsonl"
    return sum(1 for ln in p.read_text().splitlines() if '"loss"' in ln) if p.exists() else 0


def test_sigterm_then_resume_is_identical_to_straight_run(straight):
    tmp, ref = straight
    cfg = _cfg(tmp, "sigterm")
    proc = _start(cfg)
    _wait_for(proc, lambda: _steps_logged(cfg) >= 3, "step 3")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal" in out
    stopped_at = _steps_logged(cfg)
    assert 3 <= stopped_at < STEPS
    assert (Path(cfg.out) / "checkpoints" / f"step-{stopped_at}" / "state.json").is_file()
    assert not (Path(cfg.out) / "adapter").exists()  # the adapter is written only by a finished run
    r = run_train(cfg_args(cfg) + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and f"at step {stopped_at}" in r.stdout
    _same_as_straight(ref, cfg)


def test_kill_9_after_a_save_then_resume_is_identical_to_straight_run(straight):
    tmp, ref = straight
    cfg = _cfg(tmp, "kill9")
    proc = _start(cfg)
    _wait_for(proc, lambda: (Path(cfg.out) / "checkpoints" / "step-8").is_dir(), "checkpoint step-8")
    proc.kill()  # SIGKILL: no handler runs, whatever was in flight is lost
    proc.communicate(timeout=60)
    assert _steps_logged(cfg) < STEPS
    r = run_train(cfg_args(cfg) + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    # it resumed (a seeded restart from step 0 would also end identical): from step 8 or a later save
    at = re.search(r"resumed from \S+ at step (\d+)", r.stdout)
    assert at and int(at.group(1)) >= 8 and "starting from step 0" not in r.stdout, r.stdout[-2000:]
    _same_as_straight(ref, cfg)


def test_rerun_without_resume_refuses_to_overwrite(straight):
    tmp, ref = straight
    r = run_train(cfg_args(ref))
    assert r.returncode != 0 and "--resume" in r.stderr and r.stderr.strip().count("\n") == 0


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_the_straight_one(tmp_path):
    """torchrun --max-restarts 1 run directly, as the recipes' users may (engine.train, 2 processes, LoRA dropout
    on: each rank's RNG state must come back): SIGKILL one worker after step 5, torchrun starts both again, they
    continue from the newest checkpoint (step 4) and end as the uninterrupted 2-process run does. The restarted
    workers meet in the store torchrun keeps for the whole job: engine.dist gives each attempt its own key prefix
    (without it gloo read the dead workers' addresses and failed to connect, 8 restarts in 10)."""
    from tests.test_channel_resume import _worker_pid
    from tests.test_train_ddp import run_torchrun

    def cfg(out):
        return tiny_cfg(tmp_path, out=str(tmp_path / out), max_steps=12, batch_size=2, grad_accum=1, lr=5e-3,
                        lora_dropout=0.1, save_every=4, keep_last=2, eval_every=0)

    ref = cfg("straight")
    run_torchrun(ref)
    killed = cfg("killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--max-restarts", "1", "-m", "engine.train", *cfg_args(killed)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proc, lambda: _steps_logged(killed) >= 5, "step 5")
    os.kill(_worker_pid(killed.out, 1, "engine.train"), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert re.search(r"resumed from \S+step-(4|8) at step (4|8)\b", out + err), (out + err)[-3000:]
    _same_as_straight(ref, killed)
