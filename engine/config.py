"""TrainConfig: every knob of a training run, with its default and help text in one place.

A run is configured by an optional TOML file (keys spelled with underscores) plus command-line overrides (the
same names spelled with dashes: `lora_r` -> `--lora-r`). Values are type-checked, unknown keys are errors (a typo
must never become a silently ignored setting), and the resolved config is saved beside the run as OUT/config.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model.files import atomic_write_text
from engine.loss import LOSS_CHUNK
from model.load import EMBEDDED
from model.lora import TARGETS

ALL_PROJECTIONS = list(TARGETS)  # model.lora.TARGETS: the one list of projections


class ConfigError(ValueError):
    """A mistake the user made in a config file or on the command line; reported as one line."""


def _f(default, help: str, choices=None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train on
    model: str = _f(EMBEDDED, "base model: local HF dir, hub id, .gguf file, or smollm2-135m (embedded)")
    data: str = _f("synthetic", "data spec: acord:DIR, cuad:DIR, jsonl:FILE or synthetic")
    train_split: str = _f("train", "split used for training")
    eval_split: str = _f("valid", "split used for the periodic evaluation loss")
    max_examples: int = _f(0, "use at most this many training examples, a seeded category-balanced sample (0 = all)")
    max_rejected: float = _f(0.01, "refuse to train when more than this fraction of examples fails validation")
    out: str = _f("runs/train", "output directory (config.json, metrics.jsonl, checkpoints/, adapter/)")
    # sequence / batch
    seq_len: int = _f(512, "maximum tokens per row (a longer context loses whole paragraphs at random, never the "
                      "answer; an answer too long to fit whole supervises only its first tokens)")
    pack: bool = _f(True, "pack several short examples into one row (attention stays within each example)")
    pad_to_seq_len: bool = _f(True, "pad every micro-batch to seq_len: one shape at every step, so the CPU "
                              "allocator reuses its blocks (peak RSS on packed ACORD rows 3.76 -> 1.85 GiB) and "
                              "compiled or graph-captured code sees one shape; packed rows are nearly full, so "
                              "the padding costs little compute (without packing it can cost much)")
    batch_size: int = _f(2, "rows per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step per process")
    # optimisation
    max_steps: int = _f(100, "optimizer steps to run (0 = derive from epochs)")
    epochs: float = _f(1.0, "passes over the training data when max_steps is 0")
    lr: float = _f(2e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (cosine schedule)")
    warmup_steps: int = _f(10, "linear warmup steps from 0 to lr")
    schedule: str = _f("cosine", "learning-rate decay after warmup", ["cosine", "linear", "constant"])
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapter weights")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    optimizer: str = _f("adamw", "adamw (torch) or paged_adamw_8bit (bitsandbytes, CUDA only)",
                        ["adamw", "paged_adamw_8bit"])
    # the model
    quantize: str = _f("nf4", "base weights of the decoder projections: nf4 (QLoRA) or none", ["nf4", "none"])
    double_quant: bool = _f(False, "also quantize the NF4 block scales (saves ~0.4 bit/param)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rslora)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: list = _f(list(ALL_PROJECTIONS), "projections that get adapters (comma-separated on the CLI)")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scaling alpha/sqrt(r)")
    init_adapter: str = _f("", "start from this PEFT adapter directory (a run's adapter/ or checkpoints/step-N/"
                           "adapter) instead of fresh LoRA: its rank, alpha, targets and rslora must equal this "
                           "run's (checked before anything loads); optimizer and schedule start afresh "
                           "(empty = fresh LoRA)")
    checkpointing: bool = _f(False, "recompute each decoder block in backward (activation checkpointing)")
    offload: bool = _f(False, "with checkpointing, keep the saved block inputs in CPU memory")
    mlp_tile: int = _f(0, "run each block's post-attention norm + MLP this many tokens at a time, each tile "
                       "recomputed on its own in backward: the MLP's [tokens, intermediate] tensors then exist for one "
                       "tile (long context; costs one more MLP forward per step; 0 = whole batch at once)")
    trim_cpu_heap: bool = _f(True, "on the CPU (glibc), give the heap's free pages back to the OS before each decoder "
                             "block of a training forward (malloc_trim; engine.step.trim_cpu_heap): peak RSS about 40 "
                             "percent lower for 9-12 percent of speed; no effect on a GPU")
    compile: bool = _f(False, "torch.compile each decoder block around its attention (norms, LoRA adds, RoPE, "
                       "SwiGLU and casts fused by the compiler; model.llama.Block.set_compiled); the NF4 matmuls "
                       "stay opaque ops, so no dequantized weight is kept for backward, and the memory ledger "
                       "counts the fused backwards (engine.memory --compile); eager is the readable reference and "
                       "the default. Needs a C++ compiler on the CPU (g++) and a C compiler on CUDA (gcc, for "
                       "Triton), and Python's headers: checked at start")
    precision: str = _f("auto", "auto: fp32 on CPU, bf16 on sm>=80, fp16 + loss scaling below",
                        ["auto", "fp32", "fp16", "bf16"])
    device: str = _f("auto", "auto (cuda when available), cpu or cuda", ["auto", "cpu", "cuda"])
    loss_weighting: str = _f("token", "token: every answer token weighs 1 (a step's loss is the token mean); example: "
                             "every example weighs 1, most at its first tokens (which clause, or NONE) and its "
                             "last (where to stop), least in the copy between (data.batch.answer_weights)",
                             ["token", "example"])
    loss_chunk: int = _f(LOSS_CHUNK, "supervised positions per lm_head/cross-entropy chunk (bounds the logits memory)")
    # evaluation / checkpoints / bookkeeping
    eval_every: int = _f(0, "evaluate the loss on eval_split every N steps and at the end (0 = never)")
    eval_batches: int = _f(16, "at most this many micro-batches per evaluation, over all processes (0 = whole split)")
    eval_generate: int = _f(0, "at each evaluation also generate answers for a fixed, category-balanced subset of "
                            "N eval_split examples on rank 0 and log similarity/EM/F1 (0 = off)")
    save_every: int = _f(0, "save a resumable checkpoint every N steps (0 = only on SIGTERM/SIGINT)")
    keep_last: int = _f(2, "keep only the newest K checkpoints")
    resume: bool = _f(False, "continue from the newest complete checkpoint in OUT/checkpoints")
    overwrite: bool = _f(False, "replace an earlier run in OUT (its adapter, metrics, config and checkpoints); "
                         "without it (or --resume) a run refuses an OUT that holds one")
    seed: int = _f(0, "random seed (LoRA init, data order, dropout)")
    nonfinite_patience: int = _f(8, "stop the run after this many consecutive steps with a non-finite loss")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _check(name: str, value, where: str):
    """Return value coerced to the field's type, or raise ConfigError naming the key and where it came from."""
    if name not in FIELDS:
        raise ConfigError(f"{where}: unknown key {name!r} (see python -m engine.train --help)")
    return typed_value(where, name, value, _TYPES[name], FIELDS[name].metadata.get("choices"))


