"""The run directory is the user's: no silent replacement, a refused resume changes nothing, one writer at a time,
bad numbers refused before loading, strict JSON in metrics.jsonl, and the launcher passes signals on."""
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import ConfigError, TrainConfig, parse_args
from engine.rundir import RunDir
from engine.rundir import json_line
from tests.conftest import REPO
from tests.test_train import cfg_args, read_metrics, run_train, tiny_cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rundir")
    cfg = tiny_cfg(tmp, out=str(tmp / "done"), max_steps=2)
    r = run_train(cfg_args(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp, cfg


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_finished_run_is_never_replaced_silently(finished):
    tmp, cfg = finished
    out = Path(cfg.out)
    assert (out / "adapter").is_dir() and not (out / "checkpoints").exists()  # save_every 0: no checkpoints
    before = _snapshot(out)
    r = run_train(cfg_args(cfg))
    assert r.returncode == 2 and "holds an earlier run" in r.stderr and "--overwrite" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert _snapshot(out) == before  # nothing touched


def test_overwrite_replaces_the_earlier_run(finished):
    tmp, cfg = finished
    out = tmp / "replaced"
    first = tiny_cfg(tmp, out=str(out), max_steps=3, save_every=1)
    assert run_train(cfg_args(first)).returncode == 0
    assert (out / "checkpoints").is_dir()
    mask = os.umask(0)
    os.umask(mask)
    step = out / "checkpoints" / "step-3"
    for p in [step, step / "adapter", *step.rglob("*")]:  # checkpoints are shared like any file, not 0600/0700
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p
    second = tiny_cfg(tmp, out=str(out), max_steps=2)
    r = run_train(cfg_args(second) + ["--overwrite"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went with it
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2


@pytest.mark.parametrize("change", [["--seq-len", "256"], ["--lora-r", "4"], ["--lr", "0.5"],
                                    ["--batch-size", "1"]])
def test_a_refused_resume_changes_nothing_and_names_the_keys(finished, change):
    tmp, cfg = finished
    out = Path(cfg.out)
    before = _snapshot(out)
    r = run_train(cfg_args(cfg) + ["--resume"] + change)
    key = change[0][2:].replace("-", "_")
    assert r.returncode == 2 and f"{key} (saved" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert _snapshot(out) == before  # config.json above all: evaluate and export read it


def test_a_second_writer_is_refused_naming_the_holder(finished):
    tmp, cfg = finished
    out = tmp / "locked"
    guard = RunDir(out).lock()  # this test process holds the run directory
    r = run_train(cfg_args(tiny_cfg(tmp, out=str(out), max_steps=1)))
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr and "in use by another run" in r.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    os.close(guard._fd)  # released: the same command now runs
    assert run_train(cfg_args(tiny_cfg(tmp, out=str(out), max_steps=1))).returncode == 0


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--min-lr-ratio", "-5"),
                                        ("--beta1", "1.5"), ("--beta2", "1"), ("--weight-decay", "-0.1"),
                                        ("--grad-clip", "-1"), ("--nonfinite-patience", "0"),
                                        ("--lora-alpha", "0"), ("--epochs", "inf")])
def test_every_bad_number_is_refused_before_anything_loads(flag, value):
    with pytest.raises(ConfigError) as e:
        parse_args([flag, value, "--model", "/nonexistent"])
    msg = str(e.value)
    assert msg.startswith("config: " + flag[2:].replace("-", "_") + " must") and value.rstrip("0") in msg


def test_metrics_lines_are_strict_json():
    line = json_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4})
    d = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert d == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-4} and line.endswith("\n")
    assert not math.isnan(d["lr"])


