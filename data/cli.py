"""The user-facing boundary shared by every command: one-line usage errors and one-line failures. It lives in
data/, the lowest layer, because data's own commands (data.check, data.focus) need it too and data never imports
engine (DESIGN.md); engine.cli re-exports it. No torch here: data.check starts in a fraction of a second."""
from __future__ import annotations

import argparse
import os
import sys


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help unless the help already names its default or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the default prints the whole usage block first) and defaults shown
    in --help once."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def add_model_args(self, adapter_required: bool = False):
        """--model and --adapter, as evaluate, extract and export take them."""
        base = "the adapter's base" + ("" if adapter_required else ", else smollm2-135m")
        self.add_argument("--model", default=None, help=f"HF dir, hub id, .gguf or smollm2-135m; default: {base}")
        self.add_argument("--adapter", required=adapter_required, default=None,
                          help="PEFT LoRA adapter directory (a training run's adapter/)")


def run_command(fn, *args) -> int:
    """fn(*args) -> 0; any exception -> one line on stderr and exit status 1 (130 on Ctrl-C).
    CLAUSELORA_DEBUG=1 shows the traceback instead."""
    try:
        fn(*args)
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("CLAUSELORA_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    return 0
