"""The run directory is the user's: one writer at a time, never replaced silently, checked before it is touched.

    guard = RunDir(out)            # rank 0 of a run
    guard.lock()                   # exclusive flock on OUT/.lock; a second run on the same OUT is refused
    guard.check_start(cfg)         # an earlier run there needs --resume or --overwrite; a resume must match it

Everything here raises ConfigError (one line, exit 2) before data or model load and before any file in OUT is
written, so a refused start leaves OUT exactly as it was.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path

from engine import dist
from engine.config import ConfigError, TrainConfig
from model.files import atomic_write_text

# What marks a directory as holding a run (written by engine.train and engine.channel_train).
RUN_FILES = ("config.json", "metrics.jsonl", "adapter", "checkpoints")
# Ours too, but no run by themselves: the lock (RunDir.lock) and the launch id (RunDir.mark_started). A directory
# holding nothing else is what a start that stopped before writing anything leaves: free to use again.
MARKER_FILES = (".lock", ".launch")
# Settings a resumed run may change: how long it runs and how it reports and saves, never what it computes.
RESUMABLE = {"max_steps", "epochs", "out", "resume", "overwrite", "save_every", "keep_last", "eval_every",
             "eval_batches", "eval_generate", "nonfinite_patience", "device",
             # how a step runs, not what it computes (up to rounding; MLP tiles draw LoRA dropout masks tile by
             # tile): a long run that runs short of memory can resume with tiles, or without the CPU heap trim
             "compile", "mlp_tile", "trim_cpu_heap",
             # the weights a run started from: a resumed run reads its own from the checkpoint
             "init_adapter",
             # as written ("auto" is fp16 on a T4, bf16 on an A100): the mode it resolves to must be the
             # checkpoint's, which engine.checkpoint.load checks, naming the --precision to pass
             "precision"}


EXPORTED_RUN_CONFIG = "training_config.json"  # engine.export copies the run's config.json into OUT under this name


def json_line(row: dict) -> str:
    """One strict-JSON line for metrics.jsonl: a non-finite number (a diverged loss) is written as null, never
    as the NaN/Infinity that json.dumps allows and other JSON readers reject."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def append_metrics(metrics, row: dict, out) -> None:
    """One row onto the open OUT/metrics.jsonl, flushed. A full disk stops the run with one line: a torn last
    line is skipped by every reader and dropped by --resume, which continues from the newest checkpoint."""
    try:
        metrics.write(json_line(row))
        metrics.flush()
    except OSError as e:
        from engine.checkpoint import write_failed  # (engine.checkpoint imports this module)
        raise write_failed(out, OSError(e.errno, e.strerror, metrics.name),
                           f"step {row.get('step')}'s metrics line was not written") from None


def adapter_run_config(adapter) -> tuple[Path, dict] | None:
    """(path, contents) of the config.json of the run an adapter came from: inside an engine.export OUT
    (EXPORTED_RUN_CONFIG), beside OUT/adapter, or three levels up from OUT/checkpoints/step-N/adapter
    (engine.train and engine.channel_train alike); None where none
    holds a readable config with a "data" key. Its training split is "train_split" (engine.train) or "split"
    (engine.channel_train): see trained_split."""
    p = Path(adapter).absolute()
    places = [p / EXPORTED_RUN_CONFIG, p.parent / "config.json"]
    if p.parent.parent.name == "checkpoints" and p.parent.name.startswith("step-"):
        places.append(p.parent.parent.parent / "config.json")
    for cfg in places:
        try:
            c = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(c, dict) and "data" in c:
            return cfg, c
    return None


def learned_decoding(adapter) -> tuple[str, str] | None:
    """("channel", unit) for an adapter trained by engine.channel_train (its run's config.json has
    groups_per_step; unit: its --unit), whose decision only --decode channel makes; None for any other adapter
    (engine.train's token loss) or one whose run config is not beside it."""
    found = adapter_run_config(adapter) if adapter else None
    if found is None or "groups_per_step" not in found[1]:
        return None
    return "channel", str(found[1].get("unit") or "paragraph")


