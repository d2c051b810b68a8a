"""Side-by-side training-step benchmark: our engine against the stack users would otherwise pick
(transformers + peft + bitsandbytes), same shapes, same data, same device, alternating runs.

    python -m engine.bench --model smollm2-135m --seq-len 1024 --batch-size 2 --steps 3 --device cpu --vs hf
    python -m engine.bench --model llama-3.2-3b --seq-len 2048 --batch-size 2 --device cuda --vs hf

Both sides: NF4 base weights (blocksize 64), LoRA r on all seven projections (alpha 2r, no dropout), non-reentrant
activation checkpointing, completion-only labels (the last --answer-frac of each row), AdamW on the adapters
(lr, betas and weight decay of TrainConfig; per-parameter loop on the CPU, fused on CUDA, as each side's trainer
runs it), --precision (auto: fp32 on the CPU, bf16 autocast on sm >= 80, fp16 below). Random weights: speed and
memory depend on shapes only. They are drawn once in the parent (load_model's seeded init) and saved as an HF
checkpoint in bf16, the dtype Llama 3.2 and SmolLM2 are published in; each side reads that same file as its users
would and casts it to the compute dtype, so both pay for reading a checkpoint and both hold the same numbers (the
first-step losses are compared: a difference beyond the precision's rounding fails the run).

ours: what the trainer trains and how: model.load.load_model(checkpoint, quantize="nf4") + engine.step.prepare_model
      (the calls engine.train makes), stepped by engine.step.TrainStep (CausalLMLoss: logits only at the supervised
      positions, chunked CE; Precision's clip and step; engine.step.make_optimizer's AdamW).
hf:   transformers LlamaForCausalLM.from_pretrained(checkpoint, BitsAndBytesConfig(load_in_4bit, nf4))
      (bitsandbytes >= 0.46 runs its 4-bit layers on the CPU, so the same recipe works on both devices),
      peft.prepare_model_for_kbit_training (non-reentrant checkpointing) + get_peft_model; loss = model(input_ids,
      labels=labels).loss (full [B, T, V] logits); torch.optim.AdamW, fused on CUDA (HF Trainer's default optim,
      adamw_torch_fused, for torch >= 2.8), the per-parameter loop on the CPU (what ours runs there).

Each run is its own subprocess (`--child ours|hf`), so the memory figures belong to one implementation; runs
alternate ours, hf, ours, hf ... and the reported figures are medians over the runs (tokens/s: median over all
timed steps). Two host-memory peaks per run: peak RSS, the kernel's high-water mark of the whole resident set
(VmHWM of the child's own address space, file pages mapped included, e.g. a checkpoint read through mmap; see
_time_steps for why not ru_maxrss alone), and peak anon, the high-water mark of anonymous memory (RssAnon: heap and
tensors, no file pages), which the kernel does not keep, so a thread samples it (AnonPeak). Both children inherit
the engine's CPU allocator setting (engine/__init__.py). transformers and peft are imported only in the hf child:
they are the `bench` extra, never an engine dependency.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path

import torch

from engine.ledger import Setup, fmt, linear_shapes
from engine.memory import add_run_flags, deprecated_alias, random_batch, trainer_step, training_model
from engine.precision import auto_mode, dtype_of
from engine.config import TrainConfig
from engine.step import check_device_tools, prepare_model
from model.files import atomic_write_text, check_writable, make_dirs
from model.hf_checkpoint import save_hf_checkpoint
from model.load import EMBEDDED, load_config, load_model
from model.lora import TARGETS

REPO = Path(__file__).resolve().parents[1]
# The dtype of the benchmark's checkpoint: Llama 3.2 and SmolLM2 are published in bf16 (config.json torch_dtype
# "bfloat16"), so that is the file a user's run reads; each side casts it to its compute dtype as it loads.
CHECKPOINT_DTYPE = torch.bfloat16
# The `bench` extra, imported only by the hf child, with the oldest version the hf side runs on (setup.cfg's pins):
# transformers 4.56 is the first with from_pretrained(dtype=) (4.56.0, 2025-08; earlier ones take torch_dtype=
# and would load the bf16 checkpoint in bf16), and it builds the per-example mask of packed rows from position_ids
# without an attention mask on the sdpa path (masking_utils, since 4.54).
HF_PACKAGES = {"transformers": (4, 56), "peft": (0, 13)}
# First-step losses of the two sides (same weights, same rows, before any update) may differ by their kernels'
# rounding only: in fp32 a few ulps summed over the blocks (measured 2026-12-07 on the CPU: 1.7e-7 relative on the
# tests' tiny model, 8.8e-8 at SmolLM2 shapes, seq 128), in bf16/fp16 the autocast roundings of each side's own
# op order (1.6e-4 at SmolLM2 shapes in bf16 on the CPU; not yet measured on a GPU). Beyond these the two sides
# compute different things. At random init every loss sits near ln(vocab), so the half-precision check is coarse.
LOSS_RTOL = {"fp32": 1e-5, "bf16": 5e-3, "fp16": 5e-3}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_hwm() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) so the training phase can be measured apart
    from setup. Linux only; returns False where /proc/self/clear_refs is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# The sampler AnonPeak runs beside a process: RssAnon of process PID (argv[1]) every PERIOD seconds (argv[2]), from
# /proc/PID/statm (resident minus shared pages = RssAnon); on each line read from stdin it first samples, then
# answers "PEAK SAMPLES" and on "restart" starts the peak again from the present value; "stop", end of input or
# the process gone end it. Plain Python without site or torch: it starts in a few tens of milliseconds.
_ANON_SAMPLER = """
import os, select, sys
pid, period = int(sys.argv[1]), float(sys.argv[2])
page, fd = os.sysconf("SC_PAGE_SIZE"), os.open(f"/proc/{pid}/statm", os.O_RDONLY)
def now():
    f = os.pread(fd, 256, 0).split()
    return (int(f[1]) - int(f[2])) * page
peak, n = now(), 1
print("ready", flush=True)
while True:
    ready = select.select([sys.stdin], [], [], period)[0]
    try:
        v = now()
    except OSError:
        break
    peak, n = max(peak, v), n + 1
    if ready:
        cmd = sys.stdin.readline().strip()
        if not cmd:
            break
        print(peak, n, flush=True)
        if cmd == "restart":
            peak = v
        elif cmd == "stop":
            break
