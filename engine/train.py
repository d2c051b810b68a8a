"""QLoRA fine-tuning, one flat loop: `python -m engine.train [--config FILE.toml] [--key value ...]`.

Under torchrun every process runs this same file (`./launch.sh --nproc 2 ...`); alone it is world size 1.
Read `_train` top to bottom: setup (config, data, model, optimizer, resume), then the step loop, then the
adapter. Distributed plumbing lives in engine/dist.py, precision in engine/precision.py, the loss in
engine/loss.py, checkpoints in engine/checkpoint.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from data.batch import Batches
from data.example import DataError
from data.validate import load_validated
from engine import checkpoint as ckpt
from engine import config as config_mod
from engine import dist
from engine.config import ConfigError, TrainConfig
from engine.dist import print0
from engine.evaluate import DEFAULT_SEQ_LEN, eval_subset, evaluate_for_training
from engine.loss import CausalLMLoss, backward_scale, supervised_tokens, supervised_weight
from engine.precision import NonFiniteLoss, Precision
from engine.rundir import RunDir
from model import load_model, load_tokenizer
from model.lora import apply_lora, lora_report, save_adapter


# ---------------------------------------------------------------- small pieces the loop uses
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
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                        weight_decay=cfg.weight_decay)
    # foreach=False: the same per-parameter kernels whatever the parameter list, so a resumed run matches bit
    # for bit; for a few MB of adapters the fused/foreach speedup is negligible.
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=False)


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


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _log_ledger(model, cfg: TrainConfig, prec: Precision):
    """The predicted memory breakdown for this run's shapes (engine/memory.py). Informational: a failure here
    is reported in one line and never stops training."""
    try:
        from engine.memory import log_ledger

        log_ledger(model, log=print0, seq_len=cfg.seq_len, batch_size=cfg.batch_size, dtype=prec.mode,
                   checkpointing=cfg.checkpointing, offload=cfg.offload, optimizer=cfg.optimizer,
                   loss_chunk=cfg.loss_chunk, packed=cfg.pack, device=next(model.parameters()).device.type)
    except Exception as e:  # noqa: BLE001 (a ledger bug must not cost a training run)
        print0(f"warning: memory ledger unavailable ({type(e).__name__}: {e})")


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
                part = loss_model(b["input_ids"], b["labels"], position_ids=b.get("position_ids"),
                                  segment_ids=b.get("segment_ids"), loss_weights=b.get("loss_weights"))
            prec.backward(part * scale)
        loss_sum += part.detach().double().cpu()  # note: a host sync per micro-batch; negligible next to a step
        del part  # the graph is already freed by backward; drop the last reference before the next forward
    total = float(dist.all_reduce_sum(loss_sum.reshape(1))[0])
    return total / max(w_global, 1e-12), n_global


@torch.no_grad()
def evaluate_loss(loss_model, batches, prec: Precision) -> float:
    """Mean next-token loss over the supervised tokens of `batches` (this rank's share), all ranks together."""
    was_training = loss_model.training
    loss_model.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        with prec.autocast():
            acc[0] += float(loss_model(b["input_ids"], b["labels"], position_ids=b.get("position_ids"),
                                       segment_ids=b.get("segment_ids"), loss_weights=b.get("loss_weights")))
        acc[1] += supervised_weight(b["labels"], b.get("loss_weights"))
    dist.all_reduce_sum(acc)
    loss_model.train(was_training)
    return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a torn last line (killed mid-write) counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def json_line(row: dict) -> str:
    """One strict-JSON line for metrics.jsonl: a non-finite number (a diverged loss) is written as null, never
    as the NaN/Infinity that json.dumps allows and other JSON readers reject."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns a summary dict (final loss, eval loss, steps, stopped, out).

    SIGTERM/SIGINT handlers are ours for the duration of the run (first signal: checkpoint and stop after the
    current step; second: exit at once) and the previous ones come back afterwards.
    """
    stop = ckpt.StopFlag().install()
    try:
        return _train(cfg, stop)
    finally:
        stop.uninstall()


def _train(cfg: TrainConfig, stop: ckpt.StopFlag) -> dict:
    d = dist.init(cfg.device)
    out = Path(cfg.out)
    # torchrun --max-restarts: a restarted worker group continues from the newest checkpoint by itself
    resume = cfg.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    guard = RunDir(out)
    if d.is_main:
        guard.lock()  # one writer per run directory, held until this process ends
    try:
        return _run(cfg, stop, d, out, guard, resume)
    except BaseException:
        guard.abandon()  # a start that failed before writing anything leaves no empty OUT behind
        raise


def _run(cfg: TrainConfig, stop: ckpt.StopFlag, d: dist.Dist, out: Path, guard: RunDir, resume: bool) -> dict:
    guard.check_start(cfg, resume)  # before anything is loaded or written: a refused start leaves OUT as it was
    resume_from = ckpt.latest(out) if resume else None
    prec = Precision(cfg.precision, d.device, cfg.nonfinite_patience)

    # ---- data first: a bad dataset must fail before minutes of model loading, and before OUT is touched
    t_setup = time.perf_counter()
    tok = load_tokenizer(cfg.model)
    train_ex, rep = load_validated(cfg.data, cfg.train_split, max_rejected=cfg.max_rejected)
    if cfg.max_examples:
        train_ex = train_ex[:cfg.max_examples]
    if not train_ex:
        raise ValueError(f"{cfg.data}: no training examples in split {cfg.train_split!r}")
    batching = dict(seq_len=cfg.seq_len, pack=cfg.pack, batch_size=cfg.batch_size, rank=d.rank,
                    world_size=d.world_size, seed=cfg.seed, weighting=cfg.loss_weighting)
    try:
        batcher = Batches(tok, train_ex, shuffle=True, **batching)
    except ValueError as e:
        raise ValueError(f"{cfg.data}: {e}") from None
    eval_batches, gen_subset = [], []
    if cfg.eval_every:
        eval_ex, _ = load_validated(cfg.data, cfg.eval_split, max_rejected=cfg.max_rejected)
        if not eval_ex:
            raise ValueError(f"{cfg.data}: no examples in eval split {cfg.eval_split!r} (set --eval-every 0)")
        eval_batches = Batches(tok, eval_ex, shuffle=False, **batching).first(cfg.eval_batches)
        # task metrics, not just loss (loss does not predict extraction quality): a fixed subset, rank 0 only
        gen_subset = eval_subset(eval_ex, cfg.eval_generate) if cfg.eval_generate and d.is_main else []
    rows_per_step = cfg.batch_size * cfg.grad_accum * d.world_size
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * batcher.num_rows / rows_per_step))
    print0(f"data: {len(train_ex)} train examples from {cfg.data} ({rep.rejected} rejected, {rep.repaired} repaired, "
           f"{batcher.stats.truncated} truncated, {len(batcher.stats.skipped)} too long for --seq-len) -> "
           f"{batcher.num_rows} rows of <= {cfg.seq_len} tokens; {total} steps x {rows_per_step} rows")

    # ---- model: shared seed so the LoRA init is identical on every rank, then a per-rank stream (dropout)
    dist.seed_all(cfg.seed)
    model = load_model(cfg.model, dtype=prec.param_dtype, device=d.device,
                       quantize=None if cfg.quantize == "none" else cfg.quantize, double_quant=cfg.double_quant)
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=tuple(cfg.lora_targets),
               use_rslora=cfg.use_rslora)
    model.to(d.device)
    model.set_gradient_checkpointing(cfg.checkpointing, offload=cfg.offload)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params), "adapters must be fp32 master weights"
    loss_model = dist.wrap_ddp(CausalLMLoss(model, cfg.loss_chunk))
    opt = make_optimizer(cfg, params, d.device)
    print0(lora_report(model))
    if d.is_main:
        _log_ledger(model, cfg, prec)
    print0(f"setup {time.perf_counter() - t_setup:.1f}s | {d.world_size} process(es) on {d.device} | "
           f"precision {prec.mode} | checkpointing {'on' if cfg.checkpointing else 'off'}")

    # ---- OUT: only now that data and model are known to be good
    start_step, counters = 0, {"train_seconds": 0.0}
    metrics_path = out / "metrics.jsonl"
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            guard.clear_for_overwrite()
        ckpt.remove_partial(out)
        config_mod.save(cfg, out / "config.json")
    dist.barrier()
    if resume_from is not None:
        state = ckpt.load(resume_from, model=model, optimizer=opt, precision=prec)
        start_step, counters = state["step"], state["counters"]
        batcher.load_state_dict(state["sampler"])
        print0(f"resumed from {resume_from} at step {start_step}")
        if d.is_main and metrics_path.exists():  # drop lines of steps after the checkpoint: they are redone
            keep = [ln for ln in metrics_path.read_text().splitlines() if _step_of(ln) <= start_step]
            metrics_path.write_text("".join(k + "\n" for k in keep))
    elif resume:
        print0(f"--resume: no checkpoint in {out}/checkpoints, starting from step 0")
    if resume_from is None and d.is_main:
        metrics_path.write_text("")
    if resume_from is None:  # a resumed run got its RNG states back from the checkpoint instead
        dist.seed_rank(cfg.seed, d.rank)
    metrics = open(metrics_path, "a") if d.is_main else None

    def generation_eval() -> dict:
        """eval_* numbers on gen_subset, clause and NONE examples apart (rank 0; other ranks wait at the next
        collective)."""
        if not gen_subset:
            return {}
        model.eval()  # no dropout, no checkpointing; KV-cache greedy decoding
        with prec.autocast():
            res = evaluate_for_training(model, tok, gen_subset,
                                        seq_len=min(model.config.max_position_embeddings, DEFAULT_SEQ_LEN))
        model.train()
        return res

    def save_checkpoint(step):
        t = time.perf_counter()
        path = ckpt.save(out, step, model=model, optimizer=opt, precision=prec,
                         sampler_state=batcher.state_dict(), counters=counters, keep_last=cfg.keep_last,
                         base_model=cfg.model, save_adapter=save_adapter)
        print0(f"checkpoint {path} ({time.perf_counter() - t:.1f}s)")
        return path

    # ---- the loop
    eval_loss = None
    if cfg.eval_every and start_step == 0:
        eval_loss = evaluate_loss(loss_model, [_to(b, d.device) for b in eval_batches], prec)
        gen = generation_eval()
        print0(f"eval loss before training: {eval_loss:.4f}"
               + (f" | similarity {gen['eval_avg_similarity']:.1f}" if gen else ""))
        if metrics:
            metrics.write(json_line({"step": 0, "eval_loss": eval_loss, **gen}))
            metrics.flush()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    step, loss, stopped = start_step, float("nan"), False
    while step < total:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, total)
        micro = [_to(batcher.next_batch(), d.device) for _ in range(cfg.grad_accum)]
        tokens = torch.tensor([float(sum(int(b["num_tokens"]) for b in micro))], dtype=torch.float64)
        loss, n_sup = forward_backward(loss_model, micro, prec, d.world_size)
        del micro
        prec.check_loss(loss, step + 1)
        grad_norm, overflow = prec.clip_and_step(opt, params, cfg.grad_clip)
        opt.zero_grad(set_to_none=True)
        step += 1
        # one small all-reduce: global token count + "did any rank get SIGTERM/SIGINT" (all must stop together)
        sync = dist.all_reduce_sum(torch.cat([tokens, torch.tensor([float(stop.requested)], dtype=torch.float64)]))
        tokens, stop_now = int(sync[0]), bool(sync[1] > 0)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)  # honest step time for tokens/s
        dt = time.perf_counter() - t0
        counters["train_seconds"] += dt
        row = {"step": step, "loss": loss, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
               "tokens": tokens, "supervised_tokens": n_sup, "tokens_per_s": tokens / dt,
               "peak_mem_bytes": peak_memory_bytes(d.device), "overflow": overflow}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            eval_loss = evaluate_loss(loss_model, [_to(b, d.device) for b in eval_batches], prec)
            row["eval_loss"] = eval_loss
            row.update(generation_eval())
        if metrics:
            metrics.write(json_line(row))
            metrics.flush()
        eta = counters["train_seconds"] / (step - start_step) * (total - step)
        print0(f"step {step}/{total} | loss {loss:.4f} | lr {row['lr']:.2e} | {row['tokens_per_s']:.0f} tok/s | "
               f"peak {row['peak_mem_bytes'] / 2**30:.2f} GiB | eta {_fmt_time(eta)}"
               + (f" | eval {eval_loss:.4f}" if "eval_loss" in row else "")
               + (f" | similarity {row['eval_avg_similarity']:.1f}" if "eval_avg_similarity" in row else "")
               + (f" | overflow (skipped, {prec.overflows} so far)" if overflow else ""))
        if stop_now and step < total:  # (a signal during the last step just lets the run finish)
            path = save_checkpoint(step)
            print0(f"stopped by signal after step {step}; checkpoint {path}; continue with --resume")
            stopped = True
            break
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(step)
    if metrics:
        metrics.close()

    # ---- the adapter (PEFT layout), only after a complete run
    if not stopped and d.is_main:
        save_adapter(model, out / "adapter", base_model=cfg.model)  # atomic: written aside, then renamed
        print0(f"wrote {out / 'adapter'} | {step} steps in {_fmt_time(counters['train_seconds'])}")
    if not stopped and cfg.save_every:
        save_checkpoint(step)  # the final state, so a later --resume with a larger --max-steps continues
    dist.barrier()
    return {"step": step, "loss": loss, "eval_loss": eval_loss, "stopped": stopped, "signal": stop.signum,
            "out": str(out)}


