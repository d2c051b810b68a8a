"""The memory ledger, measured: real bytes beside engine/ledger.py's prediction, and the command line.

    python -m engine.memory --model llama-3.2-3b --seq-len 2048 --batch-size 2
    python -m engine.memory --model path/to/config.json --seq-len 32768 --batch-size 1 --offload
    python -m engine.memory --model smollm2-135m --seq-len 256 --batch-size 2 --measure   # runs real steps
    python -m engine.memory --model llama-3.2-3b --seq-len 2048 --batch-size 1 --budget 15GiB   # what fits
    python -m engine.memory --model llama-3.2-3b --seq-len 2048 --batch-size 1 --offload --budget 15GiB \
        --host-budget 24GiB --nproc 2   # what fits the card and, for two processes' offloaded inputs, the RAM
    python -m engine.memory --config configs/llama3_2_3b_acord_t4x2.toml --model llama-3.2-3b --capability 7.5

The flags are engine.train's for the same knobs; --config takes them from a training recipe (flags override it).
`--measure` builds the model the trainer would train (model.load.load_model with init="random", then
engine.step.prepare_model) and runs the trainer's own step
(engine.step.TrainStep): on a GPU it reports peak allocated/reserved memory, on the CPU the resident and
saved-tensor bytes. The arithmetic behind the predicted column is engine/ledger.py.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import typing
from dataclasses import asdict, replace
from fractions import Fraction

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.budget import fit, fit_grid, fits, on_card, on_host
from engine.cli import CliParser
from engine.config import FIELDS, ConfigError, TrainConfig, read_toml, typed_value
from engine.ledger import ALLOCATOR_SLACK, HIGH_PRECISION_ROWS, Ledger, Setup, describe, fmt, format_table, predict
from engine.loss import CausalLMLoss, chunked_ce_sum
from engine.precision import MODES, Precision, auto_mode, dtype_of
from engine.step import TrainStep, check_device_tools, make_optimizer, prepare_model
from model.config import PRESETS
from model.load import EMBEDDED, load_config, load_model
from model.lora import TARGETS
from model.quant import Linear4bit


# --------------------------------------------------------------------------------------------- measuring
def saved_tensor_bytes(fn, exclude=()) -> tuple[object, dict]:
    """Run fn() under saved-tensor hooks; -> (fn's result, {device_type: bytes}) counting each storage once and
    skipping storages in `exclude` (parameters and buffers, which are already resident)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = (t.device.type, st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    by_dev: dict = {}
    for dev, b in seen.values():
        by_dev[dev] = by_dev.get(dev, 0) + b
    return out, by_dev


@contextlib.contextmanager
def _kineto_quiet():
    """The profiler's C++ side (kineto) prints 'USDT: ... profiler_start/stop' lines to stderr on every use:
    route file descriptor 2 to a temporary file meanwhile and pass on every other line afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not line.startswith(("USDT:", "STAGE:")):
                    print(line, file=sys.stderr)


def peak_allocated_bytes(fn) -> tuple[object, int]:
    """Run fn() and return (its result, the most CPU memory it held at once above what was held when it began):
    torch.cuda.max_memory_allocated for the CPU, from the profiler's record of every CPU allocation and free
    (profile_memory). CPU tensors only; the ledger's transient rows are checked with it at small shapes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e[0])  # stable: same-instant events keep the recorded order
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return out, peak


# ------------------------------------------------------------------------------ what is alive at the peak
REPO_DIRS = ("model/", "engine/", "data/")


def _peak_replay(events):
    """events: (key, +bytes | -bytes) in time order, key = the block. -> (peak above the start, {key: bytes} alive
    at that moment). Two passes: find the peak's index, then replay up to it."""
    held = peak = 0
    at = -1
    for i, (_, b) in enumerate(events):
        held += b
        if held > peak:
            peak, at = held, i
    live: dict = {}
    for key, b in events[:at + 1]:
        if b > 0:
            live[key] = b
        else:
            live.pop(key, None)
    return peak, live


def attribute_peak(fn, device) -> tuple[int, list[tuple[str, int, int]]]:
    """Run fn() once and say what was alive at its peak: -> (peak bytes above the start, [(site, bytes, count)]
    largest first). A site is the innermost frame of this repository that allocated the block (file, function)
    and, on the CPU, the torch op under it. CPU: the profiler's allocation records with Python stacks; CUDA: the
    caching allocator's history (torch.cuda.memory._record_memory_history), kept in memory, never written or
    unpickled. Blocks allocated before fn() that it frees count as negative and are not listed."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        try:
            fn()
            torch.cuda.synchronize()
            trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        events, sites = cuda_trace_events(trace)
    else:
        from torch.profiler import ProfilerActivity, profile

        with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
            fn()
        kinds = torch._C._profiler._EventType
        found = []

        def walk(ev, stack):
            if ev.tag == kinds.Allocation:
                found.append((ev.start_time_ns, ev.extra_fields.ptr, ev.extra_fields.alloc_size, stack))
            for child in ev.children:
                walk(child, stack + [ev])

        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root, [])
        found.sort(key=lambda a: a[0])
        events, sites = _keyed((ptr, size, _cpu_site(stack, kinds) if size > 0 else None)
                               for _, ptr, size, stack in found)
    return attribution(events, sites)


def _keyed(records) -> tuple[list, dict]:
    """records: (address, +bytes and the allocating site | -bytes and None) in time order -> attribution's
    events and sites. An address is reused once freed, so each allocation is keyed by its own number and each
    free (which names the address only) by the allocation alive at that address (None: a block from before)."""
    events, sites, alive = [], {}, {}
    for addr, size, site in records:
        if size > 0:
            n = len(sites)
            sites[n], alive[addr] = site, n
            events.append((n, size))
        else:
            events.append((alive.pop(addr, None), size))
    return events, sites


def attribution(events: list, sites: dict) -> tuple[int, list[tuple[str, int, int]]]:
    """(peak above the start, [(site, bytes, count)] alive at the peak, largest first) from attribute_peak's
    events and the allocations' sites."""
    peak, live = _peak_replay(events)
    groups: dict = {}
    for key, b in live.items():
        site = sites.get(key, "(before the step)")
        total, count = groups.get(site, (0, 0))
        groups[site] = (total + b, count + 1)
    return peak, sorted(((k, b, c) for k, (b, c) in groups.items()), key=lambda g: -g[1])


def cuda_trace_events(trace: list[dict]) -> tuple[list, dict]:
    """The caching allocator's history (its TraceEntry dicts: action, addr, size, frames of filename / line /
    name) as attribute_peak's events and each allocation's site: the innermost frame of this repository. A block
    counts as freed at "free_completed" (when the allocator may hand it out again); segment and snapshot entries
    are not tensors."""
    def site(e):
        frame = next((f for f in e.get("frames", []) if _in_repo(f["filename"])), None)
        return f"{_rel(frame['filename'])}:{frame['line']} {frame['name']}" if frame else "(outside this repository)"

    return _keyed((e["addr"], e["size"], site(e)) if e["action"] == "alloc" else (e["addr"], -e["size"], None)
                  for e in trace if e["action"] in ("alloc", "free_completed"))


def _in_repo(filename: str) -> bool:
    return any(f"/{d}" in filename.replace("\\", "/") for d in REPO_DIRS) and "site-packages" not in filename


def _rel(filename: str) -> str:
    f = filename.replace("\\", "/")
    i = max(f.rfind("/" + d) for d in REPO_DIRS)
    return f[i + 1:]


def _cpu_site(stack, kinds) -> str:
    """The innermost repository frame of a CPU allocation's stack and the first torch op called under it."""
    idx = next((i for i in range(len(stack) - 1, -1, -1)
                if stack[i].tag == kinds.PyCall and stack[i].name.startswith(REPO_DIRS)), None)
    below = stack[idx + 1:] if idx is not None else stack
    op = next((e.name for e in below if e.tag == kinds.TorchOp), "?")
    if idx is None:
        return f"(outside this repository) {op}"
    name = stack[idx].name  # "model/llama.py(265): backward": the function's first line
    path, func = name.split("(")[0], name.split(": ", 1)[-1]
    return f"{path} {func} [{op}]"


def warm_step(model, s: Setup, device, ids, labels, seg=None):
    """The trainer's step on this batch, run once (the optimizer state exists, the gradients are freed, as
    between training steps): -> (the step, a callable that runs the next one)."""
    step = trainer_step(model, s, device)
    batch = {"input_ids": ids, "labels": labels}
    if seg is not None:
        batch["segment_ids"] = seg
    step([batch], 0)
    model.zero_grad(set_to_none=True)
    return step, lambda: step([batch], 1)


def attribute_step(cfg, s: Setup, device) -> tuple[int, list]:
    """attribute_peak for one trainer step at s's shapes, after one step run before it (warm_step)."""
    model = training_model(cfg, s, device)
    ids, labels = random_batch(cfg, s, device)
    with sdpa_kernels(s):
        _, next_step = warm_step(model, s, device, ids, labels, packed_segments(s).to(device) if s.pack else None)
        return attribute_peak(next_step, device)


def format_attribution(peak: int, groups: list, top: int = 20) -> str:
    lines = [f"alive at the peak of one step ({fmt(peak)} above what was held before it), by the code that "
             "allocated it:"]
    for site, b, c in groups[:top]:
        lines.append(f"  {fmt(b):>11}  ×{c:<4} {site}")
    rest = groups[top:]
    if rest:
        lines.append(f"  {fmt(sum(b for _, b, _ in rest)):>11}  in {len(rest)} more sites")
    return "\n".join(lines)


def module_bytes(model: torch.nn.Module) -> dict:
    """Resident parameter/buffer bytes in four groups (resident_rows with the high-precision rows summed)."""
    rows = resident_rows(model)
    hp = sum(rows.get(k, 0) for k in HIGH_PRECISION_ROWS)
    return {"quantized weights: packed NF4": rows.get("quantized weights: packed NF4", 0),
            "quantized weights: quant state": rows.get("quantized weights: quant state", 0),
            "LoRA parameters": rows.get("LoRA parameters", 0), "high-precision weights": hp}


def resident_rows(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Resident bytes measured on the real model, keyed by the ledger's static row names (each storage once):
    the model's parameters and buffers by module type, the LoRA gradients when backward has run, and the
    optimizer's state when it has stepped."""
    seen: set = set()

    def nbytes(t) -> int:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.device.type == "meta":
            return 0
        seen.add(ptr)
        return t.untyped_storage().nbytes()

    out: dict = {}

    def add(row, b):
        out[row] = out.get(row, 0) + b

    for name, mod in model.named_modules():
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if isinstance(mod, Linear4bit):
                row = "quantized weights: packed NF4" if pname == "weight" else "quantized weights: quant state"
            elif isinstance(t, torch.nn.Parameter) and t.requires_grad:
                row = "LoRA parameters"
            elif isinstance(mod, torch.nn.Embedding):
                row = "embeddings"
            elif name.endswith("lm_head"):
                row = "lm_head"  # untied; a tied head shares the embedding's storage and counts there
            elif "norm" in name.split(".")[-1]:
                row = "norms"
            else:
                row = "projection weights (not quantized)"
            add(row, nbytes(t))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        out["LoRA gradients"] = sum(nbytes(g) for g in grads)
    if optimizer is not None and optimizer.state:
        out["optimizer state"] = sum(nbytes(t) for st in optimizer.state.values() for t in st.values()
                                     if torch.is_tensor(t))
    return {k: v for k, v in out.items() if v}




def training_model(cfg, s: Setup, device="cpu", seed: int = 0):
    """The model the trainer would train at cfg's shapes, with seeded random weights: load_model's one builder
    (init="random": meta device, projections quantized one at a time on `device`) and the trainer's own
    prepare_model (LoRA, checkpointing). Random values: memory and speed depend on shapes only."""
    model = load_model(cfg, init="random", seed=seed, dtype=dtype_of(s.precision), device=device,
                       quantize=s.quantize, double_quant=s.double_quant)
    torch.manual_seed(seed)  # the LoRA init, as dist.seed_all makes it in the trainer
    return prepare_model(model, s.to_config(), device)


def random_batch(cfg, s: Setup, device="cpu", seed: int = 0, answer_frac: float | None = None):
    """(input_ids, labels): random tokens; labels cover the last `answer_frac` of each row (completion-only),
    or exactly s.supervised positions in all when set."""
    g = torch.Generator().manual_seed(seed)
    B, T = s.batch_size, s.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.full((B, T), -100, dtype=torch.long)
    if answer_frac is None:
        per_row = math.ceil(s.rows / B) if s.rows else 0
    else:
        per_row = max(1, int(T * answer_frac))
    per_row = min(per_row, T - 1)
    if per_row:
        labels[:, T - per_row:] = ids[:, T - per_row:]
    return ids.to(device), labels.to(device)




def measure_cpu(cfg, s: Setup) -> dict:
    """Resident parameter/buffer bytes and saved-activation bytes of one real forward (through engine/loss.py,
    under autocast when the precision is not fp32) on the CPU, in the ledger's row names, and the peak of a
    trainer step; the SDPA kernel s.sdpa names (sdpa_kernels). Builds the model: for small models."""
    with sdpa_kernels(s):
        return _measure_cpu(cfg, s)


def _measure_cpu(cfg, s: Setup) -> dict:
    s_cpu = replace(s, device="cpu")
    model = training_model(cfg, s_cpu, "cpu")
    ids, labels = random_batch(cfg, s_cpu)
    seg = packed_segments(s) if s.pack else None
    resident = list(model.parameters()) + list(model.buffers())
    dtype = dtype_of(s.precision)

    def fwd():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            h = model.hidden(ids, segment_ids=seg)
            return chunked_ce_sum(h, labels, model.lm_head, s.loss_chunk)

    loss, saved = saved_tensor_bytes(fwd, exclude=resident)
    opt = None
    if loss.requires_grad:
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(s.to_config(), params, torch.device("cpu"))
        opt.step()  # creates the optimizer state the ledger counts
    got = module_bytes(model)
    rows = resident_rows(model, opt)
    got.update(rows)
    got["total saved"] = saved.get("cpu", 0)
    got["total static"] = sum(rows.values())
    got.setdefault("LoRA gradients", 0)
    if loss.requires_grad:
        got["peak allocated"] = cpu_step_peak(model, s_cpu, ids, labels, seg)
    return got


def cpu_step_peak(model, s: Setup, ids, labels, seg=None) -> int:
    """The peak bytes of a trainer step on the CPU, as torch.cuda.max_memory_allocated would count them on a GPU:
    what is resident when the step begins (weights, adapters, optimizer state, from one step run before; the
    gradients are freed by the step's zero_grad) plus the most the step holds above that."""
    step, next_step = warm_step(model, s, "cpu", ids, labels, seg)
    resident = sum(b for k, b in resident_rows(model, step.optimizer).items() if k != "LoRA gradients")
    _, above = peak_allocated_bytes(next_step)
    return resident + above


def packed_segments(s: Setup) -> torch.Tensor:
    """segment ids (B, T) for a packed row of two samples: the first third, then the rest."""
    seg = torch.ones(s.batch_size, s.seq_len, dtype=torch.long)
    seg[:, s.seq_len // 3:] = 2
    return seg


def trainer_step(model, s: Setup, device) -> TrainStep:
    """engine/train.py's step for this setup (CausalLMLoss, forward_backward's loss scaling, Precision's
    autocast / clip / step, the trainer's optimizer)."""
    device = torch.device(device)
    return TrainStep.for_config(s.to_config(), CausalLMLoss(model, s.loss_chunk), Precision(s.precision, device),
                                device)


def measure_cuda(cfg, s: Setup, steps: int = 3, log=print) -> dict:
    """Real training steps at real shapes on the GPU: random weights quantized on the GPU, the trainer's own
    step. Returns peak allocated/reserved and the resident bytes as measured."""
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = training_model(cfg, s, dev)
    torch.cuda.synchronize()
    got = module_bytes(model)
    ids, labels = random_batch(cfg, s, dev)
    batch = {"input_ids": ids, "labels": labels}
    if s.pack:
        batch["segment_ids"] = packed_segments(s).to(dev)
    step = trainer_step(model, s, dev)
    times, peaks, reserved = [], [], []
    with sdpa_kernels(s):
        for i in range(steps):
            torch.cuda.reset_peak_memory_stats()  # each step's own peak: the first also builds the optimizer state
            t0 = time.perf_counter()  # and, with --compile, compiles (inductor's autotuning allocates too)
            loss = step([batch], i).loss
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated())
            reserved.append(torch.cuda.max_memory_reserved())
            log(f"step {i}: loss {loss:.3f}, {times[-1] * 1000:.0f} ms, peak allocated {fmt(peaks[-1])}")
    steady = slice(1, None) if steps > 1 else slice(None)  # the ledger predicts a steady step: after the first
    rows = resident_rows(model, step.optimizer)  # weights, adapters and optimizer state, by ledger row
    rows["LoRA gradients"] = step.grad_bytes  # as they were between backward and the optimizer step
    got.update(rows)
    got["total static"] = sum(rows.values())
    got["peak allocated"] = max(peaks[steady])
    got["peak reserved"] = max(reserved[steady])
    got["first step peak allocated"] = peaks[0]
    got["step seconds"] = sorted(times[steady])[len(times[steady]) // 2]
    return got


# ------------------------------------------------------------------------------------------ trainer hook
def log_ledger(model, cfg: TrainConfig, precision: str, device: str, log=print, supervised: int | None = None,
               what: str = "") -> Ledger:
    """Called by the trainers once after setup: prints the predicted breakdown for the run's shapes beside the
    resident bytes actually held by the model. supervised: the rows' supervised tokens (default: every position,
    the worst case); what: says which row the shapes are (engine.channel_train: its longest). Returns the
    ledger."""
    s = Setup.from_config(cfg, precision=precision, device=device, model=model,
                          **({} if supervised is None else {"supervised": supervised}))
    led = predict(model.config, s)
    measured = resident_rows(model)  # at setup: weights and adapters (grads and optimizer state come with step 1)
    log(format_table(led, measured, title=f"memory ledger{' ' + what if what else ''}: " + describe(model.config, s)))
    return led


# ------------------------------------------------------------------------------------------------ budget
SIZE_FORMS = "e.g. 15GiB, 16GB, 15.5GiB, 800MiB or a byte count"
SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
              "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str, flag: str = "--budget") -> int:
    """Bytes from '15GiB' (powers of 1024), '16GB' (powers of 1000: what card vendors print), '15.5GiB', '800MiB'
    or a plain count; units case-insensitive. ValueError naming `flag` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = SIZE_UNITS.get(m.group(2).lower()) if m else None
    size = int(Fraction(m.group(1)) * unit) if unit else 0  # Fraction: 15.5GiB is exact, no float rounding
    if size < 1:
        raise ValueError(f"{flag}: {text!r} is not a memory size ({SIZE_FORMS})")
    return size


def budget_answers(cfg, s: Setup, budget: int, host_budget: int | None = None, nproc: int = 1) -> dict:
    """--budget's answers: for seq_len (at s's batch size) and batch_size (at s's sequence length), the largest
    value that fits the card (and `host_budget`, for `nproc` processes, when given; None when nothing fits) with
    the bytes at it and at the next step up, so the margin shows."""
    out = {}
    for what in ("seq_len", "batch_size"):
        step, top = fit_grid(cfg, what)
        value = fit(cfg, s, budget, what, host_budget=host_budget, nproc=nproc)
        first = value or step  # nothing fits: show what the smallest step needs
        nxt = first + step if value is not None and first + step <= top else None
        at = [budget_point(cfg, replace(s, **{what: v}), budget, what, host_budget, nproc) if v else None
              for v in (first, nxt)]
        out[what] = {"value": value, "step": step, "limit": top, "at": at[0], "next": at[1]}
    return out


def budget_point(cfg, s: Setup, budget: int, what: str, host_budget: int | None = None, nproc: int = 1) -> dict:
    led = predict(cfg, s)
    return {what: getattr(s, what), "peak_allocated_bytes": led.peak, "on_card_bytes": on_card(led),
            "host_bytes_per_process": on_host(led), "host_bytes": nproc * on_host(led),
            "fits": fits(led, budget, host_budget, nproc)}


def _margin(budget: int, used: int) -> str:
    return f"{fmt(budget - used)} to spare" if used <= budget else f"over by {fmt(used - budget)}"


def format_budget(answers: dict, s: Setup, budget: int, title: str, host_budget: int | None = None,
                  nproc: int = 1) -> str:
    cuda = s.device == "cuda"
    compared = (f"peak allocated + CUDA context + {ALLOCATOR_SLACK:.0%} allocator slack (what nvidia-smi would show)"
                if cuda else "peak allocated (no CUDA context or allocator slack off CUDA)")
    where = "on the card" if cuda else "in memory"
    procs = f"{nproc} process{'es' if nproc > 1 else ''}"
    lines = [title, f"budget {fmt(budget)} ({budget:,} bytes), compared with the predicted {compared}"]
    if host_budget is not None:
        lines.append(f"host budget {fmt(host_budget)} ({host_budget:,} bytes) for {procs}, compared with the "
                     "offloaded block inputs kept in host RAM (not the processes themselves, their libraries "
                     "or the data)" + ("" if answers["seq_len"]["at"]["host_bytes"] else
                                      ": nothing is offloaded without --offload on a GPU, so it limits nothing"))
    for what, label, fixed in (("seq_len", "longest sequence at batch", s.batch_size),
                               ("batch_size", "largest batch at sequence", s.seq_len)):
        a = answers[what]
        unit = "tokens" if what == "seq_len" else "rows"
        head = f"{label} {fixed}: " + (f"{a['value']} {unit}" if a["value"] else "none fits")
        head += f" (steps of {a['step']}, model limit {a['limit']})" if what == "seq_len" else ""
        host = a["at"]["host_bytes_per_process"]
        if a["value"] and host and host_budget is None:  # offload: the answer's other cost, said beside it
            head += (f"; its offloaded block inputs need {fmt(host)} of host RAM per process"
                     + (f", {fmt(nproc * host)} for {procs}" if nproc > 1 else "")
                     + " (--host-budget SIZE limits the answer to the RAM you have)")
        lines.append(head)
        for p in (a["at"], a["next"]):
            if p is not None:
                line = (f"  {what.split('_')[0]} {p[what]:>6}: peak allocated {fmt(p['peak_allocated_bytes'])}, "
                        f"{where} {fmt(p['on_card_bytes'])} ({_margin(budget, p['on_card_bytes'])})")
                if p["host_bytes_per_process"]:
                    line += f"; host RAM {fmt(p['host_bytes_per_process'])} per process"
                    if nproc > 1 or host_budget is not None:
                        line += f", {fmt(p['host_bytes'])} for {procs}"
                    if host_budget is not None:
                        line += f" ({_margin(host_budget, p['host_bytes'])})"
                lines.append(line)
        if a["value"] and a["next"] is None:
            lines.append(f"  (the next step would pass the {'model' if what == 'seq_len' else 'search'} limit)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
class _Deprecated(argparse.Action):
    """An old spelling of a flag: works as the new one for one release, with a one-line notice on stderr."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated, use {self.new} (the old spelling goes in the next "
              "release)", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kw):
    """Accept `old` as a hidden synonym of `new` (same dest); kw as for add_argument (nargs=0, const=... for
    a switch)."""
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS, **kw)


def add_run_flags(p: argparse.ArgumentParser, *, seq_len=None, batch_size=None):
    """The flags engine.memory and engine.bench share with engine.train (same names, same meaning)."""
    p.add_argument("--model", default=EMBEDDED,
                   help=f"config source: {', '.join(PRESETS)}, a config.json, an HF dir, a .gguf or a hub id")
    p.add_argument("--seq-len", type=int, required=seq_len is None, default=seq_len, help="tokens per row")
    p.add_argument("--batch-size", type=int, required=batch_size is None, default=batch_size,
                   help="rows per micro-batch")
    p.add_argument("--lora-r", type=int, default=FIELDS["lora_r"].default, help="LoRA rank")
    p.add_argument("--loss-chunk", type=int, default=FIELDS["loss_chunk"].default,
                   help="supervised tokens per lm_head/cross-entropy chunk")
    p.add_argument("--precision", choices=MODES, default="auto",
                   help="compute dtype (auto: bf16 on sm >= 80, fp16 below, fp32 on the CPU)")
    deprecated_alias(p, "--dtype", "--precision", "precision", choices=MODES)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m engine.memory",
                  description="Predict (and optionally measure) the memory of a QLoRA training step.")
    p.add_argument("--config", metavar="RECIPE.toml",
                   help="a training recipe (engine.train's TOML, or engine.channel_train's): the knobs below that it "
                        "sets become this command's defaults, the ones it leaves out take engine.train's defaults "
                        "(checkpointing off, pack on, dropout 0), so the prediction is that run's; flags given "
                        "here override the file, as with engine.train --config. A channel recipe's micro-batch is one "
                        "packed row as long as its data makes it: give its --seq-len")
    add_run_flags(p)
    p.add_argument("--lora-targets", default=",".join(TARGETS), help="comma-separated projections")
    p.add_argument("--lora-dropout", type=float, default=FIELDS["lora_dropout"].default, metavar="P",
                   help="dropout on the LoRA inputs (engine.train --lora-dropout): with P > 0 each adapter keeps its "
                        "own dropped copy of its input and a mask for backward")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="per-block activation checkpointing (default on)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=False,
                   help="checkpointed block inputs kept in host memory")
    p.add_argument("--mlp-tile", type=int, default=0, metavar="N",
                   help="tokens per MLP tile (engine.train --mlp-tile; 0 = whole micro-batch): bounds the MLP's "
                        "[tokens, intermediate] tensors at long context")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each decoder block around its attention (engine.train --compile): the "
                        "blocks' norm and SwiGLU backwards become fused kernels without fp32 temporaries; "
                        "--measure runs the compiled step (inductor: needs a C++ compiler on the CPU)")
    p.add_argument("--optimizer", choices=FIELDS["optimizer"].metadata["choices"], default="adamw")
    p.add_argument("--quantize", choices=FIELDS["quantize"].metadata["choices"], default="nf4")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=False,
                   help="NF4 double quantisation of the block scales")
    p.add_argument("--supervised", type=int, default=None,
                   help="supervised positions per micro-batch (default: all, the worst case)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                   help="packed rows (one causal SDPA call per example, no (T, T) mask: model.llama.attention_path)")
    deprecated_alias(p, "--packed", "--pack", "pack", nargs=0, const=True)
    p.add_argument("--sdpa", choices=["auto", "flash", "efficient", "math"], default="auto",
                   help="SDPA kernel to predict for, and --measure runs it (torch.nn.attention.sdpa_kernel); auto: "
                        "model.llama.attention_path's choice (GPUs before sm 80, and masked rows on CUDA, get k/v "
                        "copied to every head and the memory-efficient kernel, never math; on the CPU masked rows "
                        "keep grouped k/v where torch's flash kernel takes them, as torch 2.13's does). flash needs "
                        "sm 80 on CUDA; the CPU has flash and math. math: the ledger counts its saved (B, heads, T, "
                        "T) probabilities, not its backward's working set (on the CPU --measure found up to 2.5x "
                        "the prediction)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device the prediction is for")
    p.add_argument("--capability", metavar="MAJOR.MINOR", help="CUDA compute capability to predict for, e.g. 7.5 "
                   "for a T4 (no flash attention: k/v copied to every head); default: the visible GPU's, else 8.0")
    p.add_argument("--measure", action="store_true",
                   help="also measure: real steps at these shapes on CUDA; on the CPU resident and saved bytes and "
                        "the peak held during a trainer step (engine.memory.peak_allocated_bytes)")
    p.add_argument("--steps", type=int, default=3, help="steps for --measure on CUDA")
    p.add_argument("--attribute", action="store_true",
                   help="with --measure: one more step, and what was alive at its peak, grouped by the code that "
                        "allocated it (CPU: the profiler; CUDA: the allocator's history)")
    p.add_argument("--budget", metavar="SIZE",
                   help=f"GPU memory to fit in ({SIZE_FORMS}): prints the longest sequence at --batch-size and the "
                        "largest batch at --seq-len whose predicted peak + CUDA context + allocator slack fits, and "
                        "with --offload the host RAM each answer's offloaded block inputs take")
    p.add_argument("--host-budget", metavar="SIZE",
                   help="with --budget and --offload: host RAM the offloaded block inputs of --nproc processes may "
                        "take (same forms as --budget); the answers then fit both. Counts those inputs only, not "
                        "the processes themselves")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes on the machine (./launch.sh --nproc N: one per GPU), each with its own block "
                        "inputs in host RAM under --offload: --budget's host figures and --host-budget count all N")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


