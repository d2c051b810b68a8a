"""engine.channel_train's recipes (--config FILE.toml) and exact resume: N steps straight == stopped by SIGTERM
(one process, and two under ./launch.sh --channel) + --resume to N. Identical means every metrics.jsonl field but
the wall clock and peak memory (CLOCK) equal, and the final adapter file byte-identical."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_calibrate import _paragraph_data
from tests.test_evaluate import tiny_model_dir  # noqa: F401  (the module-scoped fixture)

STEPS = 24
CLOCK = {"seconds", "peak_mem_bytes"}  # wall clock and resident memory: the only fields that may differ


def _args(model, spec, out, *extra):
    return ["--model", str(model), "--data", spec, "--out", str(out), "--max-steps", str(STEPS),
            "--groups-per-step", "2", "--max-candidates", "2", "--lr", "3e-3", "--warmup-steps", "2",
            "--quantize", "none", "--precision", "fp32", "--no-checkpointing", "--save-every", "4",
            "--keep-last", "2", "--threads", "1", *extra]


def _run(argv, nproc=0, timeout=300, launch=()):
    """engine.channel_train alone, or with nproc under ./launch.sh (`launch`: more launcher options)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", sys.executable)}
    cmd = (["./launch.sh", "--nproc", str(nproc), *launch, "--channel"] if nproc else
           [sys.executable, "-m", "engine.channel_train"]) + argv
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _steps_logged(out):
    p = Path(out) / "metrics.jsonl"
    return sum(1 for ln in p.read_text().splitlines() if '"loss"' in ln) if p.exists() else 0


def _stop_after(proc, out, n):
    t0 = time.monotonic()
    while _steps_logged(out) < n:
        assert proc.poll() is None, f"run ended before step {n}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() - t0 < 240, f"timed out waiting for step {n}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # to the command (or launch.sh) only, as a job scheduler sends it


def _same(a, b):
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, STEPS + 1))
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if k not in CLOCK} == {k: v for k, v in y.items() if k not in CLOCK}
    fa, fb = (Path(d) / "adapter" / "adapter_model.safetensors" for d in (a, b))
    assert fa.read_bytes() == fb.read_bytes()


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("channel_resume")
    spec = _paragraph_data(tmp / "d.jsonl")
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, tmp / "straight")))
    assert code == 0, err[-3000:]
    return tmp, spec, tmp / "straight"


def test_sigterm_then_resume_is_identical_to_the_straight_run(straight, tiny_model_dir):  # noqa: F811
    tmp, spec, ref = straight
    out = tmp / "stopped"
    p = _run(_args(tiny_model_dir, spec, out))
    _stop_after(p, out, 6)
    code, _, err = _finish(p)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    at = _steps_logged(out)
    assert "stopped by signal" in err and 6 <= at < STEPS
    assert (out / "checkpoints" / f"step-{at}" / "state.json").is_file()
    assert (out / "checkpoints" / f"step-{at}" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list((out / "checkpoints").iterdir())) <= 2  # --keep-last 2
    assert not (out / "adapter").exists()  # the adapter is written only by a finished run
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, out, "--resume")))
    assert code == 0, err[-3000:]
    assert re.search(rf"resumed from \S+step-{at} at step {at}\b", err), err[-3000:]  # not a restart from 0
    _same(ref, out)


def test_resume_refuses_other_settings_and_continues_to_more_steps(straight, tiny_model_dir):  # noqa: F811
    """A --resume that would compute something else is refused before anything is written, naming the flag;
    one with a larger --max-steps continues from the final checkpoint (step 24) instead of starting over."""
    from engine.channel_train import main

    tmp, spec, ref = straight
    out = tmp / "more"
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, out)))
    assert code == 0, err[-3000:]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(_args(tiny_model_dir, spec, out, "--resume", "--lr", "1e-3")) == 2  # a usage error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    argv = _args(tiny_model_dir, spec, out, "--resume")
    argv[argv.index("--max-steps") + 1] = str(STEPS - 4)  # would end before the final checkpoint (step 24)
    assert main(argv) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    argv[argv.index("--max-steps") + 1] = str(STEPS + 4)
    # the precision as written may change ("auto" is fp32 here too): the checkpoint checks the mode it resolves to
    argv += ["--precision", "auto"]
    assert json.loads((out / "config.json").read_text())["hard_share"] == 0.5  # the value used, as always recorded
    code, _, err = _finish(_run(argv))
    assert code == 0, err[-3000:]
    assert f"at step {STEPS}" in err and [r["step"] for r in _metrics(out)] == list(range(1, STEPS + 5))
    clock = lambda rows: [{k: v for k, v in r.items() if k not in CLOCK} for r in rows]  # noqa: E731
    assert clock(_metrics(out)[:STEPS]) == clock(_metrics(ref))  # the first 24 steps kept, the 4 more appended