"""


class AnonPeak:
    """High-water mark of this process's anonymous resident memory (RssAnon: heap, tensors, thread stacks; no
    file pages). The kernel keeps a high-water mark for the whole resident set (VmHWM), which also counts the
    pages of files mapped (a checkpoint read through mmap), but none for anonymous memory alone, so a small
    process beside this one samples it every `period` seconds (_ANON_SAMPLER). Out of process on purpose: a
    sampling thread here would take the GIL 200 times a second, which measurably slows Python-bound code (+6% on
    a pure-Python loop, 2026-12-07), and the HF side runs more Python per step than ours. A spike shorter than the
    period can be missed: the figure is a lower bound. Linux only: `AnonPeak.start()` returns None elsewhere."""

    def __init__(self, period: float):
        self.period, self.samples = period, 0
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _ANON_SAMPLER, str(os.getpid()), str(period)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise OSError("the RssAnon sampler did not start")

    @classmethod
    def start(cls, period: float = 0.005) -> "AnonPeak | None":
        if not os.path.exists("/proc/self/statm"):
            return None
        try:
            return cls(period)
        except OSError:
            return None

    def _ask(self, cmd: str) -> int:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        peak, self.samples = (int(x) for x in self.proc.stdout.readline().split())
        return peak

    def restart(self) -> int:
        """The peak so far; from here on the peak starts again from the present value."""
        return self._ask("restart")

    def stop(self) -> int:
        """The peak since the last restart (a last sample included); the sampler ends."""
        peak = self._ask("stop")
        self.proc.wait()
        return peak


# --------------------------------------------------------------------------------------------- the children
def checkpoint_model(ckpt, s: Setup, device, seed: int = 0):
    """The model engine.train builds from a checkpoint for this setup: load_model (weights cast to the compute
    dtype as read, block projections quantized one at a time) and prepare_model (LoRA seeded as the trainer
    seeds it, checkpointing, MLP tiles, the CPU heap trim)."""
    model = load_model(str(ckpt), dtype=dtype_of(s.precision), device=device, quantize=s.quantize,
                       double_quant=s.double_quant)
    torch.manual_seed(seed)  # the LoRA init, as dist.seed_all makes it in the trainer
    return prepare_model(model, s.to_config(), device)


def run_ours(cfg, s: Setup, device: torch.device, steps: int, warmup: int, answer_frac: float, log,
             rows: list[dict] | None = None, profile: bool = False, compile: bool = False, ckpt: Path | None = None,
             anon: AnonPeak | None = None) -> dict:
    """ckpt: the checkpoint both sides read (the parent's); None builds random weights in place (no file read)."""
    model = training_model(cfg, s, device) if ckpt is None else checkpoint_model(ckpt, s, device)
    if compile:  # --compile: as engine.step.prepare_model applies TrainConfig.compile (warmup steps pay for it)
        model.set_compiled()
    step = trainer_step(model, s, device)
    if rows is None:
        ids, labels = random_batch(cfg, s, device, answer_frac=answer_frac)
        rows = [{"input_ids": ids, "labels": labels}]
    else:  # the trainer's packed rows: segment ids and per-example positions, as engine.train passes them
        rows = [{k: v.to(device) for k, v in r.items()} for r in rows]
    out = _time_steps(lambda i: step([rows[i % len(rows)]], i).loss, device, steps, warmup, log,
                      tokens=_row_tokens(rows), profile=profile, anon=anon)
    out["optimizer"] = describe_optimizer(step.optimizer)
    out["weights"] = f"{ckpt} via model.load.load_model" if ckpt is not None else "random init in place"
    return out


def save_random_hf_checkpoint(cfg, path: Path, dtype: torch.dtype = CHECKPOINT_DTYPE, device: str = "cpu") -> Path:
    """A random Llama at cfg's shapes (load_model's seeded random init, drawn in fp32, stored in `dtype`), saved
    once as the checkpoint both sides read (the parent does this, so neither child pays for random init)."""
    model = load_model(cfg, init="random", dtype=dtype, device=device)
    path = save_hf_checkpoint(model, path)
    del model
    if device == "cuda":  # the parent's cached ~6 GiB (3B in bf16) would crowd the children on a 15 GiB T4
        torch.cuda.empty_cache()
    return path


def hf_adamw_kwargs(device: torch.device) -> dict:
    """The HF side's AdamW implementation: fused on CUDA (HF Trainer's default optim for torch >= 2.8,
    adamw_torch_fused; ours is fused there too), the per-parameter loop on the CPU (what engine.step.make_optimizer
    runs there)."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": False}


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """'AdamW fused, lr 0.0002, betas (0.9, 0.999), weight decay 0.0': which implementation steps the adapters."""
    d = opt.defaults
    impl = ("fused" if d.get("fused") else "foreach (multi-tensor)" if d.get("foreach")
            else "per-parameter loop (foreach=False)" if d.get("foreach") is False else "torch's default")
    return (f"{type(opt).__name__} {impl}, lr {d.get('lr')}, betas {tuple(d.get('betas', ()))}, "
            f"weight decay {d.get('weight_decay')}")


def run_hf(cfg, s: Setup, device: torch.device, steps: int, warmup: int, answer_frac: float, ckpt: Path,
           log, rows: list[dict] | None = None, profile: bool = False, anon: AnonPeak | None = None) -> dict:
    import transformers  # the `bench` extra, only in the hf child: never an engine dependency
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    dtype = dtype_of(s.precision)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=s.double_quant)
    model = transformers.LlamaForCausalLM.from_pretrained(
        ckpt, quantization_config=q, device_map={"": str(device) if device.type == "cpu" else device.index or 0},
        dtype=dtype, attn_implementation="sdpa")
    # casts norms/embeddings to fp32 (as every QLoRA recipe does) and turns on non-reentrant checkpointing
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
                                             target_modules=list(s.lora_targets), bias="none",
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    tc = s.to_config()  # ours' hyperparameters (TrainConfig's defaults; HF Trainer's weight decay is 0.0 too)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay,
                            **hf_adamw_kwargs(device))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if rows is None:
        ids, labels = random_batch(cfg, s, device, answer_frac=answer_frac)
        rows = [{"input_ids": ids, "labels": labels}]
    tokens = _row_tokens(rows)
    # packed rows the padding-free way transformers offers (DataCollatorWithFlattening's): positions that restart
    # at 0 per example and no attention mask, from which it builds a per-example causal mask
    rows = [{k: r[k].to(device) for k in ("input_ids", "labels", "position_ids") if k in r} for r in rows]

    def step(i):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**rows[i % len(rows)]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    out = _time_steps(step, device, steps, warmup, log, tokens=tokens, profile=profile, anon=anon)
    out["optimizer"] = describe_optimizer(opt)
    out["weights"] = f"{ckpt} via transformers.LlamaForCausalLM.from_pretrained"
    return out


def _row_tokens(rows: list[dict]) -> list[int]:
    """Real tokens in each micro-batch: padding (segment id -1) excluded; every position of an unpacked row."""
    return [int((r["segment_ids"] >= 0).sum()) if "segment_ids" in r else r["input_ids"].numel() for r in rows]


def _time_steps(step, device: torch.device, steps: int, warmup: int, log, tokens: list[int] | None = None,
                profile: bool = False, anon: AnonPeak | None = None) -> dict:
    """step(i) -> loss, for i in 0 .. warmup + steps - 1; times the last `steps`. tokens[i % len(tokens)]: the real
    tokens step i trains on. profile (CUDA): one more step under torch.profiler, for its GPU-busy time. anon: the
    sampler started when the process began (the child's), else one is started here (training only)."""
    # Peak RSS from the kernel's per-address-space high-water mark (VmHWM): exec starts it afresh, whereas
    # getrusage's ru_maxrss carries over the parent's peak from before the fork (Linux keeps the larger of
    # the two across exec), which would charge the bench parent's memory to the child.
    setup_hwm = _hwm_bytes()
    hwm_reset = _reset_hwm()
    anon = anon or AnonPeak.start()
    setup_anon = anon.restart() if anon else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device)
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(float(step(i)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        log(f"  {'warmup' if i < warmup else 'step'} {i}: {dt:.2f} s ({dc:.2f} CPU s), loss {losses[-1]:.3f}")
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    prof = _profile_step(step, device, warmup + steps, log) if profile and device.type == "cuda" else None
    # Read at the end whether or not the reset worked: without it (a /proc that refuses clear_refs) the mark
    # still covers the whole process, training included, only the setup/training split is lost.
    end_hwm = _hwm_bytes()
    train_hwm = end_hwm if hwm_reset else None
    peaks = [b for b in (setup_hwm, end_hwm) if b]
    train_anon = anon.stop() if anon else None
    # CPU seconds (all threads of this process): on a shared machine wall time depends on the neighbours'
    # load, CPU time much less so; both are reported.
    tokens = tokens or [0]
    if prof:
        prof["tokens"] = tokens[(warmup + steps) % len(tokens)]
    out = {"step_seconds": times, "step_cpu_seconds": cpu_times, "losses": losses, "profile": prof,
           "step_tokens": [tokens[i % len(tokens)] for i in range(warmup, warmup + steps)],
           "peak_rss_bytes": max(peaks) if peaks else _peak_rss_bytes(),
           "ru_maxrss_bytes": _peak_rss_bytes(), "setup_peak_rss_bytes": setup_hwm, "train_peak_rss_bytes": train_hwm,
           "hwm_reset": hwm_reset,
           "peak_anon_bytes": max(setup_anon, train_anon) if anon else None, "setup_peak_anon_bytes": setup_anon,
           "train_peak_anon_bytes": train_anon, "anon_sample_period_s": anon.period if anon else None,
           "anon_samples": anon.samples if anon else None}
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), static_allocated_bytes=static)
    return out


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap; idle gaps do not count)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# What a GPU kernel does, from its name (cuBLAS / cuBLASLt, CUTLASS, PyTorch's flash and memory-efficient
# attention, bitsandbytes, PyTorch's fused optimizers, inductor): the split of GPU time issue 14 is about.
# First match wins, so attention kernels built on CUTLASS count as attention.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "cublas", "xmma", "nvjet", "wgmma")),
    ("NF4 dequantize", ("dequantize",)),
    ("optimizer and clipping", ("adam", "multi_tensor")),
    ("copy / fill", ("memcpy", "memset")),
    ("compiled (triton)", ("triton",)),
)
OTHER_KIND = "elementwise / reduction / other"


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in n for k in keys)), OTHER_KIND)