# TrainConfig fields a recipe sets that are engine.memory flags too (same names): the knobs that change bytes
RECIPE_KNOBS = ("model", "seq_len", "batch_size", "lora_r", "lora_targets", "lora_dropout", "loss_chunk", "precision",
                "checkpointing", "offload", "mlp_tile", "compile", "optimizer", "quantize", "double_quant", "pack",
                "device")


def recipe_defaults(path) -> dict:
    """engine.memory's flag defaults from a training recipe: each RECIPE_KNOBS key as the file sets it, else as
    engine.train would run it (TrainConfig's default: a recipe that says nothing of checkpointing trains without
    it), or for an engine.channel_train recipe as that command runs it: one packed row per micro-batch, seq_len
    None (the data decides it: the command line must give it). Other keys of engine.train's recipes (lr, data,
    ...) or of engine.channel_train's (unit, ...) change no byte and are passed over; any other key, a wrong type
    or choice is ConfigError naming the file and the key (engine.config's reader and checks)."""
    from engine.channel_train import build_parser as channel_parser  # it imports this module: not at the top

    hints = typing.get_type_hints(TrainConfig)
    run = TrainConfig()
    out = {k: getattr(run, k) for k in RECIPE_KNOBS}
    channel = {a.dest: a.default for a in channel_parser()._actions if a.option_strings}
    given, channel_only = set(), False
    for key, value in read_toml(path).items():
        if key in FIELDS:
            value = typed_value(str(path), key, value, hints[key], FIELDS[key].metadata.get("choices"))
            if key in out:
                out[key] = value
                given.add(key)
            continue
        if key not in channel:
            raise ConfigError(f"{path}: unknown key {key!r} (a recipe holds engine.train's keys, or "
                              "engine.channel_train's; see python -m engine.train --help)")
        channel_only = True
    if channel_only:  # an engine.channel_train recipe: what it leaves out, that command's defaults decide
        out.update({k: channel[k] for k in RECIPE_KNOBS if k in channel and k not in given})
        # and its micro-batch is one packed row, one example's units and query, as long as the data makes it:
        # --seq-len is that length (parse_args requires it), not engine.train's 512
        out.update(batch_size=1, pack=True, seq_len=None)
    out["lora_targets"] = ",".join(out["lora_targets"])
    if out["device"] == "auto":  # where the run trains when it finds a GPU: predict for the GPU (the default)
        del out["device"]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with a --config recipe's knobs as the defaults it overrides. ConfigError for a bad
    recipe."""
    parser = build_parser()
    pre = CliParser(prog="python -m engine.memory", add_help=False)  # errors in one line, as the full parser's
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        defaults = recipe_defaults(known.config)
        parser.set_defaults(**defaults)
        for action in parser._actions:  # --seq-len / --batch-size: required unless the recipe gives them
            if action.dest in defaults:
                action.required = False
    args = parser.parse_args(argv)
    if args.seq_len is None:  # an engine.channel_train recipe (recipe_defaults)
        raise ConfigError(f"{known.config} is an engine.channel_train recipe, whose rows are as long as the data "
                          "makes them: pass --seq-len N, the longest row (and --supervised M, the most query tokens "
                          "in a row, else every position counts); python -m data.check SPEC --split SPLIT "
                          "--tokenizer MODEL --channel UNIT prints both")
    return args


def resolve_precision(mode: str, device: str, capability: tuple | None) -> str:
    """--precision auto as the trainer resolves it on the device predicted for: with --capability, that GPU's
    (fp16 below sm 80: a T4), else engine.precision.auto_mode's."""
    if mode != "auto":
        return mode
    if device == "cuda" and capability is not None:
        return "bf16" if capability[0] >= 8 else "fp16"
    return auto_mode(device)