def _launch(args, tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", "python")}
    return subprocess.Popen(["./launch.sh", "--nproc", "2", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigterm_to_the_launcher_checkpoints_and_resumes_byte_identical(finished):
    tmp, _ = finished
    common = dict(max_steps=8, batch_size=1, grad_accum=1, lr=5e-3, lora_dropout=0.1)
    straight = tiny_cfg(tmp, out=str(tmp / "launch-straight"), **common)
    p = _launch(cfg_args(straight), tmp)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]

    cfg = tiny_cfg(tmp, out=str(tmp / "launch-stopped"), **common)
    p = _launch(cfg_args(cfg), tmp)
    metrics = Path(cfg.out) / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.exists() and '"step": 2' in metrics.read_text()):
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 240
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)  # to launch.sh only, as a job scheduler sends it
    out, err = p.communicate(timeout=240)
    assert p.returncode == 143, err[-3000:]
    steps = sorted(int(d.name.split("-")[1]) for d in (Path(cfg.out) / "checkpoints").iterdir()
                   if d.name.startswith("step-") and (d / "state.json").is_file())
    assert steps and steps[-1] < 8  # the checkpoint existed when launch.sh returned
    p = _launch(cfg_args(cfg) + ["--resume"], tmp)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"at step {steps[-1]}" in out and "resumed from" in out, out[-3000:]  # not a seeded restart from 0
    a = Path(straight.out) / "adapter" / "adapter_model.safetensors"
    b = Path(cfg.out) / "adapter" / "adapter_model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert load_file(a).keys() == load_file(b).keys()


@pytest.mark.parametrize("bad", [["--data", "jsonl:/nonexistent/data.jsonl"], ["--lr", "-1"]])
def test_launcher_reports_a_bad_setting_once_before_torchrun(tmp_path, bad):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", "python")}
    r = subprocess.run(["./launch.sh", "--nproc", "2", "--out", str(tmp_path / "o"), *bad], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
    assert "torch.distributed" not in r.stderr and not (tmp_path / "o").exists()


def test_adapters_get_the_umask_permissions_not_private_ones(finished):
    _, cfg = finished
    mask = os.umask(0)
    os.umask(mask)
    adapter = Path(cfg.out) / "adapter"
    assert adapter.stat().st_mode & 0o777 == 0o777 & ~mask  # mkdtemp would have made it 0700
    assert (adapter / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # safetensors: 0600


def test_a_resume_may_add_mlp_tiles_or_drop_the_heap_trim_but_not_change_the_model(tmp_path):
    """Settings that change how a step runs, not what it learns, may differ on --resume; a run saved before they
    existed (no such keys in its config.json) resumes too."""
    saved = TrainConfig(out=str(tmp_path), seq_len=64).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    RunDir(tmp_path).check_start(TrainConfig(out=str(tmp_path), seq_len=64, mlp_tile=32, trim_cpu_heap=False),
                                 resume=True)
    older = {k: v for k, v in saved.items() if k not in ("mlp_tile", "trim_cpu_heap")}
    (tmp_path / "config.json").write_text(json.dumps(older))
    RunDir(tmp_path).check_start(TrainConfig(out=str(tmp_path), seq_len=64, mlp_tile=32), resume=True)
    with pytest.raises(ConfigError, match="lora_r"):
        RunDir(tmp_path).check_start(TrainConfig(out=str(tmp_path), seq_len=64, lora_r=4), resume=True)


@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_run_that_fails_before_its_first_step_leaves_no_run_behind(tmp_path, monkeypatch, capsys, fail_at):
    """The first step is where a GPU runs out of memory. A run that dies there has produced nothing: its
    config.json and empty metrics.jsonl go, OUT too if the run created it, and the same command runs again
    without --overwrite. A run that dies later keeps everything, and a rerun is refused as before. In one
    process (a notebook), the failed run no longer holds OUT's lock. Out of GPU memory, the one line of error
    keeps torch's gist and names the flags that lower the peak, not torch's allocator paragraph."""
    from engine import step as step_mod
    from engine.train import main

    real = step_mod.TrainStep.__call__

    def oom_at(self, micro, step, lr):
        if step + 1 == fail_at:
            raise torch.OutOfMemoryError(  # torch's wording (2.x), one line, abridged
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.56 GiB of which "
                "1.21 GiB is free. Of the allocated memory 12.9 GiB is allocated by PyTorch, and 0.2 GiB is "
                "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
        return real(self, micro, step, lr)

    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "run"), max_steps=4, eval_every=2)
    capsys.readouterr()  # (building the tiny checkpoint prints progress)
    monkeypatch.setattr(step_mod.TrainStep, "__call__", oom_at)
    assert main(cfg_args(cfg)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "14.56 GiB of which 1.21 GiB is free.); the memory ledger printed at the start predicts")
    assert "--offload" in err[0] and "--budget" in err[0] and "PYTORCH_CUDA_ALLOC_CONF" not in err[0]
    out = Path(cfg.out)
    if fail_at == 1:
        assert not out.exists()
    else:
        assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]  # step 0: the eval before training
        assert (out / "config.json").is_file()
    monkeypatch.setattr(step_mod.TrainStep, "__call__", real)
    code = main(cfg_args(cfg))
    if fail_at == 1:
        assert code == 0 and [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4]
    else:
        assert code == 2 and "holds an earlier run" in capsys.readouterr().err


