"""The engine's commands' shared flags and CPU threads; the one-line error boundary itself is data.cli's (data's
commands use it too), re-exported here."""
from __future__ import annotations

from data.cli import CliParser, run_command  # noqa: F401  (re-exported: the engine's commands import it from here)
from model.generate import cpu_threads

THREADS_HELP = ("CPU threads for torch (default: the cores this process may use minus the 1-minute load average, "
                "at least 1: OpenMP threads that wait for busy cores make each step many times slower)")


def set_threads(requested: int | None) -> int:
    """torch's CPU threads: the requested number, else a safe default (model.generate.cpu_threads)."""
    return cpu_threads(requested)