def _setup(args) -> tuple[object, Setup]:
    """(model config, Setup) from the command line; ValueError/OSError for a bad value."""
    if args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--seq-len must be >= 2 and --batch-size >= 1")
    if args.supervised is not None and args.supervised > args.batch_size * (args.seq_len - 1):
        raise ValueError(f"--supervised {args.supervised} is more than the {args.batch_size * (args.seq_len - 1)} "
                         f"positions a micro-batch can supervise (--batch-size × (--seq-len − 1): the last token of "
                         "a row predicts nothing)")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    for flag, v in (("--lora-r", args.lora_r), ("--loss-chunk", args.loss_chunk), ("--steps", args.steps),
                    ("--supervised", 1 if args.supervised is None else args.supervised), ("--nproc", args.nproc)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"--lora-targets: unknown projection {bad[0]!r} (choose from {','.join(TARGETS)})")
    if args.offload and not args.checkpointing:
        raise ValueError("--offload needs --checkpointing")
    if args.mlp_tile < 0:
        raise ValueError(f"--mlp-tile must be >= 0 (0 = no tiles), got {args.mlp_tile}")
    device = args.device
    if args.measure and device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # --measure on a machine without a GPU measures what it can on the CPU
    capability = parse_capability(args.capability)
    precision = resolve_precision(args.precision, device, capability)
    run = TrainConfig(model=args.model, seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r,
                      lora_targets=targets, lora_dropout=args.lora_dropout, checkpointing=args.checkpointing,
                      offload=args.offload,
                      mlp_tile=args.mlp_tile, compile=args.compile, optimizer=args.optimizer, quantize=args.quantize,
                      double_quant=args.double_quant, loss_chunk=args.loss_chunk, pack=args.pack, precision=precision)
    if capability and args.measure and device == "cuda" and capability != torch.cuda.get_device_capability():
        raise ValueError(f"--capability {args.capability} predicts for another GPU than the one --measure runs on "
                         f"(sm {'.'.join(map(str, torch.cuda.get_device_capability()))}); drop one of them")
    s = Setup.from_config(run, precision=precision, device=device, supervised=args.supervised, sdpa=args.sdpa,
                          capability=capability)
    check_sdpa(s)
    cfg = load_config(args.model)
    if s.seq_len > cfg.max_position_embeddings:  # --budget's search stops there too (engine.budget.fit_grid)
        raise ValueError(f"--seq-len {s.seq_len} is above {args.model}'s max_position_embeddings "
                         f"{cfg.max_position_embeddings}: the model has no positions past it (its RoPE, scaling "
                         f"included, ends there); give --seq-len {cfg.max_position_embeddings} or less")
    return cfg, s