def test_a_resume_of_a_run_without_checkpoints_is_refused_and_leaves_the_earlier_run(tmp_path, capsys):
    """--resume of a run without checkpoints (--save-every 0) used to start again from step 0 over the finished
    run's record; it is refused before anything is loaded, and every file of the earlier run stays: its adapter
    is read with the config.json beside it (which split it trained on)."""
    from engine.train import main

    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "run"), max_steps=2)
    assert main(cfg_args(cfg)) == 0  # a finished run: adapter, config.json, metrics.jsonl, no checkpoints
    out = Path(cfg.out)
    assert (out / "adapter").is_dir() and not (out / "checkpoints").exists()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(cfg_args(cfg) + ["--resume"]) == 2
    assert "no complete checkpoint to continue from" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files


def test_launcher_finds_python3_where_there_is_no_python(tmp_path):
    """Systems that ship only python3 (Debian, Ubuntu): ./launch.sh runs with it instead of failing."""
    import shutil
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    wrapper = bin_dir / "python3"  # a wrapper, not a symlink: a symlink out of a virtualenv would leave it
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"PATH": str(bin_dir)}
    r = subprocess.run([str(bin_dir / "bash"), "launch.sh", "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "launch options" in r.stdout and "--max-steps" in r.stdout  # engine.train's own help, run by python3


# ---- a start that stopped before writing anything ---------------------------------------------------------------
def _unfinished_start(out: Path, monkeypatch) -> RunDir:
    """What rank 0 of a run has written when its first step has not been logged yet: the lock, config.json, an
    empty metrics.jsonl and ./launch.sh's launch id."""
    monkeypatch.setenv("CLAUSELORA_LAUNCH", "launch-1")
    guard = RunDir(out).lock()
    (out / "config.json").write_text(json.dumps({"data": "synthetic", "out": str(out)}))
    (out / "metrics.jsonl").write_text("")
    guard.mark_started()
    guard.fresh_start = True
    return guard


@pytest.mark.parametrize("created", [True, False])
def test_a_start_stopped_in_its_first_step_leaves_nothing_in_the_way(tmp_path, monkeypatch, created):
    """A double Ctrl-C (or any error) in the first step: the trainers discard the start and abandon OUT. The
    launch id went too (it used to stay, with the lock, and the demo's next ./launch.sh refused runs/demo); an
    OUT this run created is removed, one that was there before keeps only its lock file."""
    out = tmp_path / "run"
    if not created:
        out.mkdir()
    guard = _unfinished_start(out, monkeypatch)
    guard.discard_unfinished_start()
    guard.abandon()
    guard.release()
    assert not out.exists() if created else {p.name for p in out.iterdir()} == {".lock"}


def test_an_unfinished_start_is_no_run_for_any_rank(tmp_path, monkeypatch):
    """Every rank of a stopped start says what OUT holds (engine.checkpoint.interrupted_message); rank 1 may look
    before or after rank 0 has discarded the start's config.json and empty metrics.jsonl, and used to advise
    --overwrite where rank 0 said nothing was written. Both files, without a step's row, are nothing of a run
    (a process killed in its first step leaves them too): the same command runs again. A logged step, an
    adapter, or a config.json or metrics.jsonl alone still make a run."""
    from engine.checkpoint import interrupted_message

    out = tmp_path / "run"
    guard = _unfinished_start(out, monkeypatch)
    cfg = TrainConfig(out=str(out))
    assert guard.holds_run() == [] and "nothing was written" in interrupted_message(out)
    guard.check_start(cfg, resume=False)
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 2.5}\n')  # engine.train's evaluation before step 1
    assert guard.holds_run() == []
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 2.5}\n{"step": 1, "loss": 2.4}\n')
    assert guard.holds_run() == ["config.json", "metrics.jsonl"] and "--overwrite" in interrupted_message(out)
    (out / "metrics.jsonl").write_text("not json\n")  # never take a run for nothing
    assert guard.holds_run() == ["config.json", "metrics.jsonl"]
    (out / "metrics.jsonl").write_text("")
    (out / "adapter").mkdir()
    assert guard.holds_run() == ["config.json", "metrics.jsonl", "adapter"]
    guard.release()
    for alone in ("config.json", "metrics.jsonl"):  # (a model directory's config.json is no start of ours)
        d = tmp_path / alone
        d.mkdir()
        (d / alone).write_text("{}" if alone == "config.json" else "")
        with pytest.raises(ConfigError, match="holds an earlier run"):
            RunDir(d).check_start(TrainConfig(out=str(d)), resume=False)