def preflight(argv: list[str]) -> int:
    """What ./launch.sh runs once, in one process, before torchrun starts N of them: the config, the run
    directory and the training data are checked here, so a mistake is one line of error instead of N copies
    inside torchrun's failure report. 0 when all is well, else 2 (usage) or 1 (data), after one line."""
    try:
        cfg = config_mod.parse_args(argv)
        RunDir(cfg.out).check_start(cfg, cfg.resume)
        load_validated(cfg.data, cfg.train_split, max_rejected=cfg.max_rejected)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_mod.parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = 0
    try:
        result = train(cfg)
        if result["stopped"]:
            code = 128 + result["signal"]
    except (KeyboardInterrupt, SystemExit) as e:  # a second signal: the save in progress was rolled back
        print(f"error: interrupted; the last complete checkpoint in {cfg.out}/checkpoints is intact", file=sys.stderr)
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    except Exception as e:  # the user-facing boundary: one line; CLAUSELORA_DEBUG=1 shows the traceback
        if os.environ.get("CLAUSELORA_DEBUG"):
            raise
        where = f"[rank {dist.get().rank}] " if dist.get().world_size > 1 else ""
        if isinstance(e, NonFiniteLoss | ConfigError | ValueError | OSError | DataError):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (CLAUSELORA_DEBUG=1 for details)"
        print(f"error: {where}{msg}", file=sys.stderr)
        code = 2 if isinstance(e, ConfigError) else 1  # a usage error, as argparse reports them
    finally:
        dist.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
