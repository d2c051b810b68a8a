"""Atomic, pickle-free checkpoints for exact resume, and SIGTERM/SIGINT handling.

Layout of OUT/checkpoints/step-N/ (written as step-N.tmp/ then renamed, so a directory named step-N is always
complete; a kill at any moment leaves at most a *.tmp directory, removed on the next start):
  trainable.safetensors   every trainable parameter by its model name, fp32 (exact resume)
  adapter/                the same weights in PEFT layout (evaluate or export any checkpoint directly)
  optimizer.safetensors   optimizer state tensors, keyed "<param index>.<name>"
  optimizer.json          the rest of the optimizer state (param_groups, python scalars)
  rng.safetensors         torch CPU / CUDA generator states of every rank (uint8)
  state.json              step, loss scaler, sampler position and RNG of python/numpy per rank, run counters
No pickle anywhere: a checkpoint from an untrusted place cannot execute code when loaded.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine import dist
from engine.config import ConfigError
from engine.rundir import RunDir
from model.files import WriteError, atomic_dir, atomic_write_text, fsync_dir, fsync_file

_STEP_DIR = re.compile(r"^step-(\d+)$")
_MOVED_ASIDE = re.compile(r"^step-(\d+)\.tmp\.old$")


class StopFlag:
    """First SIGTERM/SIGINT: ask the loop to save and stop after the current step. Second (2 s or more later):
    exit now.

    Kaggle and Colab end sessions with SIGTERM and a grace period; Ctrl-C is SIGINT. The second signal raises
    SystemExit wherever the main thread is; if that is inside `save`, the partial step-N.tmp is deleted on the
    way out, so no half-written checkpoint survives and the previous complete one stays the newest.
    A signal within `repeat_s` seconds of the first is the same request delivered again, not a second one: Ctrl-C
    in a terminal reaches every process of the foreground group, and ./launch.sh and torchrun each pass it on,
    so a worker can get it three times within milliseconds (a job scheduler that signals every process of a job
    does the same).
    """

    def __init__(self, repeat_s: float = 2.0):
        self.signum = 0
        self.count = 0
        self.repeat_s = repeat_s
        self._first = 0.0

    def install(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def uninstall(self):
        for s, h in getattr(self, "_previous", {}).items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.count and now - self._first < self.repeat_s:
            return  # the first request, delivered again
        self.count += 1
        if self.count == 1:
            self._first = now
        self.signum = self.signum or signum
        if self.count >= 2:
            raise SystemExit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.count > 0


def ckpt_root(out) -> Path:
    return Path(out) / "checkpoints"


def complete_checkpoints(out) -> list[tuple[int, Path]]:
    root = ckpt_root(out)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name) or _MOVED_ASIDE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            # a step-N.tmp.old counts only without its step-N: a save of that step again stopped between moving
            # the old copy aside and putting the new one in place (remove_partial puts it back)
            n = int(m.group(1))
            if n not in found or not p.name.endswith(".old"):
                found[n] = p
    return sorted(found.items())


def latest(out) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def write_failed(out, e: OSError, what: str = "") -> WriteError:
    """A write into run directory OUT that failed (a full disk, mostly), as one line that says what survived and
    how to go on: the newest complete checkpoint, which --resume continues from, or none (--overwrite starts
    again). what: what was lost, said first (e.g. "the trained adapter was not saved")."""
    prev = latest(out)
    head = str(e) if isinstance(e, WriteError) else f"{getattr(e, 'filename', None) or out}: cannot write it " \
                                                     f"({e.strerror or e})"
    go_on = (f"{prev} is intact: once there is room, the same command with --resume continues from it" if prev
             else "there is no checkpoint to continue from: once there is room, run the same command with --overwrite")
    return WriteError(f"{head}; {what + '; ' if what else ''}{go_on}")


def remove_partial(out):
    """Delete leftovers of interrupted saves (step-N.tmp, step-N.tmp.old, and the adapter's own .adapter.tmp-*
    directories beside OUT/adapter), except a complete step-N.tmp.old whose step-N is missing, which is put back.
    Rank 0 only."""
    for p in Path(out).glob(".adapter.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    root = ckpt_root(out)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            final = root / p.name.removesuffix(".tmp.old")
            if p.name.endswith(".tmp.old") and not final.exists() and (p / "state.json").is_file():
                # a save of the same step again stopped between moving the old step-N aside and putting the new
                # one in its place: the old one is complete, and may be the newest checkpoint there is
                os.replace(p, final)
            elif p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- RNG
def rng_state(device: torch.device) -> tuple[dict, dict]:
    """(tensors, json) for this rank: torch CPU/CUDA generators as uint8 tensors, python/numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    v, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [v, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return tensors, js


def set_rng_state(tensors: dict, js: dict, device: torch.device):
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    v, internal, gauss = js["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- optimizer
def optimizer_to_files(sd: dict) -> tuple[dict, dict]:
    """Split optimizer.state_dict() into safetensors-able tensors and a JSON document."""
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                key = f"{pid}.{k}"
                tensors[key] = v.detach().cpu().contiguous()
                entry[k] = {"tensor": key}
            else:
                entry[k] = {"value": v}
        state[str(pid)] = entry
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"state": state, "param_groups": groups, "tuples": ["betas"]}


def optimizer_from_files(tensors: dict, js: dict) -> dict:
    state = {}
    for pid, entry in js["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    groups = [{k: (tuple(v) if k in js["tuples"] and isinstance(v, list) else v) for k, v in g.items()}
              for g in js["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- save / load
def _write_json(path: Path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_files(root: Path) -> None:
    """Every file under root, and its subdirectories' entries, on disk."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fsync_file(p)
        else:
            fsync_dir(p)


def trainable_state(model: torch.nn.Module) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(out, step: int, *, model, optimizer, precision, sampler_state, counters: dict, keep_last: int,
         base_model: str, save_adapter=None) -> Path | None:
    """Collective: every rank calls it (RNG and sampler states are gathered); rank 0 writes. Returns the path."""
    d = dist.get()
    rng_t, rng_j = rng_state(d.device)
    gathered = dist.gather_objects({"rng_t": {k: v.tolist() for k, v in rng_t.items()}, "rng_j": rng_j,
                                    "sampler": sampler_state})
    # model/optimizer states are identical on every rank (DDP keeps them in lockstep); rank 0 writes them
    final = None
    if d.is_main:
        final = ckpt_root(out) / f"step-{step}"
        try:
            _write_checkpoint(final, step, model, optimizer, precision, gathered, counters, base_model, save_adapter,
                              d.world_size)
        except OSError as e:  # a full disk: the earlier checkpoints are untouched (atomic_dir), say so
            raise write_failed(out, e) from None
        for _, p in complete_checkpoints(out)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _write_checkpoint(final: Path, step: int, model, optimizer, precision, gathered, counters, base_model,
                      save_adapter, world_size: int) -> None:
    """OUT/checkpoints/step-N, whole or not at all: a fixed temporary name (remove_partial finds it), fsync'd
    before and after the rename; saving the same step again (resumed then stopped at once) moves the old step-N
    aside, swaps, then drops it."""
    with atomic_dir(final, tmp_name=f"step-{step}.tmp", fsync=True) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        if save_adapter is not None:
            save_adapter(model, tmp / "adapter", base_model=base_model)
        opt_t, opt_j = optimizer_to_files(optimizer.state_dict())
        save_file(opt_t, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", opt_j)
        rng_tensors = {f"rank{r}.{k}": torch.tensor(v, dtype=torch.uint8)
                       for r, g in enumerate(gathered) for k, v in g["rng_t"].items()}
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {"step": step, "world_size": world_size, "precision": precision.state_dict(),
                 "rng": [g["rng_j"] for g in gathered], "sampler": [g["sampler"] for g in gathered],
                 "counters": counters}
        _fsync_files(tmp)  # on disk before state.json says they are: a power cut leaves no empty tensor file
        _write_json(tmp / "state.json", state)  # written last: its presence marks the content complete


def load(path: Path, *, model, optimizer, precision) -> dict:
    """Restore weights, optimizer, scaler and this rank's RNG from a checkpoint; returns state.json contents
    (with 'sampler' reduced to this rank's entry). A checkpoint whose files do not read (damaged after it was
    completed: a disk error, a hand edit) is one error naming it and what to do."""
    path = Path(path)
    try:
        return _load(path, model=model, optimizer=optimizer, precision=precision)
    except (json.JSONDecodeError, SafetensorError, OSError, KeyError, IndexError, TypeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path}: checkpoint does not read ({what}); delete this step directory to resume from "
                         "the one before it, or start again with --overwrite") from None


def _load(path: Path, *, model, optimizer, precision) -> dict:
    d = dist.get()
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != d.world_size:
        raise ValueError(f"{path}: saved with {state['world_size']} processes, resuming with {d.world_size}; "
                         "exact resume needs the same --nproc")
    saved_mode = state["precision"].get("mode")
    if saved_mode and saved_mode != precision.mode:  # "auto" is fp16 on a T4, bf16 on an A100, fp32 on a CPU
        raise ValueError(f"{path}: saved in precision {saved_mode}, resuming in {precision.mode}; exact resume "
                         f"needs the same: pass --precision {saved_mode} (on a device that has it)")
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != want:
        raise ValueError(f"{path}: trainable parameters differ from this model's (different lora_r / targets?)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt_t = load_file(path / "optimizer.safetensors")
    opt_j = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(optimizer_from_files(opt_t, opt_j))
    precision.load_state_dict(state["precision"])
    rng_all = load_file(path / "rng.safetensors")
    prefix = f"rank{d.rank}."
    set_rng_state({k[len(prefix):]: v for k, v in rng_all.items() if k.startswith(prefix)},
                  state["rng"][d.rank], d.device)
    state["sampler"] = state["sampler"][d.rank]
    return state


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a torn last line (killed mid-write) counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def check_resumable(out) -> None:
    """Refuse a --resume of a run that logged steps but holds no complete checkpoint: it would start over from
    step 0 and write a new metrics.jsonl over the run's record. Both trainers and their preflights call it."""
    n = logged_steps(Path(out) / "metrics.jsonl")
    if n and latest(out) is None:
        raise ConfigError(f"--resume: {out} holds a run that logged {n} step(s) but no complete checkpoint to "
                          "continue from (none was written: --save-every 0, or the run ended before its first "
                          "save); pass --overwrite to start it over, or train into a new --out (--save-every N "
                          "makes a run resumable)")


def logged_steps(path) -> int:
    """The highest training step metrics.jsonl records (0: none, or no file); torn lines are not counted."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return 0
    return max((s for s in map(_step_of, lines) if s != math.inf), default=0)


def drop_metrics_after(path, step: int) -> None:
    """A resume from step `step`: keep the metrics.jsonl lines of the steps up to it (those after are redone, and
    a torn last line goes), written atomically. No file: nothing to do."""
    path = Path(path)
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if _step_of(ln) <= step]
        atomic_write_text(path, "".join(k + "\n" for k in keep))


def interrupted_message(out) -> str:
    """What a second signal leaves, said truthfully: the newest complete checkpoint, or none yet."""
    last = latest(out) if Path(out).is_dir() else None
    if last is not None:
        return f"interrupted; the last complete checkpoint, {last}, is intact: --resume continues from it"
    if RunDir(out).holds_run():
        return (f"interrupted before the first checkpoint; {out} holds no checkpoint to resume from: rerun with "
                "--overwrite to start again")
    return f"interrupted before the run began; nothing was written to {out}"
