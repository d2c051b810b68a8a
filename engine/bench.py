"""Side-by-side training-step benchmark: our engine against the stack users would otherwise pick
(transformers + peft + bitsandbytes), same shapes, same data, same device, alternating runs.

    python -m engine.bench --model smollm2-135m --seq-len 1024 --batch-size 2 --steps 3 --device cpu --vs hf
    python -m engine.bench --model llama-3.2-3b --seq-len 2048 --batch-size 2 --device cuda --vs hf

Both sides: NF4 base weights (blocksize 64), LoRA r on all seven projections (alpha 2r, no dropout), non-reentrant
activation checkpointing, completion-only labels (the last --answer-frac of each row), AdamW on the adapters,
--precision (auto: fp32 on the CPU, bf16 autocast on sm >= 80, fp16 below). Random weights: speed and memory
depend on shapes only.

ours: what the trainer trains and how: model.load.load_model(init="random") + engine.step.prepare_model, stepped
      by engine.step.TrainStep (CausalLMLoss: logits only at the supervised positions, chunked CE; Precision's
      clip and step), through engine.memory.training_model / trainer_step.
hf:   transformers LlamaForCausalLM from a random checkpoint saved once in the parent (model.hf_checkpoint),
      loaded with BitsAndBytesConfig(load_in_4bit, nf4) (bitsandbytes >= 0.46 runs its 4-bit layers on the CPU,
      so the same recipe works on both devices), peft.prepare_model_for_kbit_training (non-reentrant
      checkpointing) + get_peft_model; loss = model(input_ids, labels=labels).loss (full [B, T, V] logits).

Each run is its own subprocess (`--child ours|hf`), so the peak resident set size belongs to one
implementation (VmHWM of the child's own address space; see _time_steps for why not ru_maxrss alone); runs
alternate ours, hf, ours, hf ... and the reported figures are medians over the runs (tokens/s: median over all
timed steps). Both children inherit the engine's CPU allocator setting (engine/__init__.py). transformers and
peft are imported only in the hf child: they are the `bench` extra, never an engine dependency.
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

from engine.ledger import Setup, fmt
from engine.memory import add_run_flags, deprecated_alias, random_batch, trainer_step, training_model
from engine.precision import auto_mode, dtype_of
from model.hf_checkpoint import save_hf_checkpoint
from model.load import load_config, load_model
from model.lora import TARGETS

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


# --------------------------------------------------------------------------------------------- the children
def run_ours(cfg, s: Setup, device: torch.device, steps: int, warmup: int, answer_frac: float, log) -> dict:
    model = training_model(cfg, s, device)
    ids, labels = random_batch(cfg, s, device, answer_frac=answer_frac)
    step = trainer_step(model, s, device)
    batch = [{"input_ids": ids, "labels": labels}]
    return _time_steps(lambda i: step(batch, i).loss, device, steps, warmup, log)


def save_random_hf_checkpoint(cfg, path: Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """A random Llama at cfg's shapes (load_model's random init, full precision), saved once as the HF side's
    base checkpoint (the parent does this, so neither child pays for random init)."""
    model = load_model(cfg, init="random", dtype=dtype, device=device)
    path = save_hf_checkpoint(model, path)
    del model
    return path


def run_hf(cfg, s: Setup, device: torch.device, steps: int, warmup: int, answer_frac: float, ckpt: Path,
           log) -> dict:
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
    opt = torch.optim.AdamW(params, lr=2e-4, foreach=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ids, labels = random_batch(cfg, s, device, answer_frac=answer_frac)

    def step(i):
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
    """step(i) -> loss, for i in 0 .. warmup + steps - 1; times the last `steps`."""
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
        losses.append(float(step(i)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        log(f"  {'warmup' if i < warmup else 'step'} {i}: {dt:.2f} s ({dc:.2f} CPU s), loss {losses[-1]:.3f}")
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    train_hwm = _hwm_bytes() if hwm_reset else None
    peaks = [b for b in (setup_hwm, train_hwm) if b]
    # CPU seconds (all threads of this process): on a shared machine wall time depends on the neighbours'
    # load, CPU time much less so; both are reported.
    out = {"step_seconds": times, "step_cpu_seconds": cpu_times, "losses": losses,
           "peak_rss_bytes": max(peaks) if peaks else _peak_rss_bytes(),
           "ru_maxrss_bytes": _peak_rss_bytes(), "setup_peak_rss_bytes": setup_hwm, "train_peak_rss_bytes": train_hwm}
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), static_allocated_bytes=static)
    return out


# ------------------------------------------------------------------------------------------------ the parent
def _child_cmd(args, which: str, out: Path, ckpt: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "engine.bench", "--child", which, "--child-out", str(out),
           "--model", args.model, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--lora-r", str(args.lora_r), "--answer-frac", str(args.answer_frac), "--loss-chunk", str(args.loss_chunk),
           "--precision", args.precision]
    if ckpt is not None:
        cmd += ["--hf-checkpoint", str(ckpt)]
    return cmd


def _summary(runs: list[dict], device: torch.device) -> dict:
    times = [t for r in runs for t in r["step_seconds"]]
    cpu = [t for r in runs for t in r.get("step_cpu_seconds", [])]
    out = {"runs": len(runs), "median_step_seconds": statistics.median(times),
           "median_step_cpu_seconds": statistics.median(cpu) if cpu else None,
           "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in runs))}
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
    cfg = load_config(args.model)  # fail early on a bad --model
    tokens = args.seq_len * args.batch_size
    impls = ["ours"] + (["hf"] if args.vs == "hf" else [])
    results: dict[str, list] = {k: [] for k in impls}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ckpt = None
        if "hf" in impls:
            ckpt = Path(tmp) / "hf-random"
            print(f"saving a random HF checkpoint at {cfg.num_hidden_layers}×{cfg.hidden_size} shapes ...",
                  flush=True)
            save_random_hf_checkpoint(cfg, ckpt, dtype_of(_precision(args, device)), device=device.type)
        for rnd in range(args.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]  # alternate who goes first (thermal, page cache)
            for which in order:
                out = Path(tmp) / f"{which}-{rnd}.json"
                print(f"round {rnd + 1}/{args.rounds}: {which}", flush=True)
                proc = subprocess.run(_child_cmd(args, which, out, ckpt), cwd=REPO,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode != 0 or not out.exists():
                    raise RuntimeError(f"the {which} run failed (exit {proc.returncode}); see its output above")
                results[which].append(json.loads(out.read_text()))
    summary = {k: _summary(v, device) for k, v in results.items()}
    for v in summary.values():
        v["tokens_per_s"] = tokens / v["median_step_seconds"]
        v["tokens_per_cpu_s"] = tokens / v["median_step_cpu_seconds"] if v["median_step_cpu_seconds"] else None
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(device),
              "command": "python -m engine.bench " + " ".join(args.argv), "model": args.model,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "lora_r": args.lora_r,
              "answer_frac": args.answer_frac, "precision": _precision(args, device),
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "torch": torch.__version__, "results": summary, "raw": results}
    if "hf" in summary:
        report["ratios"] = _ratios(summary["ours"], summary["hf"], device)
    return report


def _ratios(o: dict, h: dict, device: torch.device) -> dict:
    out = {"tokens_per_s": o["tokens_per_s"] / h["tokens_per_s"],
           "tokens_per_cpu_s": (o["tokens_per_cpu_s"] / h["tokens_per_cpu_s"]
                                if o["tokens_per_cpu_s"] and h["tokens_per_cpu_s"] else None),
           "peak_rss": o["peak_rss_bytes"] / h["peak_rss_bytes"]}
    if "train_peak_rss_bytes" in o and "train_peak_rss_bytes" in h:
        out["train_peak_rss"] = o["train_peak_rss_bytes"] / h["train_peak_rss_bytes"]
    if device.type == "cuda":
        out["peak_allocated"] = o["peak_allocated_bytes"] / h["peak_allocated_bytes"]
    return out


def format_report(rep: dict) -> str:
    res = rep["results"]
    cuda = "peak_allocated_bytes" in res["ours"]
    head = f"{'':<6} {'tokens/s':>10} {'step s':>8} {'tok/CPU-s':>10} {'peak RSS':>11} {'train RSS':>11}"
    head += f" {'peak alloc':>11} {'reserved':>11}" if cuda else ""
    lines = [f"{rep['date']} | {rep['device']} | {rep['model']} seq {rep['seq_len']} batch "
             f"{rep['batch_size']} | LoRA r{rep['lora_r']} NF4 {rep['precision']} | {rep['rounds']} rounds × "
             f"{rep['steps']} steps", head]
    for k, v in res.items():
        tpc = f"{v['tokens_per_cpu_s']:.1f}" if v.get("tokens_per_cpu_s") else "-"
        line = (f"{k:<6} {v['tokens_per_s']:>10.1f} {v['median_step_seconds']:>8.2f} {tpc:>10} "
                f"{fmt(v['peak_rss_bytes']):>11} "
                f"{fmt(v['train_peak_rss_bytes']) if v.get('train_peak_rss_bytes') else '-':>11}")
        if cuda:
            line += f" {fmt(v['peak_allocated_bytes']):>11} {fmt(v['peak_reserved_bytes']):>11}"
        lines.append(line)
    for k, v in rep.get("ratios", {}).items():
        if v is not None:
            lines.append(f"ours/hf {k}: {v:.2f}")
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
    p.add_argument("--json", metavar="OUT", help="also write the full report (all step times) here")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--hf-checkpoint", help=argparse.SUPPRESS)
    return p


def _precision(args, device: torch.device) -> str:
    return auto_mode(device) if args.precision == "auto" else args.precision


def _child(args) -> int:
    device = torch.device(args.device)
    cfg = load_config(args.model)
    s = Setup(seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r, lora_targets=TARGETS,
              checkpointing=True, precision=_precision(args, device), loss_chunk=args.loss_chunk,
              device=device.type)

    def log(msg):
        print(f"[{args.child}] {msg}", flush=True)

    if args.child == "ours":
        res = run_ours(cfg, s, device, args.steps, args.warmup, args.answer_frac, log)
    else:
        res = run_hf(cfg, s, device, args.steps, args.warmup, args.answer_frac, Path(args.hf_checkpoint), log)
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
        if not 0 < args.answer_frac <= 1:
            raise ValueError("--answer-frac must be in (0, 1]")
        if args.child:
            return _child(args)
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