def check_sdpa(s: Setup) -> None:
    """ValueError (one line) for an --sdpa kernel the device predicted for does not have: PyTorch's CPU SDPA has
    flash and math only; CUDA's flash kernel needs sm 80 (a T4, sm 75, has the memory-efficient one)."""
    if s.sdpa == "efficient" and s.device == "cpu":
        raise ValueError("--sdpa efficient: PyTorch has no memory-efficient SDPA kernel on the CPU (flash and math "
                         "only); use --sdpa flash, math or auto, or predict for --device cuda")
    if s.sdpa == "flash" and s.device == "cuda":
        cap = s.capability or (torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0))
        if cap[0] < 8:
            raise ValueError(f"--sdpa flash: CUDA's flash attention needs sm 8.0 or newer, not sm {cap[0]}.{cap[1]} "
                             "(a T4 is 7.5); use --sdpa efficient, math or auto")


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH}


def sdpa_kernels(s: Setup):
    """What a measured step runs under: the SDPA kernel --sdpa names (torch.nn.attention.sdpa_kernel), so the
    measured column is the predicted one's; auto: PyTorch's own choice, as the trainer runs."""
    return contextlib.nullcontext() if s.sdpa == "auto" else sdpa_kernel(SDPA_BACKENDS[s.sdpa])


