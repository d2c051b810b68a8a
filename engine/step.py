"""One training step, the same one for the trainer, the memory ledger's measurements and the benchmark: the
learning-rate schedule, the optimizer, forward/backward with loss scaling and token normalisation, then clip and
step. `TrainStep` holds its state in plain attributes (optimizer, precision, the last step's gradient bytes), so a
caller that measures a step reads them off the object instead of off a closure."""
from __future__ import annotations

import contextlib
import math
import resource
import sys
from dataclasses import dataclass

import torch

from engine import dist
from engine.config import ConfigError, TrainConfig
from engine.loss import backward_scale, supervised_tokens, supervised_weight
from engine.precision import Precision
from model.lora import apply_lora
from model.quant import bitsandbytes_problem


def prepare_model(model, cfg: TrainConfig, device):
    """A loaded model as the trainer trains it: LoRA adapters (every other weight frozen; lora_r 0, which only
    the memory ledger asks for, freezes everything), on `device`, checkpointing as configured, train mode."""
    if cfg.lora_r > 0:
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=tuple(cfg.lora_targets), use_rslora=cfg.use_rslora)
    else:
        model.requires_grad_(False)
    model.to(device)
    model.set_gradient_checkpointing(cfg.checkpointing, offload=cfg.offload)
    model.set_mlp_tile(cfg.mlp_tile)
    if cfg.compile:
        check_compile_toolchain(device)
        model.set_compiled()
    if cfg.trim_cpu_heap and torch.device(device).type == "cpu":
        trim_cpu_heap(model)
    return model.train()


def compile_toolchain_problem(device) -> str | None:
    """Why torch.compile (TrainConfig.compile) could not build its kernels on `device`, in one line, or None.
    The compiler runs lazily, in the first training step: without a toolchain a run loaded its model, wrote its
    run directory and then died with an opaque BackendCompilerFailed. Inductor's CPU kernels are C++ (the
    compiler torch._inductor.cpp_builder finds: $CXX or g++); on CUDA, Triton builds a small C stub on first use
    ($CC, else gcc, else clang). Both include Python's headers (Python.h)."""
    import os
    import shutil
    import sysconfig

    if torch.device(device).type == "cuda":
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            return ("--compile on CUDA needs a C compiler for Triton (gcc or clang on PATH, or $CC): "
                    "apt install gcc, or drop --compile")
    else:
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:  # torch's own search failed (InvalidCxxCompiler): what inductor would hit later
            return ("--compile on the CPU needs a C++ compiler for inductor (g++ on PATH, or $CXX): "
                    "apt install g++, or drop --compile")
    # where the headers may be: the interpreter's own include directory, and the install scheme's (Triton reads
    # posix_prefix's where Debian's Python defaults to posix_local, whose include directory holds no Python.h)
    places = [sysconfig.get_config_var("INCLUDEPY"), sysconfig.get_paths().get("include")]
    if "posix_prefix" in sysconfig.get_scheme_names():
        places.append(sysconfig.get_paths("posix_prefix").get("include"))
    places = [p for p in dict.fromkeys(places) if p]
    if not any(os.path.isfile(os.path.join(p, "Python.h")) for p in places):
        where = " or ".join(places) or "this Python's include directory"
        return (f"--compile needs Python's C headers (Python.h), which are not in {where}: apt install python3-dev "
                "(or your Python's -dev package), or drop --compile")
    return None


def check_compile_toolchain(device) -> None:
    """ConfigError (one line, exit 2) naming what --compile lacks on `device`; callers run it before loading."""
    problem = compile_toolchain_problem(device)
    if problem:
        raise ConfigError(problem)


def check_device_tools(cfg: TrainConfig, device) -> None:
    """ConfigError (one line, exit 2) naming what this run needs and `device` lacks, for callers to run before
    anything loads: a compiler for --compile, bitsandbytes' CUDA library for NF4 weights or its paged optimizer."""
    if cfg.compile:
        check_compile_toolchain(device)
    if cfg.quantize == "nf4" or cfg.optimizer == "paged_adamw_8bit":
        problem = bitsandbytes_problem(device)
        if problem:
            raise ConfigError(problem)


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_cpu_heap(model) -> bool:
    """Before each decoder block of a training forward on the CPU, hand the heap's free pages back to the OS
    (glibc malloc_trim(0)). Why: a checkpointed forward keeps one [B, T, H] block input per layer and frees the
    rest of each block; glibc keeps those freed buffers as fragmented free heap, so the process grew to about
    twice what was live (SmolLM2-135M, seq 1024, batch 2: peak RSS 1.75 GiB for about 0.8 GiB live; trimming
    in the forward: about 1.1 GiB, for 9-12% more time per step; BENCHMARKS.md). Only in a forward with
    autograd on and the model in train mode, not inside backward (recomputed blocks): trimming there cost
    more and gained nothing. Changes no value. Returns whether the hooks were installed."""
    trim = _malloc_trim()
    if trim is None:
        return False

    def before_block(module, args):
        if module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            trim(0)  # -1: not inside a backward pass

    for block in model.model.layers:
        block.register_forward_pre_hook(before_block)
    return True


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to cfg.lr, then decay to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - lo) * progress
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(cfg: TrainConfig, params: list, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("config: optimizer paged_adamw_8bit needs CUDA; use --optimizer adamw on the CPU")
        import bitsandbytes as bnb  # CUDA-only optimizer: importing bitsandbytes' optim costs a second elsewhere

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                        weight_decay=cfg.weight_decay)
    # On CUDA one fused kernel updates every adapter (fp32 masters): 392 small tensors at Llama 3.2 3B were 72 ms
    # of a 271 ms GPU step with one launch per tensor and op (issue 14's profile, H200). GradScaler drives it
    # (found_inf skips the step in-kernel). On the CPU the per-parameter loop stays: what the pinned loss curves
    # and bit-identical resume tests were written against (fused CPU AdamW agrees to float rounding: tested).
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=False, fused=fused or None)


