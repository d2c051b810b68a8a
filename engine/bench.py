"""Side-by-side training-step benchmark: our engine against the stack users would otherwise pick
(transformers + peft + bitsandbytes), same shapes, same data, same device, alternating runs.

    python -m engine.bench --model-config smollm2-135m --seq-len 1024 --batch-size 2 --steps 3 --device cpu --vs hf
    python -m engine.bench --model-config llama-3.2-3b --seq-len 2048 --batch-size 2 --device cuda --vs hf

Both sides: NF4 base weights (blocksize 64), LoRA r on all seven projections (alpha 2r, no dropout), non-reentrant
activation checkpointing, completion-only labels (the last --answer-frac of each row), AdamW on the adapters,
fp32 on the CPU / bf16 autocast on sm >= 80 (fp16 below). Random weights: speed and memory depend on shapes only.

ours: engine/memory.build_model (what load_model builds: meta device, projections quantized as they are
      assigned) + model/lora.apply_lora + engine/train.forward_backward (CausalLMLoss: logits only at the
      supervised positions, chunked CE) + Precision.clip_and_step.
hf:   transformers LlamaForCausalLM from a random checkpoint saved once in the parent, loaded with
      BitsAndBytesConfig(load_in_4bit, nf4) (bitsandbytes >= 0.46 runs its 4-bit layers on the CPU, so the same
      recipe works on both devices), peft.prepare_model_for_kbit_training (non-reentrant checkpointing) +
      get_peft_model; loss = model(input_ids, labels=labels).loss (full [B, T, V] logits, HF's way).

Each run is its own subprocess (`--child ours|hf`), so the peak resident set size belongs to one
implementation (VmHWM of the child's own address space; see _time_steps for why not ru_maxrss alone); runs
alternate ours, hf, ours, hf ... and the reported figures are medians over
the runs (tokens/s: median over all timed steps). transformers and peft are imported only in the hf child:
they are the `bench` extra, never an engine dependency.

CPU allocator (--allocator): the engine turns on PyTorch's THP_MEM_ALLOC_ENABLE (see engine/__init__.py), which
changes the peak resident set a lot and speed little. `same` (the default) gives both children the engine's
setting, so the memory ratio compares the implementations and nothing else; `default` turns it off on both
sides (glibc malloc as it comes); `ours-only` gives the HF child PyTorch's default, as a user of that stack
would run it. Each child gets the variable explicitly; the report records which.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine.memory import DTYPES, PROJECTIONS, Setup, build_model, fmt, random_batch, resolve_config
from model.load import EMBEDDED

REPO = Path(__file__).resolve().parents[1]


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


def _glibc_heap() -> dict | None:
    """glibc's own account (mallinfo2, glibc >= 2.33): heap_bytes, the arena space it holds from the OS;
    heap_free_bytes, how much of that is free (kept, not returned); mmapped_bytes, blocks mapped one by one.
    Shows how much of the resident set is allocator retention rather than live tensors. None without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    fn.restype = MallInfo2
    m = fn()
    return {"heap_bytes": m.arena, "heap_free_bytes": m.fordblks, "mmapped_bytes": m.hblkhd}