def test_a_changed_setting_on_resume_is_named(straight, tiny_model_dir, capsys):  # noqa: F811
    from engine.channel_train import main

    tmp, spec, ref = straight
    capsys.readouterr()
    assert main(_args(tiny_model_dir, spec, ref, "--resume", "--max-candidates", "3")) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_candidates (saved 2, now 3)" in err, err


@pytest.fixture(scope="module")
def two_straight(straight, tiny_model_dir):  # noqa: F811
    """The uninterrupted run under ./launch.sh --nproc 2 --channel."""
    tmp, spec, _ = straight
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, tmp / "two"), nproc=2))
    assert code == 0, err[-3000:]
    return tmp / "two"


def test_two_processes_stopped_through_the_launcher_resume_byte_identical(straight, two_straight,
                                                                          tiny_model_dir):  # noqa: F811
    """./launch.sh --nproc 2 --channel, the recipe's way: SIGTERM to the launcher reaches both workers, which
    write one checkpoint together; --resume under the launcher ends as the uninterrupted 2-process run does."""
    tmp, spec, _ = straight
    out = tmp / "two-stopped"
    p = _run(_args(tiny_model_dir, spec, out), nproc=2)
    _stop_after(p, out, 5)
    code, _, err = _finish(p)
    assert code == 143, err[-3000:]
    at = _steps_logged(out)
    assert 5 <= at < STEPS and (out / "checkpoints" / f"step-{at}" / "state.json").is_file()
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, out, "--resume"), nproc=2))
    assert code == 0, err[-3000:]
    assert f"at step {at}" in err
    _same(two_straight, out)


def _worker_pid(out, local_rank: int, module: str = "engine.channel_train") -> int:
    """The pid of the training process (not torchrun's) with this LOCAL_RANK writing to `out` (Linux /proc)."""
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that has just ended
            continue
        if module.encode() in cmd and b"torch.distributed.run" not in cmd and str(out).encode() in cmd \
                and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(d.name)
    raise AssertionError(f"no worker with LOCAL_RANK {local_rank} for {out}")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_worker_is_restarted_by_the_launcher_and_ends_as_the_straight_run(straight, two_straight,
                                                                               tiny_model_dir, victim):  # noqa: F811
    """./launch.sh --max-restarts 1: one worker dies by SIGKILL (no checkpoint of its own) after step 10, the
    launcher starts torchrun again, the workers continue from the newest checkpoint (step 8) and end as the
    uninterrupted run does."""
    tmp, spec, _ = straight
    out = tmp / f"killed-{victim}"
    p = _run(_args(tiny_model_dir, spec, out), nproc=2, launch=("--max-restarts", "1"))
    t0 = time.monotonic()
    while _steps_logged(out) < 10:
        assert p.poll() is None, f"run ended before step 10: {p.communicate()[1][-3000:]}"
        assert time.monotonic() - t0 < 240, "timed out waiting for step 10"
        time.sleep(0.005)
    os.kill(_worker_pid(out, victim), signal.SIGKILL)
    code, _, err = _finish(p)
    assert code == 0, err[-3000:]
    m = re.search(r"resumed from \S+step-(\d+) at step (\d+)\b", err)
    assert "restart 1 of 1" in err and m and m[1] == m[2] and int(m[1]) >= 8, err[-3000:]
    _same(two_straight, out)


