"""The engine's commands' shared flags and CPU threads; the one-line error boundary itself is data.cli's (data's
commands use it too), re-exported here."""
from __future__ import annotations

import argparse
import sys

from data.cli import CliParser, run_command  # noqa: F401  (re-exported: the engine's commands import it from here)
from data.example import DataError
from engine.config import ConfigError, read_toml, typed_value
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
    for key, value in read_toml(path).items():
        action = flags.get(key)
        if action is None:
            raise ConfigError(f"{path}: unknown key {key!r} (keys are {parser.prog}'s flags spelled with "
                              "underscores; see --help)")
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
