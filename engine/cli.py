"""The engine's commands' shared flags and CPU threads, and ./launch.sh's torchrun; the one-line error boundary
itself is data.cli's (data's commands use it too), re-exported here."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from data.cli import CliParser, run_command  # noqa: F401  (re-exported: the engine's commands import it from here)
from data.example import DataError
from engine.config import FIELDS, ConfigError, read_toml, typed_value
from model.generate import cpu_threads

THREADS_HELP = ("CPU threads for torch (default: the cores this process may use minus the 1-minute load average, "
                "at least 1: OpenMP threads that wait for busy cores make each step many times slower)")


def set_threads(requested: int | None) -> int:
    """torch's CPU threads: the requested number, else a safe default (model.generate.cpu_threads)."""
    return cpu_threads(requested)


def _flag_type(action: argparse.Action) -> type:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return bool
    assert action.type in (None, int, float, str), f"--config cannot check {action.dest}'s type {action.type}"
    return action.type or str


def config_defaults(parser: argparse.ArgumentParser, path) -> dict:
    """A TOML recipe for an argparse command (engine.channel_train --config): each key is a flag spelled with
    underscores (--max-steps -> max_steps) and holds a value of that flag's type. Unknown keys, wrong types and
    values outside a flag's choices are ConfigError naming the file and the key. The caller sets the result as
    the parser's defaults, so the command line overrides the file."""
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    out = {}
    raw = read_toml(path)
    for key, value in raw.items():
        action = flags.get(key)
        if action is None:  # (the parser's one-line error adds "see PROG --help")
            if set(raw) <= set(FIELDS):  # every key is engine.train's: the other trainer's recipe
                raise ConfigError(f"{path}: unknown key {key!r}: this is an engine.train recipe; drop --channel "
                                  f"from ./launch.sh, or run python -m engine.train --config {path}")
            raise ConfigError(f"{path}: unknown key {key!r} (keys are {parser.prog}'s flags spelled with "
                              "underscores)")
        out[key] = typed_value(str(path), key, value, _flag_type(action), action.choices)
    return out


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), with the TOML file of a --config in argv as defaults (config_defaults); a bad
    file is a one-line usage error (exit 2), as a bad flag is."""
    pre = argparse.ArgumentParser(add_help=False, prog=parser.prog)
    pre.error = parser.error  # "--config" without a file: the command's one-line usage error
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**config_defaults(parser, known.config))
        except ConfigError as e:
            parser.error(str(e))
    return parser.parse_args(argv)


def preflight_boundary(check) -> int:
    """What ./launch.sh's preflight returns around check(), the trainers' checks run once before torchrun starts
    N processes: 0 when they pass, else one line on stderr and 2 (a usage error, ConfigError) or 1 (the data, a
    file)."""
    try:
        check()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


# How a worker stopped by SIGINT/SIGTERM ends: 128 + signal (engine.checkpoint.StopFlag, engine/__init__.py's early
# handler), or killed by the signal itself (a negative exit code in torchrun's report)
SIGNAL_EXITS = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM})


class _SignalStopFilter(logging.Filter):
    """Drops torchrun's "failed (exitcode: 130) local_rank: 0 ..." line when the exit code is a signal stop."""

    def filter(self, record):
        return not (str(record.msg).startswith("failed (exitcode") and isinstance(record.args, tuple)
                    and record.args and record.args[0] in SIGNAL_EXITS)


def torchrun(argv: list[str]) -> int:
    """torch.distributed.run (torchrun) with argv, as ./launch.sh runs it, quiet where the workers stopped on a
    signal. Workers stopped by SIGINT/SIGTERM write their checkpoint and exit 128 + signal on purpose; torchrun
    takes that for a failure and prints a traceback and a 40-line ChildFailedError report. Here that returns the
    workers' status (130, 143) quietly, and ./launch.sh says in one line what the stop left; any other failure
    keeps torchrun's report and its exit status (1)."""
    from torch.distributed import run  # here, not at the top: every command imports this module, few launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_SignalStopFilter())
    try:
        run.main(argv)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if not set(codes) <= SIGNAL_EXITS:
            raise
        return max(128 - c if c < 0 else c for c in codes)
    return 0


def stop_note(module: str, argv: list[str], demo: bool = False) -> str:
    """./launch.sh's one line once its workers stopped on a signal: what the run's OUT holds now, read from the
    files (module: engine.train or engine.channel_train; argv: its arguments, which name OUT)."""
    # here, not at the top: engine.checkpoint and engine.channel_train import this module
    from engine.checkpoint import latest
    from engine.rundir import RunDir

    try:
        if module == "engine.channel_train":
            from engine.channel_train import build_parser
            out = parse_with_config(build_parser(), argv).out
        else:
            from engine.config import parse_args
            out = parse_args(argv).out
        last = latest(out)
        began = bool(RunDir(out).holds_run())
    except (ConfigError, OSError, SystemExit):  # (the preflight checked these arguments: not expected)
        return "== stopped by signal: the workers' last lines above say what they left in --out"
    if demo:  # ./launch.sh replaces an earlier demo: a stopped one starts over
        return (f"== stopped by signal: the demo's newest checkpoint is {last}" if last else
                "== stopped by signal before the demo's first checkpoint") + "; ./launch.sh starts the demo over"
    if last:
        return f"== stopped by signal: the newest checkpoint is {last}; the same command with --resume continues it"
    if began:
        return (f"== stopped by signal before the first checkpoint; {out} holds the run's first steps: the same "
                "command with --overwrite starts it again")
    return f"== stopped by signal before training began; nothing was written to {out}: run the same command again"