def kernel_split(kernels: list[tuple[str, float]], top: int = 8) -> tuple[dict, list]:
    """[(kernel name, seconds)] -> ({kind: seconds}, the `top` kernels by time as [name, seconds, count])."""
    kinds: dict = {}
    names: dict = {}
    for name, sec in kernels:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + sec
        total, count = names.get(name, (0.0, 0))
        names[name] = (total + sec, count + 1)
    ranked = sorted(names.items(), key=lambda kv: -kv[1][0])[:top]
    return kinds, [[name[:100], sec, count] for name, (sec, count) in ranked]


def _profile_step(step, device: torch.device, i: int, log) -> dict | None:
    """One step under torch.profiler: its wall and CPU seconds and the GPU-busy seconds (union of the device
    activity the profiler records: kernels, copies, sets). None, with a log line, if the profiler fails."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(i)
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = [(e.time_range.start, e.time_range.end) for e in device_events]
        busy = busy_seconds(spans) / 1e6  # the profiler's times are microseconds
        kinds, top = kernel_split([(e.name, e.time_range.elapsed_us() / 1e6) for e in device_events])
    except Exception as e:  # a profiler problem must not cost the timed figures
        log(f"  profile failed: {type(e).__name__}: {e}")
        return None
    log(f"  profiled step: {wall:.3f} s wall (profiler on), {cpu:.3f} CPU s, GPU busy {busy:.3f} s; GPU time by kind: "
        + format_kinds(kinds))
    for name, sec, count in top:
        log(f"    {sec * 1e3:8.2f} ms  {count:5d} x  {name}")
    return {"wall_seconds": wall, "cpu_seconds": cpu, "gpu_busy_seconds": busy, "device_events": len(spans),
            "gpu_kinds": kinds, "top_kernels": top}


def format_kinds(kinds: dict) -> str:
    total = sum(kinds.values()) or 1.0
    return ", ".join(f"{k} {v / total:.0%} ({v * 1e3:.1f} ms)" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of this device at this dtype: the denominator of model FLOP
    utilisation. Square n x n @ n x n (n = 8192 on CUDA, 1024 on the CPU), median of `reps` after a warmup."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for k in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            times.append(time.perf_counter() - t0)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(times) / 1e12


def model_flops_per_token(cfg, checkpointing: bool = True) -> int:
    """FLOPs per trained token counted on the seven projections of every block (FACTS.md's definition): 2 P
    forward, 2 P for the input gradients (the frozen base has no weight gradients), and 2 P more when
    checkpointing recomputes the forward. Attention scores, the head and LoRA are left out, so this undercounts."""
    proj = cfg.num_hidden_layers * sum(o * i for o, i in linear_shapes(cfg).values())
    return (6 if checkpointing else 4) * proj


# ------------------------------------------------------------------------------------------ rows from real data
ROW_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


def build_rows(spec: str, split: str, tokenizer: str, seq_len: int, batch_size: int, n: int,
               pad_to_seq_len: bool = True) -> list[dict]:
    """The first n micro-batches engine.train feeds from this data (data.batch.Batches: validated examples,
    packed rows of <= seq_len, shuffled with seed 0, padded to seq_len as TrainConfig.pad_to_seq_len does by
    default), as plain tensors."""
    from data.batch import Batches
    from data.validate import load_validated
    from model import load_tokenizer

    examples, _ = load_validated(spec, split)
    tok = load_tokenizer(tokenizer)
    batches = Batches(tok, examples, seq_len=seq_len, pack=True, batch_size=batch_size, pad_to_seq_len=pad_to_seq_len)
    return [{k: b[k] for k in ROW_KEYS} for b in (batches.next_batch() for _ in range(n))]


def save_rows(rows: list[dict], path: Path, meta: dict) -> Path:
    from safetensors.torch import save_file

    from model.files import atomic_file

    make_dirs(Path(path).parent)
    with atomic_file(path) as tmp:
        save_file({f"{k}.{i}": r[k].contiguous() for i, r in enumerate(rows) for k in ROW_KEYS}, tmp,
                  metadata={k: str(v) for k, v in meta.items()})
    return path


def rows_metadata(path) -> dict:
    """The metadata save_rows wrote into a rows file (strings), {} when it has none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_rows(path) -> list[dict]:
    """Rows written by save_rows (--save-rows), checked: every key of every row, equal shapes within a row."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a rows file written by engine.bench --save-rows ({e})") from None
    n = len({k.rsplit(".", 1)[-1] for k in t})
    rows = []
    for i in range(n):
        missing = [f"{k}.{i}" for k in ROW_KEYS if f"{k}.{i}" not in t]
        if missing:
            raise ValueError(f"{path}: key {missing[0]!r} missing; write the file again with --save-rows")
        r = {k: t[f"{k}.{i}"] for k in ROW_KEYS}
        if len({tuple(v.shape) for v in r.values()}) != 1 or r["input_ids"].ndim != 2:
            raise ValueError(f"{path}: row {i} has tensors of different shapes; write it again with --save-rows")
        rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no rows; write it again with --save-rows")
    return rows


# ------------------------------------------------------------------------------------------------ the parent
def _child_cmd(args, which: str, out: Path, ckpt: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "engine.bench", "--child", which, "--child-out", str(out),
           "--model", args.model, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--lora-r", str(args.lora_r), "--answer-frac", str(args.answer_frac), "--loss-chunk", str(args.loss_chunk),
           "--precision", args.precision]
    if ckpt is not None:
        cmd += ["--checkpoint", str(ckpt)]
    if args.rows_file:
        cmd += ["--rows", str(args.rows_file)]
    if args.profile:
        cmd += ["--profile"]
    if args.compile:
        cmd += ["--compile"]
    if args.mlp_tile:
        cmd += ["--mlp-tile", str(args.mlp_tile)]
    if not args.trim_cpu_heap:
        cmd += ["--no-trim-cpu-heap"]
    return cmd


def _run_child(args, which: str, out: Path, ckpt: Path | None) -> dict:
    """One run in its own process: its result, or {"oom": True, "error": ...} when it ran out of memory (a CUDA
    or host allocation that failed, reported by the child; or the kernel's OOM killer, seen as SIGKILL)."""
    proc = subprocess.run(_child_cmd(args, which, out, ckpt), cwd=REPO,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        result = json.loads(out.read_text()) if out.exists() else None
    except ValueError:  # a child that died while writing it: the failure below, not a JSON traceback
        result = None
    if isinstance(result, dict) and (proc.returncode == 0 or result.get("oom")):
        return result
    if proc.returncode == -signal.SIGKILL:
        return {"oom": True, "error": "killed by SIGKILL (most likely the kernel's out-of-memory killer)"}
    raise RuntimeError(f"the {which} run failed (exit {proc.returncode}); see its output above")


def _summary(runs: list[dict], device: torch.device) -> dict:
    """Medians over runs and steps. tokens/s: equal rows (random, unpacked): tokens per step / the median step
    time, as before; packed rows from data hold different numbers of real tokens per step: all their tokens over
    all their seconds (every timed step of every run)."""
    times = [t for r in runs for t in r["step_seconds"]]
    cpu = [t for r in runs for t in r.get("step_cpu_seconds", [])]
    toks = [t for r in runs for t in r["step_tokens"]]
    out = {"runs": len(runs), "median_step_seconds": statistics.median(times),
           "median_step_cpu_seconds": statistics.median(cpu) if cpu else None,
           "tokens_per_s": sum(toks) / sum(times) if len(set(toks)) > 1 else toks[0] / statistics.median(times),
           "tokens_per_cpu_s": (None if not cpu or not sum(cpu) else sum(toks) / sum(cpu) if len(set(toks)) > 1
                                else toks[0] / statistics.median(cpu)),
           "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in runs))}
    profs = [r["profile"] for r in runs if r.get("profile")]
    if profs:  # one profiled step per run: the CPU-time / GPU-busy split, and tokens per GPU-busy second
        out["profile"] = {k: statistics.median(p[k] for p in profs) for k in ("wall_seconds", "cpu_seconds",
                                                                             "gpu_busy_seconds")}
        out["tokens_per_gpu_busy_s"] = sum(p["tokens"] for p in profs) / sum(p["gpu_busy_seconds"] for p in profs)
        kinds = {k for p in profs for k in p.get("gpu_kinds", {})}
        out["profile"]["gpu_kinds"] = {k: statistics.median(p.get("gpu_kinds", {}).get(k, 0.0) for p in profs)
                                       for k in kinds}
    for key in ("train_peak_rss_bytes", "peak_anon_bytes", "train_peak_anon_bytes"):
        got = [r[key] for r in runs if r.get(key)]
        if got:
            out[key] = int(statistics.median(got))
    out["optimizer"] = runs[0].get("optimizer")
    if device.type == "cuda":
        out["peak_allocated_bytes"] = int(statistics.median(r["peak_allocated_bytes"] for r in runs))
        out["peak_reserved_bytes"] = int(statistics.median(r["peak_reserved_bytes"] for r in runs))
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    return f"{name}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads{load}"


def stack_versions() -> dict:
    """Installed versions of what the two sides run (None: not installed), read without importing them."""
    return {pkg: _installed_version(pkg) for pkg in ("torch", "transformers", "peft", "bitsandbytes", "safetensors")}


def git_commit() -> str | None:
    """This checkout's commit, '+dirty' when tracked files differ from it; None outside a git checkout. Read only:
    GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing the index (a write) while others may commit."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              env=env, timeout=30)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, env=env, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def _installed_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_hf_packages() -> list[str]:
    """What --vs hf lacks, in words ('peft', 'transformers >= 4.56 (found 4.45.0)'); [] when nothing."""
    out = []
    for pkg, least in HF_PACKAGES.items():
        if find_spec(pkg) is None:
            out.append(pkg)
            continue
        found = _installed_version(pkg)
        try:
            old = found is not None and tuple(int(x) for x in found.split(".")[:2]) < least
        except ValueError:  # a version string we cannot read (a local build): let it run
            old = False
        if old:
            out.append(f"{pkg} >= {'.'.join(map(str, least))} (found {found})")
    return out


def loss_check(results: dict, precision: str) -> dict | None:
    """Both sides' first-step losses (same weights, same rows, before any update): they may differ by rounding
    only (LOSS_RTOL for the precision); more means the two sides compute different things. None without both."""
    firsts = {k: [r["losses"][0] for r in runs if r.get("losses")] for k, runs in results.items()}
    if not firsts.get("ours") or not firsts.get("hf"):
        return None
    rel = max(abs(o - h) / max(abs(h), 1e-12) for o in firsts["ours"] for h in firsts["hf"])
    tol = LOSS_RTOL[precision]
    return {"ours": firsts["ours"][0], "hf": firsts["hf"][0], "max_relative_difference": rel, "tolerance": tol,
            "ok": rel <= tol}


def flop_counts(cfg) -> dict:
    """Per trained token, on the seven projections of every block (P weights; FACTS.md's definition).
    model: 4P, forward 2P + input gradients 2P (the frozen base has no weight gradients): the conventional
    LoRA count, for model FLOP utilisation (MFU). hardware: 6P, 4P + the 2P forward that checkpointing
    recomputes in backward: what the device executes, for hardware FLOP utilisation (HFU)."""
    return {"model_4p": model_flops_per_token(cfg, checkpointing=False),
            "hardware_6p": model_flops_per_token(cfg, checkpointing=True),
            "projection_params": model_flops_per_token(cfg, checkpointing=False) // 4}


def parent(args) -> dict:
    device = torch.device(args.device)
    cfg = load_config(args.model)  # fail early on a bad --model
    impls = ["ours"] + (["hf"] if args.vs == "hf" else [])
    results: dict[str, list] = {k: [] for k in impls}
    oom: dict[str, str] = {}
    rows_meta = None
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        args.rows_file = None
        if args.data:
            args.rows_file, rows_meta = _rows_for(args, cfg, Path(tmp))
            if args.save_rows:
                return {"saved_rows": str(save_rows(load_rows(args.rows_file), Path(args.save_rows), rows_meta)),
                        **rows_meta}
        precision = _precision(args, device)
        peak = matmul_peak_tflops(device, dtype_of(precision))
        print(f"measured {precision} matmul peak: {peak:.3g} TFLOP/s", flush=True)
        # both sides read this one file (ours too, with --vs none, so its figures do not depend on --vs)
        ckpt = Path(tmp) / "random-checkpoint"
        print(f"saving a random {str(CHECKPOINT_DTYPE).removeprefix('torch.')} checkpoint at "
              f"{cfg.num_hidden_layers}×{cfg.hidden_size} shapes ...", flush=True)
        save_random_hf_checkpoint(cfg, ckpt, CHECKPOINT_DTYPE, device=device.type)
        checkpoint = {"dtype": str(CHECKPOINT_DTYPE).removeprefix("torch."), "loaded_as": precision,
                      "bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")), "path": str(ckpt),
                      "weights": "random (load_model's seeded init, drawn in fp32), saved by model.hf_checkpoint"}
        for rnd in range(args.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]  # alternate who goes first (thermal, page cache)
            for which in order:
                if which in oom:  # it would run out again: the other side's rounds go on
                    continue
                print(f"round {rnd + 1}/{args.rounds}: {which}", flush=True)
                res = _run_child(args, which, Path(tmp) / f"{which}-{rnd}.json", ckpt)
                if res.get("oom"):
                    oom[which] = res.get("error", "out of memory")
                    print(f"{which}: out of memory ({oom[which]}); no ratios", flush=True)
                else:
                    results[which].append(res)
    summary = {k: _summary(v, device) for k, v in results.items() if v}
    flops = flop_counts(cfg)
    for v in summary.values():
        v["model_tflops_4p"] = v["tokens_per_s"] * flops["model_4p"] / 1e12
        v["hardware_tflops_6p"] = v["tokens_per_s"] * flops["hardware_6p"] / 1e12
        v["mfu_4p"] = v["model_tflops_4p"] / peak
        v["hfu_6p"] = v["hardware_tflops_6p"] / peak
        # kept for readers of older reports, meaning unchanged: 6P per token, i.e. hardware FLOPs (= hfu_6p)
        v["model_tflops"], v["mfu"] = v["hardware_tflops_6p"], v["hfu_6p"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(device),
              "command": "python -m engine.bench " + " ".join(args.argv), "model": args.model,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "lora_r": args.lora_r,
              "rows": rows_meta or {"kind": "random, unpacked", "answer_frac": args.answer_frac},
              "compile": args.compile, "trim_cpu_heap": args.trim_cpu_heap, "mlp_tile": args.mlp_tile,
              "loss_chunk": args.loss_chunk, "checkpoint": checkpoint,
              "matmul_peak_tflops": peak, "flops_per_token": flops, "model_flops_per_token": flops["hardware_6p"],
              "key_notes": {"mfu, model_tflops, model_flops_per_token": "kept from older reports with their old "
                            "meaning, 6P per token (hardware FLOPs incl. the checkpointed recompute): the same as "
                            "hfu_6p, hardware_tflops_6p, flops_per_token.hardware_6p; MFU proper is mfu_4p"},
              "answer_frac": args.answer_frac, "precision": precision,
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "torch": torch.__version__, "versions": stack_versions(), "commit": git_commit(),
              "results": summary, "raw": results}
    if oom:
        report["oom"] = oom
    if "ours" in summary and "hf" in summary and not oom:
        report["ratios"] = _ratios(summary["ours"], summary["hf"], device)
    check = loss_check(results, precision)
    if check:
        report["first_loss_check"] = check
    return report


def _rows_for(args, cfg, tmp: Path) -> tuple[Path, dict]:
    """--data: rows as the trainer builds them, written once for both children (rows:FILE: read as given, and
    only at the --seq-len they were built for: the report's sequence length and fill are that)."""
    n = args.warmup + args.steps + 1  # a different micro-batch per step, the profiled one included
    if args.data.startswith("rows:"):
        path = Path(args.data[len("rows:"):])
        rows = load_rows(path)
        file_meta = rows_metadata(path)
        most = max(int(r["input_ids"].shape[0]) for r in rows)  # (an epoch's last micro-batch may hold fewer)
        if most != args.batch_size:  # the report and the fill are per --batch-size rows
            raise ValueError(f"{path}: its micro-batches hold up to {most} rows; pass --batch-size {most} (they "
                             "were saved with it)")
        width = max(int(r["input_ids"].shape[1]) for r in rows)
        built = file_meta.get("seq_len")  # written since 2026-12; older files were all padded to it
        if built is not None and int(built) != args.seq_len:
            raise ValueError(f"{path}: its rows were built for --seq-len {built} (up to {width} tokens wide), not "
                             f"{args.seq_len}; pass --seq-len {built}")
        if built is None and width != args.seq_len:
            raise ValueError(f"{path}: its rows are {width} tokens wide, not --seq-len {args.seq_len}; pass "
                             f"--seq-len {width}")
        if len(rows) < n:
            print(f"note: {path} holds {len(rows)} micro-batches for {n} steps; they are reused in turn", flush=True)
        meta = {"kind": "packed rows from " + path.name, "micro_batches": len(rows), "file": str(path),
                "file_metadata": file_meta}
    else:
        rows = build_rows(args.data, args.split, args.tokenizer, args.seq_len, args.batch_size, n,
                          pad_to_seq_len=args.pad_to_seq_len)
        pad = f", padded to {args.seq_len}" if args.pad_to_seq_len else ", padded to each batch's longest row"
        meta = {"kind": f"packed rows of {args.data} ({args.split}), tokenized by {args.tokenizer}{pad}",
                "micro_batches": n, "seq_len": args.seq_len, "pad_to_seq_len": args.pad_to_seq_len}
        path = save_rows(rows, tmp / "rows.safetensors", meta)
    if max(r["input_ids"].shape[1] for r in rows) > args.seq_len:
        raise ValueError(f"{args.data}: rows are longer than --seq-len {args.seq_len}")
    top = max(int(r["input_ids"].max()) for r in rows)
    if top >= cfg.vocab_size:  # the ids index the benchmark's random model
        raise ValueError(f"{args.data}: token id {top} is outside the vocabulary of --model {args.model} "
                         f"({cfg.vocab_size}); tokenize with a smaller vocabulary (--tokenizer; the default, "
                         "smollm2-135m, has 49,152)")
    tokens = _row_tokens(rows)
    meta.update(width=max(int(r["input_ids"].shape[1]) for r in rows),
                real_tokens_per_micro_batch=statistics.mean(tokens),
                fill=statistics.mean(tokens) / (args.batch_size * args.seq_len))
    return path, meta


def _ratios(o: dict, h: dict, device: torch.device) -> dict:
    out = {"tokens_per_s": o["tokens_per_s"] / h["tokens_per_s"],
           "tokens_per_cpu_s": (o["tokens_per_cpu_s"] / h["tokens_per_cpu_s"]
                                if o["tokens_per_cpu_s"] and h["tokens_per_cpu_s"] else None),
           "peak_rss": o["peak_rss_bytes"] / h["peak_rss_bytes"]}
    for key in ("train_peak_rss", "peak_anon", "train_peak_anon"):
        if o.get(f"{key}_bytes") and h.get(f"{key}_bytes"):
            out[key] = o[f"{key}_bytes"] / h[f"{key}_bytes"]
    if device.type == "cuda":
        out["peak_allocated"] = o["peak_allocated_bytes"] / h["peak_allocated_bytes"]
    if o.get("tokens_per_gpu_busy_s") and h.get("tokens_per_gpu_busy_s"):
        out["tokens_per_gpu_busy_s"] = o["tokens_per_gpu_busy_s"] / h["tokens_per_gpu_busy_s"]
    return out


RATIO_LABELS = {
    "peak_rss": "peak RSS (VmHWM: whole resident set, checkpoint file pages mapped included)",
    "train_peak_rss": "training-phase peak RSS (VmHWM after setup)",
    "peak_anon": "peak anon (RssAnon high-water: heap and tensors, no file pages)",
    "train_peak_anon": "training-phase peak anon",
}


def _ours_settings(rep: dict) -> str:
    tile = rep.get("mlp_tile") or 0
    trim = "on" if rep.get("trim_cpu_heap", True) else "off (--no-trim-cpu-heap)"
    return (f"compile {'on' if rep.get('compile') else 'off'}, CPU heap trim {trim}, "
            f"MLP tile {tile if tile else 'off (whole micro-batch)'}, loss chunk {rep.get('loss_chunk', '?')}")


def format_report(rep: dict) -> str:
    res = rep["results"]
    cuda = any("peak_allocated_bytes" in v for v in res.values())
    head = (f"{'':<6} {'tokens/s':>10} {'step s':>8} {'tok/CPU-s':>10} {'MFU 4P':>7} {'HFU 6P':>7} "
            f"{'peak RSS':>11} {'train RSS':>11} {'peak anon':>11} {'train anon':>11}")
    head += f" {'peak alloc':>11} {'reserved':>11}" if cuda else ""
    rows = rep.get("rows", {})
    v_ = rep.get("versions", {})
    ck = rep.get("checkpoint")
    lines = [f"{rep['date']} | {rep['device']} | {rep['model']} seq {rep['seq_len']} batch "
             f"{rep['batch_size']} | LoRA r{rep['lora_r']} NF4 {rep['precision']} | {rep['rounds']} rounds × "
             f"{rep['steps']} steps",
             f"command: {rep.get('command', '?')}",
             "versions: " + ", ".join(f"{k} {v_.get(k) or 'not installed'}" for k in
                                      ("torch", "transformers", "peft", "bitsandbytes"))
             + f"; commit {rep.get('commit') or 'unknown (not a git checkout)'}",
             f"rows: {rows.get('kind', '?')}" + (f", {rows['width']} tokens wide" if "width" in rows else "")
             + (f", {rows['fill']:.0%} real tokens" if "fill" in rows else "")]
    if ck:
        lines.append(f"weights: one random checkpoint ({ck['dtype']} safetensors, {fmt(ck['bytes'])}) read by each "
                     f"side through its own loader and cast to {ck['loaded_as']}")
    opt = {k: v.get("optimizer") for k, v in res.items()}
    lines.append(f"ours: {_ours_settings(rep)}; optimizer {opt.get('ours') or '?'}")
    if "hf" in res or "hf" in rep.get("oom", {}):
        lines.append(f"hf:   transformers LlamaForCausalLM (sdpa, full logits) + peft LoRA + bitsandbytes NF4; "
                     f"optimizer {opt.get('hf') or 'not reached (out of memory)'}")
    fl = rep.get("flops_per_token")
    if fl:
        lines.append(f"FLOPs per token on the {fl['projection_params'] / 1e6:.1f} M projection weights P: MFU counts "
                     f"model FLOPs 4P = {fl['model_4p'] / 1e9:.3g} GFLOP (forward 2P + input gradients 2P), HFU "
                     f"hardware FLOPs 6P = {fl['hardware_6p'] / 1e9:.3g} GFLOP (+ the checkpointed forward's "
                     f"recompute 2P); attention scores, lm_head and LoRA left out; both over the measured "
                     f"{rep['precision']} matmul peak {rep.get('matmul_peak_tflops', 0):.3g} TFLOP/s")
    lines.append(head)
    for k, v in res.items():
        tpc = f"{v['tokens_per_cpu_s']:.1f}" if v.get("tokens_per_cpu_s") else "-"
        line = (f"{k:<6} {v['tokens_per_s']:>10.1f} {v['median_step_seconds']:>8.2f} {tpc:>10} "
                f"{v.get('mfu_4p', 0):>7.1%} {v.get('hfu_6p', v.get('mfu', 0)):>7.1%} "
                + " ".join(f"{fmt(v[key]) if v.get(key) else '-':>11}" for key in
                           ("peak_rss_bytes", "train_peak_rss_bytes", "peak_anon_bytes", "train_peak_anon_bytes")))
        if cuda:
            line += f" {fmt(v['peak_allocated_bytes']):>11} {fmt(v['peak_reserved_bytes']):>11}"
        lines.append(line)
    for k, err in rep.get("oom", {}).items():
        lines.append(f"{k:<6} out of memory: {err}")
    for k, v in res.items():
        if v.get("profile"):
            p = v["profile"]
            lines.append(f"{k} profiled step: {p['wall_seconds']:.3f} s wall, {p['cpu_seconds']:.3f} s CPU, "
                         f"{p['gpu_busy_seconds']:.3f} s GPU busy ({p['gpu_busy_seconds'] / p['wall_seconds']:.0%}); "
                         f"{v['tokens_per_gpu_busy_s']:.0f} tokens per GPU-busy second")
            if p.get("gpu_kinds"):
                lines.append(f"{k} GPU time by kind: {format_kinds(p['gpu_kinds'])}")
    for k, v in rep.get("ratios", {}).items():
        if v is not None:
            lines.append(f"ours/hf {k}: {v:.2f}" + (f"  [{RATIO_LABELS[k]}]" if k in RATIO_LABELS else ""))
    if rep.get("oom"):
        lines.append(f"no ours/hf ratios: {', '.join(rep['oom'])} ran out of memory")
    check = rep.get("first_loss_check")
    if check:
        lines.append(f"first-step loss: ours {check['ours']:.7g}, hf {check['hf']:.7g} (relative difference "
                     f"{check['max_relative_difference']:.1e}, tolerance {check['tolerance']:.0e} for "
                     f"{rep['precision']}): " + ("the same computation" if check["ok"] else
                                                 "MISMATCH, the two sides do not compute the same thing"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    add_run_flags(p, seq_len=1024, batch_size=2)
    deprecated_alias(p, "--model-config", "--model", "model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="runs per implementation, alternating")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vs", choices=["hf", "none"], default="hf", help="reference to compare against")
    p.add_argument("--answer-frac", type=float, default=0.125,
                   help="fraction of each row that is supervised answer (completion-only labels)")
    p.add_argument("--data", help="rows as engine.train builds them from this data (acord:DIR, cuad:DIR, "
                   "jsonl:FILE: packed, shuffled, a new micro-batch each step), or rows:FILE from --save-rows; "
                   "default: random unpacked rows")
    p.add_argument("--split", default="train", help="split of --data")
    p.add_argument("--pad-to-seq-len", action=argparse.BooleanOptionalAction, default=True,
                   help="with --data: pad every micro-batch to --seq-len, as engine.train does by default "
                        "(TrainConfig.pad_to_seq_len); --no-pad-to-seq-len pads to each batch's longest row")
    p.add_argument("--tokenizer", default=EMBEDDED, help="tokenizer for --data (its ids index the random model)")
    p.add_argument("--save-rows", metavar="FILE", help="with --data: write the rows (safetensors) and stop, for a "
                   "machine without the data: pass --data rows:FILE there")
    p.add_argument("--profile", action="store_true", help="CUDA: one more step per run under torch.profiler, "
                   "for the CPU-time / GPU-busy split and tokens per GPU-busy second")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each decoder block around its "
                   "attention, as engine.train --compile does (give it --warmup steps: compiling is not timed)")
    p.add_argument("--mlp-tile", type=int, default=0, metavar="N", help="ours: the MLP N tokens at a time, as "
                   "engine.train --mlp-tile runs it (0 = whole micro-batch)")
    p.add_argument("--trim-cpu-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="ours on the CPU: malloc_trim before each block of the forward, as engine.train does by "
                        "default (TrainConfig.trim_cpu_heap)")
    p.add_argument("--json", metavar="OUT", help="also write the full report (all step times) here")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    return p


def _precision(args, device: torch.device) -> str:
    return auto_mode(device) if args.precision == "auto" else args.precision


def _child(args) -> int:
    anon = AnonPeak.start()  # first: the peak of anonymous memory covers loading too, as VmHWM does
    device = torch.device(args.device)
    cfg = load_config(args.model)
    s = Setup(seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r, lora_targets=TARGETS,
              checkpointing=True, precision=_precision(args, device), loss_chunk=args.loss_chunk,
              device=device.type, mlp_tile=args.mlp_tile if args.child == "ours" else 0,
              trim_cpu_heap=args.trim_cpu_heap)

    def log(msg):
        print(f"[{args.child}] {msg}", flush=True)

    rows = load_rows(args.rows) if args.rows else None
    if rows is not None:
        s = dataclasses.replace(s, pack=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    try:
        if args.child == "ours":
            res = run_ours(cfg, s, device, args.steps, args.warmup, args.answer_frac, log, rows, args.profile,
                           args.compile, ckpt=ckpt, anon=anon)
        else:
            if ckpt is None:
                raise ValueError("the hf child needs --checkpoint")
            res = run_hf(cfg, s, device, args.steps, args.warmup, args.answer_frac, ckpt, log, rows, args.profile,
                         anon=anon)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # a result: this side does not fit
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        log(f"out of memory: {msg}")
        Path(args.child_out).write_text(json.dumps({"oom": True, "error": msg}))
        return 3
    res["setup"] = asdict(s)
    Path(args.child_out).write_text(json.dumps(res))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU visible to torch; use --device cpu")
        if args.seq_len < 2 or args.batch_size < 1 or args.steps < 1 or args.rounds < 1:
            raise ValueError("--seq-len must be >= 2, --batch-size, --steps and --rounds >= 1")
        if args.save_rows and not args.data:
            raise ValueError("--save-rows needs --data (the data to build the rows from)")
        if not 0 < args.answer_frac <= 1:
            raise ValueError("--answer-frac must be in (0, 1]")
        if args.mlp_tile < 0:
            raise ValueError(f"--mlp-tile must be >= 0 (0 = no tiles), got {args.mlp_tile}")
        if args.json and not args.child:  # the report file: writable before minutes of runs, not after them
            if Path(args.json).is_dir():
                raise ValueError(f"--json {args.json} is a directory; name a file, e.g. {args.json}/bench.json")
            check_writable(Path(args.json).parent, "--json")
        missing = missing_hf_packages() if args.vs == "hf" and not args.child and not args.save_rows else []
        if missing:  # before any run: else ours runs first and the hf child dies on its import
            raise ValueError(f"--vs hf needs {' and '.join(missing)} (the HF stack it compares against): "
                             "pip install -e '.[bench]', or pass --vs none")
        # before any child loads a model (the compiler runs in step 1, bitsandbytes' kernels in the first forward);
        # both sides quantize to NF4 through bitsandbytes' kernels on CUDA
        check_device_tools(TrainConfig(compile=args.compile, quantize="nf4"), args.device)
        if args.child:
            return _child(args)
        rep = parent(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"engine.bench: error: {e}", file=sys.stderr)
        return 2
    if "saved_rows" in rep:
        print(f"wrote {rep['saved_rows']}: {rep['micro_batches']} micro-batches, {rep['fill']:.0%} real tokens; "
              f"bench them with --data rows:{rep['saved_rows']}")
        return 0
    print(format_report(rep))
    if args.json:
        try:  # whole or not at all: a full disk leaves no truncated report (nor an earlier one cut to nothing)
            atomic_write_text(args.json, json.dumps(rep, indent=1))
        except OSError as e:  # the report is printed above: the runs' figures are not lost
            print(f"engine.bench: error: {e}", file=sys.stderr)
            return 2
    check = rep.get("first_loss_check")
    if check and not check["ok"]:
        print(f"engine.bench: error: first-step losses differ beyond {rep['precision']} rounding (ours "
              f"{check['ours']:.7g}, hf {check['hf']:.7g}, relative {check['max_relative_difference']:.1e} > "
              f"{check['tolerance']:.0e}): the two sides compute different things, so the ratios above do not "
              "compare like with like", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