def forward_backward(loss_model, micro_batches: list[dict], prec: Precision, world_size: int) -> tuple[float, int]:
    """Accumulate the gradient of one optimizer step; returns (mean loss over the step, supervised tokens).

    The supervised-token count of the whole step (all micro-batches, all ranks) is known before any backward,
    so each micro-batch's summed loss is scaled by world_size / n_global (see loss.backward_scale): gradients
    do not depend on how the tokens are split into micro-batches or ranks. DDP all-reduces gradients only on the
    last micro-batch (no_sync on the others), once per optimizer step.
    """
    n_local = sum(supervised_tokens(b["labels"]) for b in micro_batches)
    w_local = sum(supervised_weight(b["labels"], b.get("loss_weights")) for b in micro_batches)
    n_global, w_global = dist.all_reduce_sum(torch.tensor([n_local, w_local], dtype=torch.float64)).tolist()
    n_global = int(n_global)
    scale = backward_scale(w_global, world_size)  # w_global = n_global unless the batches carry loss_weights
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or world_size == 1 else loss_model.no_sync()
        with sync:
            with prec.autocast():
                extra = {"choice": b["choice"]} if "choice" in b else {}  # engine.channel_train's listwise loss
                part = loss_model(b["input_ids"], b["labels"], position_ids=b.get("position_ids"),
                                  segment_ids=b.get("segment_ids"), loss_weights=b.get("loss_weights"), **extra)
            prec.backward(part * scale)
        loss_sum += part.detach().double().cpu()  # note: a host sync per micro-batch; negligible next to a step
        del part  # the graph is already freed by backward; drop the last reference before the next forward
    total = float(dist.all_reduce_sum(loss_sum.reshape(1))[0])
    return total / max(w_global, 1e-12), n_global


@dataclass
class StepResult:
    loss: float  # mean loss over the step's supervised tokens (weights), all ranks
    supervised_tokens: int
    grad_norm: float  # before clipping
    overflow: bool  # the optimizer step was skipped (inf/NaN gradient)


class TrainStep:
    """One optimizer step: set the learning rate, accumulate gradients over the micro-batches, check the loss,
    unscale + clip + step, clear the gradients. `grad_bytes` is what the gradients held between backward and
    the step (the ledger's "LoRA gradients" row, read by engine/memory.py after a step)."""

    def __init__(self, loss_model, params: list, optimizer: torch.optim.Optimizer, prec: Precision, *,
                 grad_clip: float, world_size: int = 1):
        self.loss_model, self.params, self.optimizer, self.prec = loss_model, params, optimizer, prec
        self.grad_clip, self.world_size = grad_clip, world_size
        self.grad_bytes = 0

    @classmethod
    def for_config(cls, cfg: TrainConfig, loss_model, prec: Precision, device: torch.device,
                   world_size: int = 1) -> "TrainStep":
        """The trainer's step for `cfg`: an optimizer (make_optimizer) over loss_model's trainable parameters."""
        params = [p for p in loss_model.parameters() if p.requires_grad]
        return cls(loss_model, params, make_optimizer(cfg, params, device), prec, grad_clip=cfg.grad_clip,
                   world_size=world_size)

    def __call__(self, micro_batches: list[dict], step: int, lr: float | None = None) -> StepResult:
        """Optimizer step number `step` (0-based) over micro_batches; lr None keeps the optimizer's own."""
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        loss, n_sup = forward_backward(self.loss_model, micro_batches, self.prec, self.world_size)
        self.prec.check_loss(loss, step + 1)
        self.grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in self.params if p.grad is not None)
        grad_norm, overflow = self.prec.clip_and_step(self.optimizer, self.params, self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, n_sup, grad_norm, overflow)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max_memory_allocated of this rank. CPU: this process's peak resident set size.

    Linux: VmHWM from /proc/self/status (getrusage's ru_maxrss can carry a parent's larger peak over a
    fork + exec); elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