def compute_dtype(device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


# --------------------------------------------------------------------------------------------- the children
def run_ours(cfg, s: Setup, device: torch.device, steps: int, warmup: int, answer_frac: float, log,
             compile_blocks: bool = False) -> dict:
    from engine.memory import trainer_step

    model = build_model(cfg, s, device)
    if compile_blocks:
        # An experiment, not an engine feature: torch.compile each decoder block (TorchInductor) to see whether
        # it earns a place in the trainer. Compilation happens in the warmup step(s).
        for layer in model.model.layers:
            layer.compile()
    ids, labels = random_batch(cfg, s, device, answer_frac=answer_frac)
    step = trainer_step(model, s, device, {"input_ids": ids, "labels": labels})
    return _time_steps(step, device, steps, warmup, log)


def _hf_config(cfg):
    import transformers

    d = cfg.to_hf_dict()
    d.pop("extra", None)
    return transformers.LlamaConfig(**d)


def save_hf_checkpoint(cfg, path: Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """A random transformers Llama at cfg's shapes, saved once as the HF side's base checkpoint (the parent
    does this, so neither child pays for random init)."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(_hf_config(cfg)).to(dtype)
    hf.save_pretrained(path, safe_serialization=True)
    del hf
    return path


def run_hf(cfg, s: Setup, device: torch.device, steps: int, warmup: int, answer_frac: float, ckpt: Path,
           log) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    dtype = DTYPES[s.dtype]
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
    opt = torch.optim.AdamW(params, lr=2e-4, foreach=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ids, labels = random_batch(cfg, s, device, answer_frac=answer_frac)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _time_steps(step, device, steps, warmup, log)


def _time_steps(step, device: torch.device, steps: int, warmup: int, log) -> dict:
    # Peak RSS from the kernel's per-address-space high-water mark (VmHWM): exec starts it afresh, whereas
    # getrusage's ru_maxrss carries over the parent's peak from before the fork (Linux keeps the larger of
    # the two across exec), which would charge the bench parent's memory to the child.
    setup_hwm = _hwm_bytes()
    hwm_reset = _reset_hwm()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device)
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(float(step()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        log(f"  {'warmup' if i < warmup else 'step'} {i}: {dt:.2f} s ({dc:.2f} CPU s), loss {losses[-1]:.3f}")
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    train_hwm = _hwm_bytes() if hwm_reset else None
    heap = _glibc_heap() if device.type == "cpu" else None  # after the last step: what glibc keeps between steps
    peaks = [b for b in (setup_hwm, train_hwm) if b]
    # CPU seconds (all threads of this process): on a shared machine wall time depends on the neighbours'
    # load, CPU time much less so; both are reported.
    out = {"step_seconds": times, "step_cpu_seconds": cpu_times, "losses": losses,
           "peak_rss_bytes": max(peaks) if peaks else _peak_rss_bytes(),
           "ru_maxrss_bytes": _peak_rss_bytes(), "setup_peak_rss_bytes": setup_hwm, "train_peak_rss_bytes": train_hwm,
           "glibc_heap": heap}
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), static_allocated_bytes=static)
    return out


# ------------------------------------------------------------------------------------------------ the parent
ALLOCATOR_CHOICES = ("same", "default", "ours-only")


def child_env(allocator: str, which: str) -> dict:
    """The allocator variable each child runs with (engine/__init__.py's policy, or PyTorch's default)."""
    from engine import CPU_ALLOCATOR_ENV

    assert allocator in ALLOCATOR_CHOICES, allocator
    on = allocator == "same" or (allocator == "ours-only" and which == "ours")
    return {CPU_ALLOCATOR_ENV: "1" if on else "0"}


def _child_cmd(args, which: str, out: Path, ckpt: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "engine.bench", "--child", which, "--child-out", str(out),
           "--model-config", args.model_config, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--lora-r", str(args.lora_r), "--answer-frac", str(args.answer_frac), "--loss-chunk", str(args.loss_chunk)]
    if args.compile and which == "ours":
        cmd.append("--compile")
    if ckpt is not None:
        cmd += ["--hf-checkpoint", str(ckpt)]
    return cmd


def _summary(runs: list[dict], device: torch.device) -> dict:
    times = [t for r in runs for t in r["step_seconds"]]
    cpu = [t for r in runs for t in r.get("step_cpu_seconds", [])]
    out = {"runs": len(runs), "median_step_seconds": statistics.median(times),
           "median_step_cpu_seconds": statistics.median(cpu) if cpu else None,
           "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in runs))}
    heaps = [r["glibc_heap"] for r in runs if r.get("glibc_heap")]
    if heaps:
        out["glibc_heap"] = {k: int(statistics.median(h[k] for h in heaps)) for k in heaps[0]}
    train = [r["train_peak_rss_bytes"] for r in runs if r.get("train_peak_rss_bytes")]
    if train:
        out["train_peak_rss_bytes"] = int(statistics.median(train))
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


def parent(args) -> dict:
    device = torch.device(args.device)
    cfg = resolve_config(args.model_config)  # fail early on a bad --model-config
    tokens = args.seq_len * args.batch_size
    impls = ["ours"] + (["hf"] if args.vs == "hf" else [])
    results: dict[str, list] = {k: [] for k in impls}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ckpt = None
        if "hf" in impls:
            ckpt = Path(tmp) / "hf-random"
            print(f"saving a random HF checkpoint at {cfg.num_hidden_layers}×{cfg.hidden_size} shapes ...",
                  flush=True)
            save_hf_checkpoint(cfg, ckpt, DTYPES[compute_dtype(device)],
                               device="cuda" if device.type == "cuda" else "cpu")
        for rnd in range(args.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]  # alternate who goes first (thermal, page cache)
            for which in order:
                out = Path(tmp) / f"{which}-{rnd}.json"
                print(f"round {rnd + 1}/{args.rounds}: {which}", flush=True)
                proc = subprocess.run(_child_cmd(args, which, out, ckpt), cwd=REPO,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                           **child_env(args.allocator, which)})
                if proc.returncode != 0 or not out.exists():
                    raise RuntimeError(f"the {which} run failed (exit {proc.returncode}); see its output above")
                results[which].append(json.loads(out.read_text()))
    summary = {k: _summary(v, device) for k, v in results.items()}
    for v in summary.values():
        v["tokens_per_s"] = tokens / v["median_step_seconds"]
        v["tokens_per_cpu_s"] = tokens / v["median_step_cpu_seconds"] if v["median_step_cpu_seconds"] else None
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(device),
              "command": "python -m engine.bench " + " ".join(args.argv), "model_config": args.model_config,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "lora_r": args.lora_r,
              "answer_frac": args.answer_frac, "compile_ours": args.compile,
              "allocator": {k: child_env(args.allocator, k) for k in impls},
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "torch": torch.__version__, "results": summary, "raw": results}
    if "hf" in summary:
        o, h = summary["ours"], summary["hf"]
        report["ratios"] = {"tokens_per_s": o["tokens_per_s"] / h["tokens_per_s"],
                            "tokens_per_cpu_s": (o["tokens_per_cpu_s"] / h["tokens_per_cpu_s"]
                                                 if o["tokens_per_cpu_s"] and h["tokens_per_cpu_s"] else None),
                            "peak_rss": o["peak_rss_bytes"] / h["peak_rss_bytes"]}
        if "train_peak_rss_bytes" in o and "train_peak_rss_bytes" in h:
            report["ratios"]["train_peak_rss"] = o["train_peak_rss_bytes"] / h["train_peak_rss_bytes"]
        if device.type == "cuda":
            report["ratios"]["peak_allocated"] = o["peak_allocated_bytes"] / h["peak_allocated_bytes"]
    return report


def format_report(rep: dict) -> str:
    res = rep["results"]
    cuda = "peak_allocated_bytes" in res["ours"]
    heap = all("glibc_heap" in v for v in res.values())
    head = f"{'':<6} {'tokens/s':>10} {'step s':>8} {'tok/CPU-s':>10} {'peak RSS':>11} {'train RSS':>11}"
    head += f" {'heap':>11} {'heap free':>11}" if heap else ""
    head += f" {'peak alloc':>11} {'reserved':>11}" if cuda else ""
    lines = [f"{rep['date']} | {rep['device']} | {rep['model_config']} seq {rep['seq_len']} batch "
             f"{rep['batch_size']} | LoRA r{rep['lora_r']} NF4 | {rep['rounds']} rounds × {rep['steps']} steps"
             + (" | ours: torch.compile per block" if rep.get("compile_ours") else ""),
             "CPU allocator: " + ", ".join(f"{k} {' '.join(f'{e}={v}' for e, v in env.items())}"
                                          for k, env in rep.get("allocator", {}).items()),
             head]
    for k, v in res.items():
        tpc = f"{v['tokens_per_cpu_s']:.1f}" if v.get("tokens_per_cpu_s") else "-"
        line = (f"{k:<6} {v['tokens_per_s']:>10.1f} {v['median_step_seconds']:>8.2f} {tpc:>10} "
                f"{fmt(v['peak_rss_bytes']):>11} "
                f"{fmt(v['train_peak_rss_bytes']) if v.get('train_peak_rss_bytes') else '-':>11}")
        if heap:
            line += f" {fmt(v['glibc_heap']['heap_bytes']):>11} {fmt(v['glibc_heap']['heap_free_bytes']):>11}"
        if cuda:
            line += f" {fmt(v['peak_allocated_bytes']):>11} {fmt(v['peak_reserved_bytes']):>11}"
        lines.append(line)
    for k, v in rep.get("ratios", {}).items():
        if v is not None:
            lines.append(f"ours/hf {k}: {v:.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", default=EMBEDDED,
                   help="shapes: smollm2-135m, llama-3.2-3b, a config.json, an HF dir, a .gguf or a hub id")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="runs per implementation, alternating")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vs", choices=["hf", "none"], default="hf", help="reference to compare against")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--loss-chunk", type=int, default=1024, help="our loss chunk (rows per lm_head/CE chunk)")
    p.add_argument("--answer-frac", type=float, default=0.125,
                   help="fraction of each row that is supervised answer (completion-only labels)")
    p.add_argument("--allocator", choices=ALLOCATOR_CHOICES, default="same",
                   help="CPU allocator setting per side: same (both use the engine's THP_MEM_ALLOC_ENABLE=1), "
                        "default (both PyTorch's default), ours-only (the HF side as its users run it)")
    p.add_argument("--compile", action="store_true",
                   help="experiment: torch.compile each of our decoder blocks (not an engine feature; see "
                        "BENCHMARKS.md)")
    p.add_argument("--json", metavar="OUT", help="also write the full report (all step times) here")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--hf-checkpoint", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU visible to torch; use --device cpu")
        if args.seq_len < 2 or args.batch_size < 1 or args.steps < 1 or args.rounds < 1:
            raise ValueError("--seq-len must be >= 2, --batch-size, --steps and --rounds >= 1")
        if not 0 < args.answer_frac <= 1:
            raise ValueError("--answer-frac must be in (0, 1]")
        if args.child:
            device = torch.device(args.device)
            cfg = resolve_config(args.model_config)
            s = Setup(seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r, lora_targets=PROJECTIONS,
                      checkpointing=True, dtype=compute_dtype(device), loss_chunk=args.loss_chunk,
                      device=device.type)

            def log(msg):
                print(f"[{args.child}] {msg}", flush=True)

            if args.child == "ours":
                res = run_ours(cfg, s, device, args.steps, args.warmup, args.answer_frac, log, args.compile)
            else:
                res = run_hf(cfg, s, device, args.steps, args.warmup, args.answer_frac, Path(args.hf_checkpoint), log)
            res["setup"] = asdict(s)
            from engine import CPU_ALLOCATOR_ENV
            res["allocator_env"] = os.environ.get(CPU_ALLOCATOR_ENV)  # what this child really ran with
            Path(args.child_out).write_text(json.dumps(res))
            return 0
        rep = parent(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"engine.bench: error: {e}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