def typed_value(where: str, key: str, value, want: type, choices=None):
    """value as a `want` (bool, int, float, str, or list of strings; an int is a float too), else ConfigError
    naming where it came from and the key; also when choices are given and value is not one of them."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[want]
    if not ok:
        tname = "list of strings" if want is list else want.__name__
        raise ConfigError(f"{where}: key {key!r} must be {tname}, got {value!r}")
    value = float(value) if want is float else value
    if choices and value not in choices:
        raise ConfigError(f"{where}: key {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


# (low, high, low included, high included) for every numeric field: checked before anything loads
_RANGES = {
    "lr": (0, 1, False, True), "min_lr_ratio": (0, 1, True, True), "weight_decay": (0, 10, True, True),
    "beta1": (0, 1, True, False), "beta2": (0, 1, True, False), "grad_clip": (0, float("inf"), True, False),
    "lora_alpha": (0, float("inf"), False, False), "lora_dropout": (0, 1, True, False),
    "max_rejected": (0, 1, True, True), "epochs": (0, float("inf"), True, False),
    "nonfinite_patience": (1, float("inf"), True, False),
}


def _check_range(cfg: TrainConfig) -> None:
    for k, (lo, hi, lo_in, hi_in) in _RANGES.items():
        v = getattr(cfg, k)
        ok = math.isfinite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            left, right = "[" if lo_in else "(", "]" if hi_in else ")"
            raise ConfigError(f"config: {k} must be a finite number in {left}{lo}, {hi}{right}, got {v}")


def _validate(cfg: TrainConfig) -> TrainConfig:
    _check_range(cfg)
    positive = ["seq_len", "batch_size", "grad_accum", "lora_r", "loss_chunk"]
    nonneg = ["max_steps", "warmup_steps", "eval_every", "save_every", "max_examples", "eval_batches",
              "eval_generate", "mlp_tile"]
    for k in positive:
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"config: {k} must be > 0, got {getattr(cfg, k)}")
    for k in nonneg:
        if getattr(cfg, k) < 0:
            raise ConfigError(f"config: {k} must be >= 0, got {getattr(cfg, k)}")
    if not 0 <= cfg.seed < 2**32:  # numpy's seeded generators take no negative seed, torch none >= 2**64
        raise ConfigError(f"config: seed must be in [0, 2**32), got {cfg.seed}")
    if not str(cfg.out).strip():
        raise ConfigError("config: out must name a directory, got an empty string")
    if cfg.keep_last < 1:
        raise ConfigError(f"config: keep_last must be >= 1, got {cfg.keep_last}")
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        raise ConfigError("config: set max_steps > 0 or epochs > 0")
    bad = [t for t in cfg.lora_targets if t not in ALL_PROJECTIONS]
    if bad or not cfg.lora_targets:
        raise ConfigError(f"config: lora_targets must be a non-empty subset of {','.join(ALL_PROJECTIONS)}, "
                          f"got {','.join(cfg.lora_targets) or 'nothing'}")
    if cfg.eval_generate and not cfg.eval_every:
        raise ConfigError("config: eval_generate needs eval_every > 0 (it runs at each evaluation)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("config: resume and overwrite contradict each other; pass one of them")
    if cfg.offload and not cfg.checkpointing:
        raise ConfigError("config: offload needs checkpointing (--checkpointing --offload)")
    return cfg


def load_toml(path: str | os.PathLike) -> dict:
    raw = read_toml(path)
    unknown = [k for k in raw if k not in FIELDS]
    if unknown and _is_channel_recipe(raw):
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}: this is an engine.channel_train recipe; add "
                          f"--channel to ./launch.sh, or run python -m engine.channel_train --config {path}")
    return {k: _check(k, v, str(path)) for k, v in raw.items()}


def _is_channel_recipe(raw: dict) -> bool:
    """Whether every key of a recipe is an engine.channel_train flag (its --config keys)."""
    from engine.channel_train import build_parser  # it imports this module; asked only to word an error
    return set(raw) <= {a.dest for a in build_parser()._actions if a.option_strings}


def read_toml(path: str | os.PathLike) -> dict:
    """The TOML file's table, or ConfigError naming the file and what is wrong with it (keys not yet checked)."""
    p = Path(path)
    try:
        # a byte order mark (Windows editors write one) is no TOML: read past it
        raw = tomllib.loads(p.read_bytes().decode("utf-8").removeprefix("\ufeff"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory; pass a TOML file such as configs/demo.toml") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config ({e.strerror or type(e).__name__})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return raw


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting, so errors stay one line."""

    def error(self, message):
        raise ConfigError(f"command line: {message}")


def _cli_value(name: str):
    want = _TYPES[name]

    def conv(text: str):
        try:
            if want is int:
                return int(text)
            if want is float:
                return float(text)
            if want is list:
                return [t.strip() for t in text.split(",") if t.strip()]
            return text
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want.__name__}, got {text!r}")

    conv.__name__ = want.__name__
    return conv


def build_parser(prog: str = "python -m engine.train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="QLoRA fine-tuning for verbatim clause extraction. Every option is also a "
                "TOML key (underscores); command-line values override the file.",
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.toml", help="TOML recipe to start from (e.g. configs/demo.toml)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kw = dict(help=f.metadata["help"], dest=name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw["help"] += f" (default: {','.join(default) if isinstance(default, list) else default})"
        if _TYPES[name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            else:
                kw["metavar"] = {int: "N", float: "F", str: "STR", list: "A,B,..."}[_TYPES[name]]
            p.add_argument(flag, type=_cli_value(name), **kw)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TOML file (if --config) then CLI overrides, type-checked and validated. Raises ConfigError."""
    ns = vars(build_parser().parse_args(argv))
    values = {}
    if "config" in ns:
        values.update(load_toml(ns.pop("config")))
    for k, v in ns.items():
        values[k] = _check(k, v, "command line")
    return _validate(TrainConfig(**values))


def save(cfg: TrainConfig, path: str | os.PathLike):
    """Write the resolved config as JSON (via a temporary file, so a crash never leaves half a file)."""
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