def trained_split(run_config: dict) -> str:
    """The split a run trained on, whichever command wrote its config.json."""
    return run_config.get("split", run_config.get("train_split", "train"))


class RunDir:
    def __init__(self, out):
        self.out = Path(out)
        self._fd = None
        # Set by the trainers once they have written config.json and a new metrics.jsonl for a run starting at
        # step 0 (not a --resume), cleared when the first step's row is in metrics.jsonl: until then OUT holds
        # nothing a step produced (discard_unfinished_start)
        self.fresh_start = False

    def lock(self) -> "RunDir":
        """Hold an exclusive lock on OUT/.lock for the life of the process (the kernel drops it at exit, also on
        kill -9). The file keeps the holder's pid, only to name it in the refusal."""
        self.created = not self.out.exists()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a directory; pick another --out")
        path = self.out / ".lock"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot write there ({e.strerror or e}); pick a writable --out") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{self.out} is in use by another run (pid {holder}, lock {path}); wait for it to "
                              "finish or pick another --out") from None
        try:  # the pid only names the holder in another run's refusal: a full disk must not stop a run here
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock before the process ends (a command that runs in-process, as tests and notebooks do)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def continues_after_restart(self) -> bool:
        """Whether this worker, started again after a failure (--max-restarts: engine.dist.restart_attempt),
        continues the run in OUT from its newest checkpoint. Yes once an attempt of this launch had started there
        (mark_started wrote ./launch.sh's CLAUSELORA_LAUNCH id); no when the failed attempt died before that (while
        loading), so a restarted --overwrite run replaces the earlier run as asked instead of resuming it.
        torchrun's own restarts carry no launch id and always continue."""
        if dist.restart_attempt() == 0:
            return False
        launch = os.environ.get("CLAUSELORA_LAUNCH")
        if not launch:
            return True
        try:
            return (self.out / ".launch").read_text(encoding="utf-8").strip() == launch
        except OSError:
            return False

    def mark_started(self) -> None:
        """Rank 0, once this run has started in OUT (its config.json written): which launch it was, for
        continues_after_restart. Nothing without ./launch.sh's launch id."""
        launch = os.environ.get("CLAUSELORA_LAUNCH")
        if launch:
            atomic_write_text(self.out / ".launch", launch + "\n")

    def abandon(self) -> None:
        """A run that failed or stopped before writing anything (its unfinished start already discarded): remove
        the launch id it left, and OUT itself if this run created it and it now holds nothing but our marker files,
        so a refused or stopped start leaves no trace. Rank 0 (the lock holder) only."""
        if self._fd is None:
            return
        try:
            if not only_markers(self.out):
                return
            (self.out / ".launch").unlink(missing_ok=True)
            if getattr(self, "created", False):
                (self.out / ".lock").unlink(missing_ok=True)
                self.out.rmdir()
        except OSError:
            pass

    def discard_unfinished_start(self) -> None:
        """A run that started at step 0 and failed before its first step was logged (most often out of GPU memory
        in that step): remove the config.json and metrics.jsonl it wrote, so the same command runs again once the
        cause is fixed, without --overwrite. A run with a logged step, or a --resume, keeps every file."""
        if self._fd is None or not self.fresh_start:
            return
        for name in ("config.json", "metrics.jsonl", ".launch"):  # .launch: a restart finds no run of its own here
            try:
                (self.out / name).unlink(missing_ok=True)
            except OSError:
                pass
        self.fresh_start = False

    def holds_run(self) -> list[str]:
        """Names of the run files present in OUT (empty: nothing of a run there). An unfinished start, config.json
        and a metrics.jsonl without a step's row (what discard_unfinished_start removes, and what a process killed
        in its first step leaves behind), is nothing of a run: every rank of a stopped start says the same of OUT
        whether or not rank 0 has tidied it yet, and the same command runs again."""
        found = [n for n in RUN_FILES if (self.out / n).exists()]
        if set(found) == {"config.json", "metrics.jsonl"} and not _logs_a_step(self.out / "metrics.jsonl"):
            return []
        return found

    def check_not_in_use(self) -> None:
        """ConfigError when another process holds OUT's lock (a run starting or training there). For a check made
        without holding the lock, as ./launch.sh's preflight does: the refusal is then one line before torchrun
        starts, not rank 0's line among the other ranks' failures."""
        try:
            fd = os.open(self.out / ".lock", os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody has started there
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            raise ConfigError(f"{self.out} is in use by another run (pid {holder}, lock {self.out / '.lock'}); wait "
                              "for it to finish or pick another --out") from None
        finally:
            os.close(fd)

    def check_start(self, cfg: TrainConfig, resume: bool, settings: dict | None = None,
                    may_differ: frozenset | set = frozenset(RESUMABLE)) -> None:
        """Refuse to start over an earlier run unless asked (--resume continues it, --overwrite replaces it), and
        refuse a resume whose settings differ from the saved run in anything but the may_differ keys (engine.train's
        RESUMABLE). settings: what this run saves as its config.json, when that is not cfg.to_dict()
        (engine.channel_train saves its own flags)."""
        if self._fd is None and dist.get().world_size == 1:  # not the lock holder nor one of its ranks: a preflight
            self.check_not_in_use()
        found = self.holds_run()
        if found and not (resume or cfg.overwrite):
            raise ConfigError(f"{self.out} holds an earlier run ({', '.join(found)}); pass --resume to continue it, "
                              "--overwrite to replace it, or pick another --out")
        saved_path = self.out / "config.json"
        if resume and saved_path.is_file():
            try:
                saved = json.loads(saved_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{saved_path}: unreadable ({type(e).__name__}); the run cannot be resumed "
                                  "safely; use --overwrite or another --out") from None
            mine = cfg.to_dict() if settings is None else settings
            diff = [k for k in mine if k not in may_differ and k in saved and saved[k] != mine[k]]
            if diff:
                what = ", ".join(f"{k} (saved {saved[k]!r}, now {mine[k]!r})" for k in diff)
                raise ConfigError(f"--resume: {what} differ from the run in {self.out}; resume with its settings "
                                  "(they are in that config.json) or start a new --out")

    def clear_for_overwrite(self) -> None:
        """--overwrite: remove the earlier run's files (only those engine.train writes), so nothing of it mixes
        with the new run."""
        for name in RUN_FILES:
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def only_markers(out) -> bool:
    """Whether OUT is a directory holding nothing but our MARKER_FILES (or nothing at all)."""
    return Path(out).is_dir() and all(p.name in MARKER_FILES for p in Path(out).iterdir())


def _logs_a_step(metrics: Path) -> bool:
    """Whether metrics.jsonl has the row of a step (step >= 1; engine.train's step 0 is the evaluation before
    training). An unreadable file or line counts as one: never take a run for nothing."""
    try:
        with open(metrics, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] >= 1:
                    return True
    except (OSError, ValueError):
        return True
    return False


def demo_dir_state(out, repo) -> str:
    """What ./launch.sh's demo finds at its output directory OUT: "new" (none, or nothing but our marker files:
    a start that stopped before writing anything), "demo" (an earlier demo, which it replaces: its config.json
    says synthetic data written to OUT; demos launched before ./launch.sh passed OUT as an absolute path said
    runs/demo, relative to the repository REPO; or that demo's eval/ and eval-before/ left, with our marker files,
    by a replacing start that stopped in its first step), or "other" (anything else is the user's: refused)."""
    out = Path(out)
    if not out.exists() or only_markers(out):
        return "new"
    evals = {"eval", "eval-before"}  # the demo's own evaluations (./launch.sh writes them after training)
    if all(p.name in MARKER_FILES or (p.name in evals and p.is_dir()) for p in out.iterdir()):
        return "demo"  # an earlier demo's evaluations beside a replacing start that stopped in its first step
    try:
        c = json.loads((out / "config.json").read_text(encoding="utf-8"))
        saved = Path(repo, c["out"])  # an absolute "out" stays itself
    except (OSError, ValueError, TypeError, KeyError):
        return "other"
    same = os.path.realpath(saved) == os.path.realpath(out)
    return "demo" if isinstance(c, dict) and c.get("data") == "synthetic" and same else "other"