def test_a_signal_stops_a_run_that_may_restart(straight, tiny_model_dir):  # noqa: F811
    """./launch.sh --max-restarts 1 and SIGTERM: the workers write their checkpoint and exit 143, and nothing starts
    them again (torchrun's own --max-restarts took that exit for a failure, restarted them, and the stopped run went
    on to its last step)."""
    tmp, spec, _ = straight
    out = tmp / "stopped-restartable"
    p = _run(_args(tiny_model_dir, spec, out), nproc=2, launch=("--max-restarts", "1"))
    _stop_after(p, out, 5)
    code, _, err = _finish(p)
    assert code == 143, err[-3000:]
    at = _steps_logged(out)
    assert 5 <= at < STEPS and (out / "checkpoints" / f"step-{at}" / "state.json").is_file(), err[-3000:]
    assert "stopped by signal" in err and "resumed" not in err and "restart 1" not in err, err[-3000:]
    assert not (out / "adapter").exists()


def test_a_config_file_gives_defaults_the_command_line_overrides(tmp_path):
    from engine.channel_train import build_parser
    from engine.cli import parse_with_config

    cfg = tmp_path / "r.toml"
    cfg.write_text('data = "synthetic"\nout = "runs/x"\nmax_steps = 7\nlr = 1\ncheckpointing = false\n'
                   'unit = "sentence"\n')
    a = parse_with_config(build_parser(), ["--config", str(cfg), "--max-steps", "9"])
    assert (a.data, a.out, a.max_steps, a.lr, a.checkpointing, a.unit) == ("synthetic", "runs/x", 9, 1.0, False,
                                                                           "sentence")
    assert isinstance(a.lr, float) and a.groups_per_step == 4  # a flag the file leaves out keeps its default


@pytest.mark.parametrize("text, words", [
    ("max_step = 7\n", ["unknown key 'max_step'"]),
    ("max_steps = 7.5\n", ["'max_steps' must be int"]),
    ("checkpointing = 1\n", ["'checkpointing' must be bool"]),
    ('unit = "word"\n', ["'unit' must be one of paragraph, sentence"]),
    ("max_steps = \n", ["invalid TOML"]),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, words):
    from engine.channel_train import main

    cfg = tmp_path / "r.toml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg), "--data", "synthetic", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and str(cfg) in err and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*channel*.toml")))
def test_the_shipped_channel_recipes_parse(name):
    """Every key of the shipped recipes (configs/*channel*.toml; the others are engine.train's) is a flag of the
    right type: a typo would stop the user's run."""
    from engine.channel_train import build_parser, check_args
    from engine.cli import parse_with_config

    a = parse_with_config(build_parser(), ["--config", str(REPO / "configs" / name), "--out", "o"])
    check_args(a)
    assert a.data and a.max_steps > 0 and a.groups_per_step % 2 == 0  # 2 processes take equal shares


@pytest.mark.parametrize("bad", [["--data", "jsonl:/nonexistent/data.jsonl"], ["--lr", "-1"],
                                 ["--data", "synthetic", "--config", "/nonexistent/recipe.toml"]])
def test_the_launcher_reports_a_bad_channel_setting_once_before_torchrun(tmp_path, bad):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", sys.executable)}
    argv = ["./launch.sh", "--nproc", "2", "--channel", "--out", str(tmp_path / "o"), *bad]
    if "--lr" in bad:
        argv += ["--data", "synthetic"]
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
    assert r.returncode == (1 if "jsonl:" in " ".join(bad) else 2), r.stderr  # a missing file; usage errors
    assert "torch.distributed" not in r.stderr and not (tmp_path / "o").exists()


def test_ctrl_c_to_the_whole_process_group_still_checkpoints(straight, tiny_model_dir):  # noqa: F811
    """Ctrl-C in a terminal reaches every process of the foreground group. launch.sh runs torchrun in a session
    of its own, so the signal reaches launch.sh alone, which passes it to each worker once (without that, each
    worker got it from the terminal, from launch.sh and from torchrun, and torchrun killed them 30 s later); a
    worker that still gets it twice at once takes it as one request (StopFlag). One request: finish the step,
    checkpoint, exit 130, not the "second signal" that stops at once. Signalled after step 5, so the
    checkpoint is the signal's, not a --save-every one."""
    tmp, spec, _ = straight
    out = tmp / "ctrl-c"
    p = _run(_args(tiny_model_dir, spec, out), nproc=2)
    t0 = time.monotonic()
    while _steps_logged(out) < 5:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 240
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGINT)  # the terminal's way: the whole process group
    code, _, err = _finish(p)
    assert code == 130 and "stopped by signal" in err, err[-3000:]
    at = _steps_logged(out)
    assert at < STEPS and at % 4 and (out / "checkpoints" / f"step-{at}" / "state.json").is_file(), err[-3000:]
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, out, "--resume"), nproc=2))
    assert code == 0 and f"at step {at}" in err, err[-3000:]