def test_a_preflight_refuses_an_out_another_run_holds(tmp_path):
    """./launch.sh's preflight checks OUT without taking its lock: an OUT whose run is still loading (only the
    lock there) or in its first step is refused in one line before torchrun starts, naming the holder, instead
    of rank 0's refusal among the other ranks' failures."""
    out = tmp_path / "run"
    holder = RunDir(out).lock()  # another run (this process, through another open file)
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunDir(out).check_start(TrainConfig(out=str(out)), resume=False)
    holder.check_start(TrainConfig(out=str(out)), resume=False)  # the holder itself goes on
    holder.release()
    RunDir(out).check_start(TrainConfig(out=str(out)), resume=False)  # released: free


def test_the_demo_replaces_only_an_earlier_demo(tmp_path):
    """./launch.sh's demo in REPO/runs/demo: none there or only our marker files -> a new start; an earlier
    demo (its config.json: synthetic data, this OUT; written as runs/demo, relative to the repository, before
    the launcher passed an absolute path) -> replaced; anything else -> refused."""
    from engine.rundir import demo_dir_state

    repo = tmp_path / "repo"
    out = repo / "runs" / "demo"
    assert demo_dir_state(out, repo) == "new"
    out.mkdir(parents=True)
    assert demo_dir_state(out, repo) == "new"
    (out / ".lock").write_text("1\n")
    (out / ".launch").write_text("1.2\n")
    assert demo_dir_state(out, repo) == "new"
    for saved, state in ((str(out), "demo"), ("runs/demo", "demo"), ("runs/other", "other"),
                         (str(tmp_path / "elsewhere"), "other")):
        (out / "config.json").write_text(json.dumps({"data": "synthetic", "out": saved}))
        assert demo_dir_state(out, repo) == state, saved
    (out / "config.json").write_text(json.dumps({"data": "acord:/d", "out": str(out)}))
    assert demo_dir_state(out, repo) == "other"
    (out / "config.json").write_text("[1, 2]")
    assert demo_dir_state(out, repo) == "other"
    (out / "config.json").unlink()
    # a demo that replaced an earlier one and stopped in its first step: that run's files went, its evaluations
    # stayed (./launch.sh now removes them when it replaces a demo; a directory left so before is a demo's too)
    for name in ("eval", "eval-before"):
        (out / name).mkdir()
        (out / name / "eval.json").write_text("{}")
    assert demo_dir_state(out, repo) == "demo"
    (out / "notes.txt").write_text("mine")
    assert demo_dir_state(out, repo) == "other"