def parse_capability(text: str | None) -> tuple[int, int] | None:
    """'7.5' -> (7, 5); None stays None. ValueError naming --capability otherwise."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", text)
    if not m:
        raise ValueError(f"--capability: {text!r} is not a compute capability (MAJOR.MINOR, e.g. 7.5 for a T4)")
    return int(m.group(1)), int(m.group(2))


def print_budget(args, cfg, s: Setup) -> int:
    """--budget: the fitted sequence and batch instead of the ledger table. ValueError for a bad size."""
    if args.measure:
        raise ValueError("--budget predicts only; to confirm its answer, run --measure at that --seq-len and "
                         "--batch-size")
    budget = parse_size(args.budget)
    host_budget = None if args.host_budget is None else parse_size(args.host_budget, "--host-budget")
    answers = budget_answers(cfg, s, budget, host_budget, args.nproc)
    if args.json:
        _say(json.dumps({"model": args.model, "setup": asdict(s), "budget_bytes": budget,
                         "host_budget_bytes": host_budget, "nproc": args.nproc,
                         "compared": "on_card_bytes: predicted peak allocated + CUDA context + slack (cuda); "
                                     "host_bytes: the offloaded block inputs of nproc processes",
                         **answers}, indent=1))
    else:
        _say(format_budget(answers, s, budget, f"memory budget for {args.model}: {describe(cfg, s)}", host_budget,
                           args.nproc))
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"engine.memory: error: {e}", file=sys.stderr)
        return 2
    try:
        cfg, s = _setup(args)
        if args.host_budget is not None and args.budget is None:
            raise ValueError("--host-budget needs --budget (it limits --budget's answers to the host RAM)")
        if args.budget is not None:
            return print_budget(args, cfg, s)
        led = predict(cfg, s)
        measured, oom = None, None
        if args.measure:
            check_device_tools(s.to_config(), s.device)  # before the model is built at real shapes
            log = (lambda *a: print(*a, file=sys.stderr)) if args.json else (lambda *a: _say(" ".join(map(str, a))))
            try:
                if s.device == "cuda":
                    measured = measure_cuda(cfg, s, steps=args.steps, log=log)
                else:
                    log("no GPU: --measure counts resident and saved-tensor bytes on the CPU (builds the model)")
                    measured = measure_cpu(cfg, s)
                if args.attribute:
                    peak, groups = attribute_step(cfg, s, s.device)
                    measured["attribution"] = {"peak_above_start_bytes": peak, "sites": [
                        {"site": k, "bytes": b, "count": c} for k, b, c in groups]}
                    log(format_attribution(peak, groups))
            except torch.OutOfMemoryError as e:  # a result too: these shapes do not fit this device
                oom = out_of_memory_gist(e)
            except RuntimeError as e:  # a forced --sdpa kernel that refuses these inputs (check_sdpa passed)
                if s.sdpa == "auto" or "No viable backend" not in str(e) and "No available kernel" not in str(e):
                    raise
                raise ValueError(f"--sdpa {s.sdpa}: PyTorch has no such kernel for these inputs on {s.device} "
                                 f"({str(e).splitlines()[0]}); try --sdpa auto") from None
        elif args.attribute:
            raise ValueError("--attribute needs --measure (it runs a real step)")
    except (OSError, ValueError) as e:
        print(f"engine.memory: error: {e}", file=sys.stderr)
        return 2
    host = on_host(led)
    if args.json:
        _say(json.dumps({"model": args.model, "setup": asdict(s), "ledger": led.to_dict(), "nproc": args.nproc,
                         "host_bytes": args.nproc * host, "measured": measured,
                         **({"out_of_memory": oom} if oom else {})}, indent=1))
    else:
        _say(format_table(led, measured, title=f"memory ledger for {args.model}: {describe(cfg, s)}"))
        if host and args.nproc > 1:
            _say(f"host RAM for {args.nproc} processes' offloaded block inputs: {fmt(args.nproc * host)} "
                 f"({fmt(host)} each)")
    if oom:
        print(f"engine.memory: error: the measured step ran out of memory ({oom}); the ledger predicted "
              f"{fmt(led.peak)} peak allocated{'' if measured else ', the table shows the prediction alone'}",
              file=sys.stderr)
        return 1
    return 0


def _say(text: str) -> None:
    """print() to standard output, flushed: a reader that has gone (`| head -1`) ends the command quietly, as it
    would a Unix tool (exit status 141, 128 + SIGPIPE; stdout pointed at /dev/null so that the interpreter's own
    flush at exit does not complain), and any other failure (`> /dev/full`) is one line naming standard output
    (exit 2). engine.extract's _say does the same for its answers."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout with no descriptor (a test's capture)
            pass
        raise SystemExit(128 + signal.SIGPIPE) from None
    except OSError as e:
        print(f"engine.memory: error: standard output: cannot write to it ({e.strerror or e}); "
              + ("free disk space or redirect it elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                 else "redirect it elsewhere"), file=sys.stderr)
        raise SystemExit(2) from None


def out_of_memory_gist(e: BaseException) -> str:
    """torch's out-of-memory message on one line, up to what the device had free (how much was asked, the
    capacity, what was free), without its paragraph on the allocator's settings."""
    text = " ".join(str(e).split())
    end = " is free."
    return text[:text.index(end) + len(end)] if end in text else text.split(". ")[0]


if __name__ == "__main__":
    sys.exit(main())