def test_kill_9_between_checkpoints_then_resume_is_identical(straight, tiny_model_dir):  # noqa: F811
    """No handler runs on SIGKILL: the steps after the newest checkpoint are lost, their metrics lines dropped
    on --resume and redone, and the data stream picks up at that checkpoint, not at the last logged step."""
    tmp, spec, ref = straight
    out = tmp / "kill9"
    p = _run(_args(tiny_model_dir, spec, out))
    t0 = time.monotonic()
    while not ((out / "checkpoints" / "step-8" / "state.json").is_file() and _steps_logged(out) >= 10):
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 240
        time.sleep(0.002)
    p.kill()
    p.communicate(timeout=60)
    logged = _steps_logged(out)
    code, _, err = _finish(_run(_args(tiny_model_dir, spec, out, "--resume")))
    assert code == 0, err[-3000:]
    at = re.search(r"resumed from \S+ at step (\d+)", err)
    assert at and 8 <= int(at.group(1)) < STEPS, err[-3000:]
    assert int(at.group(1)) < logged or logged % 4 == 0  # some logged steps were redone (unless killed right at a save)
    _same(ref, out)


def test_a_signal_before_the_workers_exist_still_stops_the_run(straight, tiny_model_dir):  # noqa: F811
    """SIGTERM to ./launch.sh while torchrun is still starting its workers: the launcher keeps the signal and
    passes it on once they exist (it used to send it to no one, and the run went on to its end). The run stops
    without an adapter, with status 143."""
    tmp, spec, _ = straight
    out = tmp / "stopped-early"
    p = _run(_args(tiny_model_dir, spec, out), nproc=2)
    t0 = time.monotonic()
    while not any(b"torch.distributed.run" in c and str(out).encode() in c for c in _cmdlines()):
        assert p.poll() is None and time.monotonic() - t0 < 60, "torchrun did not start"
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)  # torchrun imports torch before it starts the workers: about a second here
    code, _, err = _finish(p)
    assert code == 143, err[-3000:]
    assert _steps_logged(out) < STEPS and not (out / "adapter").exists(), err[-3000:]


def _cmdlines() -> list[bytes]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            found.append((d / "cmdline").read_bytes())
        except OSError:
            continue
    return found



def test_a_restart_continues_only_a_run_its_own_launch_started(straight, tiny_model_dir):  # noqa: F811
    """A worker started again by ./launch.sh --max-restarts (CLAUSELORA_RESTART > 0) continues the run in OUT only
    when an attempt of the same launch (CLAUSELORA_LAUNCH) had started there. An --overwrite run whose first
    attempt died while loading, before it cleared OUT, must not resume the earlier run it was asked to replace."""
    import shutil

    tmp, spec, ref = straight
    out = tmp / "restarted-overwrite"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns(".lock"))  # a finished earlier run, same settings
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLAUSELORA_RESTART": "1", "CLAUSELORA_LAUNCH": "launch-2"}
    argv = [sys.executable, "-m", "engine.channel_train", *_args(tiny_model_dir, spec, out, "--overwrite")]
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr and "restart: no checkpoint" not in r.stderr, r.stderr[-3000:]  # replaced
    assert [x["step"] for x in _metrics(out)] == list(range(1, STEPS + 1))
    assert (out / ".launch").read_text().strip() == "launch-2"
    # the same launch restarted again: this time the run in OUT is its own, so it continues (from step 24: done)
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"resumed from \S+step-{STEPS} at step {STEPS}\b", r.stderr), r.stderr[-3000:]
