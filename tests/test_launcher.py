"""./launch.sh as a user meets it: run from any directory (their paths are theirs, the demo's are the
repository's, and a data/ or model/ folder of theirs stands in for nothing), a Python without torch or a flag
without its value is one line of error, a stopped demo says truthfully what it left and never blocks the next
one, and workers stopped on a signal end without torchrun's failure report or a traceback.

The demo cases run a copy of launch.sh in a scratch "repository" (the real packages linked in), with PYTHON a
stub that plays torchrun's part: the repository's own runs/demo is never touched."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import tiny_jsonl, tiny_model_dir


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def _launch(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A directory of the user's, not the repository, holding a data/ and a model/ folder of their own."""
    cwd = tmp_path / "work"
    (cwd / "data").mkdir(parents=True)
    (cwd / "model").mkdir()
    return cwd


# ---- from another directory ----------------------------------------------------------------------------------
def test_a_data_folder_in_the_current_directory_does_not_hide_the_project(elsewhere):
    """`python -m engine.X` beside a data/ or model/ folder (no __init__.py: a namespace package, found before the
    editable install's finder) used to fail with "cannot import name 'load_source' from 'data' (unknown
    location)"; engine/__init__.py puts the project first on sys.path when either name is not its own."""
    r = subprocess.run([sys.executable, "-m", "engine.extract", "--help"], cwd=elsewhere, capture_output=True,
                       text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and "--contract" in r.stdout, r.stderr[-2000:]
    code = "import engine, data, model; print(engine.__file__); print(data.__file__); print(model.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    engine, data, model = (Path(p).resolve() for p in r.stdout.split())
    root = engine.parents[1]  # (the installed project: this checkout, or the one pip install -e named)
    assert (data, model) == (root / "data" / "__init__.py", root / "model" / "__init__.py")


def test_the_launcher_reads_the_users_paths_where_it_is_run(elsewhere):
    """A relative --config, and the recipe's relative model, data and out, are the user's directory's, not the
    repository's (launch.sh used to cd into the repository: "r.toml: config file not found"); the run's
    processes import the project, not the user's data/ and model/ folders. One process, one step."""
    tiny_model_dir(elsewhere / "tiny")
    tiny_jsonl(elsewhere / "d.jsonl")
    (elsewhere / "r.toml").write_text(textwrap.dedent("""\
        model = "tiny"
        data = "jsonl:d.jsonl"
        out = "run"
        max_steps = 1
        seq_len = 384
        pack = false
        batch_size = 1
        lora_r = 4
        device = "cpu"
        """))
    r = _launch(["--nproc", "1", "--config", "r.toml"], elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (REPO / "run").exists()


def test_a_bad_file_named_relative_to_the_users_directory_is_read_there(elsewhere):
    """The preflight reads the user's relative --config and its relative data file (and names what is wrong in
    it), from the user's directory."""
    (elsewhere / "r.toml").write_text('data = "jsonl:d.jsonl"\nout = "o"\nmax_steps = 1\n')
    (elsewhere / "d.jsonl").write_text("not json\n")
    r = _launch(["--nproc", "2", "--config", "r.toml"], elsewhere, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: d.jsonl:1: not valid JSON"), r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (elsewhere / "o").exists()


# ---- the interpreter and the launcher's own flags ---------------------------------------------------------------
def test_a_python_without_torch_is_one_line_naming_it(tmp_path):
    no_site = tmp_path / "python-no-site"  # python -S: no site-packages, so no torch
    no_site.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    no_site.chmod(0o755)
    for args in ([], ["--nproc", "2", "--max-steps", "1"], ["--help"]):
        r = _launch(args, tmp_path, env=_env(PYTHON=str(no_site)), timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: {no_site} (") and "cannot import torch" in r.stderr
        assert "PYTHON=" in r.stderr and "Traceback" not in r.stderr
    r = _launch([], tmp_path, env=_env(PYTHON=str(tmp_path / "nothing-here")), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: no Python interpreter") and "PYTHON=" in r.stderr


@pytest.mark.parametrize("flag", ["--nproc", "--max-restarts"])
def test_a_launcher_flag_without_its_value_is_a_usage_error(tmp_path, flag):
    r = _launch([flag], tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr == f"error: {flag} needs a number (e.g. {flag} 2); see ./launch.sh --help\n"
    r = _launch(["--help", flag, "2"], tmp_path, timeout=120)  # with its value, last on the line: fine
    assert r.returncode == 0 and "launch options" in r.stdout, r.stderr


# ---- signals ---------------------------------------------------------------------------------------------------
def test_a_worker_signalled_while_it_imports_exits_quietly(tmp_path):
    """Under torchrun (TORCHELASTIC_RUN_ID), a SIGINT before the command's own handler is installed ends the
    worker with 130 and no KeyboardInterrupt traceback."""
    code = "import engine, os, signal, time; os.kill(os.getpid(), signal.SIGINT); time.sleep(30)"
    env = _env(TORCHELASTIC_RUN_ID="test")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "", r.stderr
    r = subprocess.run([sys.executable, "-c", code.replace("SIGINT", "SIGTERM")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and r.stderr == "", r.stderr


def _torchrun(tmp_path, worker_code: str) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(worker_code)
    code = "import sys; from engine.cli import torchrun; sys.exit(torchrun(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--standalone", "--nproc_per_node", "2", str(worker)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)


def test_workers_stopped_on_a_signal_end_without_torchruns_failure_report(tmp_path):
    r = _torchrun(tmp_path, "import sys\nsys.exit(130)\n")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "FAILED" not in r.stderr and "Traceback" not in r.stderr and "exitcode" not in r.stderr, r.stderr
    r = _torchrun(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")  # killed by it
    assert r.returncode == 143 and "FAILED" not in r.stderr, r.stderr[-3000:]


def test_a_real_worker_failure_keeps_torchruns_report(tmp_path):
    r = _torchrun(tmp_path, "import sys\nsys.exit(3)\n")
    assert r.returncode == 1 and "FAILED" in r.stderr and "exitcode  : 3" in r.stderr, r.stderr[-3000:]


# ---- the demo ----------------------------------------------------------------------------------------------------
STUB = """#!/bin/bash
# PYTHON for the demo tests: torchrun's part is played here (the arguments recorded, OUT left as $STUB_LEAVES
# says, the workers' status returned); everything else is the real Python
if [[ "$1" == "-c" && "$2" == *torch.distributed.run* ]]; then
  printf '%s\\n' "${@:3}" "OMP_NUM_THREADS=$OMP_NUM_THREADS" > "$STUB_LOG"
  out=${@: -1}; [[ "${@: -1}" == --overwrite ]] && out=${@: -2:1}
  mkdir -p "$out"
  : > "$out/.lock"; echo launch > "$out/.launch"
  if [[ $STUB_LEAVES == checkpoint ]]; then
    mkdir -p "$out/checkpoints/step-20"; echo '{}' > "$out/checkpoints/step-20/state.json"
    printf '{"data": "synthetic", "out": "%s"}\\n' "$out" > "$out/config.json"
    echo '{"step": 1, "loss": 1.0}' > "$out/metrics.jsonl"
  fi
  exit "${STUB_EXIT:-130}"
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def scratch_repo(tmp_path) -> Path:
    """launch.sh in a directory of its own with the project's packages and configs linked in: its runs/demo is
    the test's."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(REPO / "launch.sh", repo / "launch.sh")
    for name in ("engine", "model", "data", "configs"):
        (repo / name).symlink_to(REPO / name)
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return repo


def _demo(repo: Path, tmp_path: Path, leaves: str = "nothing") -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "torchrun-args"
    log.unlink(missing_ok=True)
    env = _env(PYTHON=str(tmp_path / "python-stub"), REAL_PYTHON=sys.executable, STUB_LOG=str(log),
               STUB_LEAVES=leaves)
    r = subprocess.run([str(repo / "launch.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return r, (log.read_text().splitlines() if log.exists() else [])


def test_a_stopped_demo_says_what_it_left_and_never_blocks_the_next(scratch_repo, tmp_path):
    """A demo stopped in its first step leaves at most our marker files (.lock, .launch) in runs/demo: the next
    ./launch.sh starts there as in a new directory (it used to refuse: "runs/demo exists and is not an earlier demo
    run"), and the stop's line claims a checkpoint only where one exists (it used to claim one always)."""
    out = (scratch_repo / "runs" / "demo").resolve()
    out.mkdir(parents=True)
    (out / ".lock").write_text("123\n")
    (out / ".launch").write_text("1.2\n")
    r, args = _demo(scratch_repo, tmp_path)
    assert r.returncode == 130, r.stderr[-3000:]
    assert args[args.index("--out") + 1] == str(out) and "--overwrite" not in args  # the repository's runs/demo
    assert args[args.index("--config") + 1] == str(scratch_repo.resolve() / "configs" / "demo_channel.toml")
    last = r.stderr.strip().splitlines()[-1]
    assert last == "== stopped by signal before the demo's first checkpoint; ./launch.sh starts the demo over"
    assert "wrote a checkpoint" not in r.stderr

    r, args = _demo(scratch_repo, tmp_path, leaves="checkpoint")  # still only markers: a new start again
    assert r.returncode == 130 and "--overwrite" not in args, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (f"== stopped by signal: the demo's newest checkpoint is "
                                                 f"{out / 'checkpoints' / 'step-20'}; ./launch.sh starts the demo over")
    r, args = _demo(scratch_repo, tmp_path)  # an earlier demo there now: replaced
    assert "--overwrite" in args and "== replacing the previous demo run" in r.stdout, r.stderr[-3000:]

    (out / "config.json").write_text(json.dumps({"data": "acord:/x", "out": str(out)}))  # the user's run
    r, args = _demo(scratch_repo, tmp_path)
    assert r.returncode == 2 and not args and "is not an earlier demo run" in r.stderr, r.stderr


def test_a_signal_stop_not_sent_through_the_launcher_is_no_failure_to_restart(scratch_repo, tmp_path):
    """Workers that exit 130/143 stopped on a signal sent to them directly (a job scheduler signals every
    process): the launcher does not start them again under --max-restarts, and says what OUT holds."""
    log = tmp_path / "torchrun-args"
    env = _env(PYTHON=str(tmp_path / "python-stub"), REAL_PYTHON=sys.executable, STUB_LOG=str(log),
               STUB_LEAVES="nothing")
    r = subprocess.run([str(scratch_repo / "launch.sh"), "--max-restarts", "2", "--nproc", "2", "--data",
                        "synthetic", "--out", "o"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130 and "restart" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == ("== stopped by signal before training began; nothing was written "
                                                 "to o: run the same command again")
    assert len(log.read_text().splitlines()) > 0  # torchrun ran once


def test_the_core_count_falls_back_where_there_is_no_affinity(scratch_repo, tmp_path):
    """macOS has no os.sched_getaffinity: the launcher counts os.cpu_count() instead (OMP_NUM_THREADS: the cores
    per process)."""
    (tmp_path / "sitecustomize.py").write_text("import os\ndel os.sched_getaffinity\n")
    log = tmp_path / "torchrun-args"
    env = _env(PYTHON=str(tmp_path / "python-stub"), REAL_PYTHON=sys.executable, STUB_LOG=str(log),
               STUB_LEAVES="nothing", STUB_EXIT="0", PYTHONPATH=str(tmp_path))
    del env["OMP_NUM_THREADS"]
    r = subprocess.run([str(scratch_repo / "launch.sh"), "--nproc", "2", "--data", "synthetic", "--out", "o"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"OMP_NUM_THREADS={max(1, os.cpu_count() // 2)}" in log.read_text().splitlines()
