"""Precision policy: fp32 on the CPU, bf16 autocast on sm >= 80, fp16 autocast + dynamic loss scaling below.

The T4 (sm 75) has no bf16, and fp16 gradients of small adapters underflow without loss scaling, so on such
GPUs the loss is multiplied by a scale that halves whenever a step overflows (that step is skipped) and grows
back after a run of clean steps (torch.amp.GradScaler). What is stored in which dtype, in every mode: the LoRA
master weights and AdamW's moments in fp32 (paged AdamW 8-bit: uint8 moments, fp32 block scales); the frozen base
in the compute dtype (Precision.param_dtype: fp32, bf16, or fp16 on a T4), that is the embeddings, norm weights,
lm_head and any projection left unquantized, while NF4 projections keep uint8 codes and fp32 scales
(model/quant.py). Nothing frozen is upcast to fp32, unlike peft's prepare_model_for_kbit_training (0.21), which
casts every bf16/fp16 parameter but the 4-bit weights to fp32. Autocast then runs the matmuls in the compute
dtype, LoRA's on a compute-dtype copy of its fp32 weights; RMSNorm's statistics and the loss's softmax are
computed in fp32 by their own code (model/llama.py, engine/loss.py).
"""
from __future__ import annotations

import contextlib
import math

import torch


class NonFiniteLoss(RuntimeError):
    """The loss stayed inf/NaN for too many consecutive steps; training stops instead of writing garbage."""


MODES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_mode(device: torch.device | str) -> str:
    """What "auto" means on `device`: fp32 on the CPU, bf16 on sm >= 80, fp16 below. A CUDA device this
    process cannot see (the memory ledger predicting for another machine) is taken to be sm >= 80."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if not torch.cuda.is_available():
        return "bf16"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def resolve(mode: str, device: torch.device) -> str:
    """A training run's precision: "auto" resolved for the device, an explicit mode checked against it."""
    if mode != "auto":
        if device.type == "cpu" and mode != "fp32" and not (mode == "bf16" and cpu_bf16_native()):
            # fp16 on the CPU gains nothing; bf16 autocast is slower than fp32 unless the CPU multiplies bf16 natively
            raise ValueError(f"precision {mode} needs a GPU (or, for bf16, a CPU with AMX / AVX-512 BF16); "
                             "use --precision fp32 (or auto) on this CPU")
        if mode == "bf16" and device.type == "cuda" and not cuda_bf16_native(device):
            raise ValueError("precision bf16 needs sm >= 80 (this GPU has no bf16); use --precision fp16")
        return mode
    return auto_mode(device)


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the GPU has bf16 tensor cores (sm >= 80). torch.cuda.is_bf16_supported() also says yes on a T4
    (sm 75), where bf16 is emulated: its including_emulation defaults to True."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16). There, answering in bf16 is about
    twice as fast as fp32 or more: SmolLM2-135M read a 1,600-token prompt on one thread in 1.89 s instead of
    5.29 s on an Intel Xeon with AMX (2026-11-30), and in 2.2-2.4 s instead of 4.5-4.75 s on an AMD EPYC with
    AVX-512 BF16 and no AMX (2026-12-08, separate runs). Elsewhere bf16 is emulated and slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


INFERENCE_MODES = ("auto", "fp32", "bf16", "fp16")


def inference_dtype(mode: str, device: torch.device | str) -> torch.dtype:
    """The dtype a model is loaded in to answer (evaluate, extract, demo). "auto": what training uses on a GPU
    (bf16 on sm >= 80, fp16 below); on the CPU bf16 where the CPU multiplies it natively, fp32 otherwise.
    Training's "auto" on the CPU stays fp32 (resolve); a recipe may ask for bf16 where the CPU has it."""
    device = torch.device(device)
    if mode == "auto":
        if device.type == "cuda":
            return dtype_of(auto_mode(device))
        return torch.bfloat16 if cpu_bf16_native() else torch.float32
    if mode == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs a GPU; use auto, fp32 or bf16 on the CPU")
    if mode == "bf16" and device.type == "cuda" and not cuda_bf16_native(device):
        raise ValueError("--precision bf16 needs sm >= 80 (this GPU has no bf16); use fp16")
    return DTYPES[mode]


def dtype_of(mode: str) -> torch.dtype:
    """A resolved precision name -> its torch dtype (the autocast dtype; fp32 means no autocast)."""
    return DTYPES[mode]


class Precision:
    """autocast context + optional GradScaler + overflow / non-finite bookkeeping for one run."""

    def __init__(self, mode: str, device: torch.device, patience: int = 8):
        self.mode = resolve(mode, device)
        self.device = device
        self.dtype = dtype_of(self.mode)
        # dynamic loss scaling only for fp16; bf16 has fp32's exponent range and needs none
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mode == "fp16")
        self.patience = patience
        self.overflows = 0  # optimizer steps skipped because a gradient was inf/NaN
        self.nonfinite_streak = 0
        self.last_finite_loss = None

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the frozen base is loaded in (model.load.load_model): the compute dtype, so the embeddings,
        norm weights, lm_head and unquantized projections are stored in fp32, bf16, or fp16 on a T4 (not upcast
        to fp32 as peft's prepare_model_for_kbit_training would); NF4 layers take it as their compute dtype."""
        return self.dtype

    def autocast(self):
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params, max_norm: float) -> tuple[float, bool]:
        """Unscale, clip, step. Returns (grad_norm before clipping, overflow). An overflowing step is skipped."""
        self.scaler.unscale_(optimizer)
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params
                                                         if p.grad is not None]))
        norm = float(norm)  # note: a host sync, once per optimizer step
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)  # skipped internally when inf/NaN was found while unscaling
            self.scaler.update()
            overflow = self.scaler.get_scale() < scale
        else:
            overflow = not math.isfinite(norm)
            if not overflow:
                optimizer.step()
        self.overflows += int(overflow)
        return norm, overflow

    def check_loss(self, loss: float, step: int):
        """Count consecutive non-finite losses; raise NonFiniteLoss with a report once it persists."""
        if math.isfinite(loss):
            self.nonfinite_streak = 0
            self.last_finite_loss = loss
            return
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.patience:
            scale = f", loss scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() else ""
            raise NonFiniteLoss(
                f"loss was non-finite for {self.nonfinite_streak} consecutive steps (step {step}, precision "
                f"{self.mode}{scale}, {self.overflows} overflow steps, last finite loss {self.last_finite_loss}); "
                "stopping without writing the adapter. Try a lower --lr, --precision fp32/bf16, or check the data")

    def state_dict(self) -> dict:
        return {"mode": self.mode, "overflows": self.overflows, "nonfinite_streak": self.nonfinite_streak,
                "last_finite_loss": self.last_finite_loss,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_state_dict(self, d: dict):
        self.overflows = d["overflows"]
        self.nonfinite_streak = d["nonfinite_streak"]
        self.last_finite_loss = d["last_finite_loss"]
        if self.scaler.is_enabled() and d.get("scaler"):
            self.scaler.load_state_dict(d["scaler"])
