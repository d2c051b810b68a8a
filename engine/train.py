"""QLoRA fine-tuning, one flat loop: `python -m engine.train [--config FILE.toml] [--key value ...]`.

Under torchrun every process runs this same file (`./launch.sh --nproc 2 ...`); alone it is world size 1.
Read `_train` top to bottom: setup (config, data, model, optimizer, resume), then the step loop, then the
adapter. Distributed plumbing lives in engine/dist.py, precision in engine/precision.py, the loss in
engine/loss.py, checkpoints in engine/checkpoint.py.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.batch import Batches
from data.example import DataError
from data.validate import load_validated
from engine import checkpoint as ckpt
from engine import config as config_mod
from engine import dist
from engine.cli import preflight_boundary
from engine.config import ConfigError, TrainConfig
from engine.dist import print0
from engine.evaluate import DEFAULT_SEQ_LEN, eval_subset, evaluate_for_training
from engine.loss import CausalLMLoss, supervised_weight
from engine.memory import log_ledger, out_of_memory_gist
from engine.precision import NonFiniteLoss, Precision
from engine.report import lora_report
from engine.rundir import RunDir, append_metrics
from engine.step import TrainStep, check_device_tools, lr_at, make_optimizer, peak_memory_bytes, prepare_model
from model import load_adapter, load_model, load_tokenizer, save_adapter
from model.adapter import check_adapter
from model.load import check_model


# ---------------------------------------------------------------- small pieces the loop uses
def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _log_ledger(model, cfg: TrainConfig, prec: Precision):
    """The predicted memory breakdown for this run's shapes (engine/memory.py). Informational: a failure here
    is reported in one line and never stops training."""
    try:
        log_ledger(model, cfg, prec.mode, next(model.parameters()).device.type, log=print0)
    except Exception as e:  # noqa: BLE001 (a ledger bug must not cost a training run)
        print0(f"warning: memory ledger unavailable ({type(e).__name__}: {e})")


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


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns a summary dict (final loss, eval loss, steps, stopped, out).

    SIGTERM/SIGINT handlers are ours for the duration of the run (first signal: checkpoint and stop after the
    current step; a second, 2 s or more later: exit at once) and the previous ones come back afterwards.
    """
    stop = ckpt.StopFlag().install()
    try:
        return _train(cfg, stop)
    finally:
        stop.uninstall()


def _train(cfg: TrainConfig, stop: ckpt.StopFlag) -> dict:
    d = dist.init(cfg.device)
    out = Path(cfg.out)
    guard = RunDir(out)
    # ./launch.sh or torchrun --max-restarts: a restarted worker group continues from the newest checkpoint
    resume = cfg.resume or guard.continues_after_restart()
    if d.is_main:
        guard.lock()  # one writer per run directory, held until this process ends
    try:
        return _run(cfg, stop, d, out, guard, resume)
    except BaseException:
        guard.discard_unfinished_start()  # a run that failed before its first step leaves no run behind
        guard.abandon()  # and a start that failed before writing anything no empty OUT
        raise
    finally:
        guard.release()  # the process may go on (a notebook, a test): the same OUT can be trained again


@dataclass
class _Run:
    """What the loop works with, built once by _setup_data and _setup_model (plain fields, no closures)."""
    cfg: TrainConfig
    d: dist.Dist
    out: Path
    prec: Precision
    tok: object
    batcher: Batches
    eval_batches: list
    gen_subset: list  # examples for the generation metrics (rank 0 only)
    total: int  # optimizer steps of the whole run
    model: torch.nn.Module | None = None
    loss_model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    step: TrainStep | None = None
    counters: dict = field(default_factory=lambda: {"train_seconds": 0.0})

    def evaluate(self) -> tuple[float, dict]:
        """(eval loss, eval_* generation numbers): the loss on every rank, generation on rank 0 (the other
        ranks wait at the next collective), clause and NONE examples apart."""
        loss = evaluate_loss(self.loss_model, [_to(b, self.d.device) for b in self.eval_batches], self.prec)
        if not self.gen_subset:
            return loss, {}
        self.model.eval()  # no dropout, no checkpointing; KV-cache greedy decoding
        with self.prec.autocast():
            gen = evaluate_for_training(self.model, self.tok, self.gen_subset,
                                        seq_len=min(self.model.config.max_position_embeddings, DEFAULT_SEQ_LEN))
        self.model.train()
        return loss, gen

    def save_checkpoint(self, step: int) -> Path:
        t = time.perf_counter()
        path = ckpt.save(self.out, step, model=self.model, optimizer=self.opt, precision=self.prec,
                         sampler_state=self.batcher.state_dict(), counters=self.counters,
                         keep_last=self.cfg.keep_last, base_model=self.cfg.model, save_adapter=save_adapter)
        print0(f"checkpoint {path} ({time.perf_counter() - t:.1f}s)")
        return path


def _setup_data(cfg: TrainConfig, d: dist.Dist, out: Path, prec: Precision) -> _Run:
    """Tokenizer, validated examples, batches: first, so a bad dataset fails before minutes of model loading
    and before OUT is touched."""
    tok = load_tokenizer(cfg.model)
    train_ex, rep = load_validated(cfg.data, cfg.train_split, max_rejected=cfg.max_rejected)
    if cfg.max_examples:  # a seeded subset over every category: CUAD lists all its NONE examples last
        train_ex = eval_subset(train_ex, cfg.max_examples, salt=f"max-examples:{cfg.seed}")
    if not train_ex:
        raise ValueError(f"{cfg.data}: no training examples in split {cfg.train_split!r}")
    batching = dict(seq_len=cfg.seq_len, pack=cfg.pack, batch_size=cfg.batch_size, rank=d.rank,
                    world_size=d.world_size, seed=cfg.seed, weighting=cfg.loss_weighting,
                    pad_to_seq_len=cfg.pad_to_seq_len)
    try:
        batcher = Batches(tok, train_ex, shuffle=True, **batching)
    except ValueError as e:
        raise ValueError(f"{cfg.data}: {e}") from None
    eval_batches, gen_subset = [], []
    if cfg.eval_every:
        eval_ex, _ = load_validated(cfg.data, cfg.eval_split, max_rejected=cfg.max_rejected)
        if not eval_ex:
            raise ValueError(f"{cfg.data}: no examples in eval split {cfg.eval_split!r} (set --eval-every 0)")
        # rows in a seeded order, the same at every evaluation: in packing order the first rows are the longest
        # examples' (best fit decreasing), all clauses and no NONE
        try:
            eval_batches = Batches(tok, eval_ex, shuffle=True, **batching).first(cfg.eval_batches)
        except ValueError as e:
            # fewer rows than processes x batch size: say how to get by; other errors (no example fits --seq-len)
            # carry their own remedy
            fix = (" (set --eval-every 0, or use fewer processes or a smaller --batch-size)"
                   if "cannot feed" in str(e) else "")
            raise ValueError(f"{cfg.data}: eval split {cfg.eval_split!r}: {e}{fix}") from None
        # task metrics, not just loss (loss does not predict extraction quality): a fixed subset, rank 0 only
        gen_subset = eval_subset(eval_ex, cfg.eval_generate) if cfg.eval_generate and d.is_main else []
    rows_per_step = cfg.batch_size * cfg.grad_accum * d.world_size
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * batcher.num_rows / rows_per_step))
    print0(f"data: {len(train_ex)} train examples from {cfg.data} ({rep.rejected} rejected, {rep.repaired} repaired, "
           f"{batcher.stats.truncated} truncated, {batcher.stats.target_cut} of them trained on the answer's first "
           f"tokens only, {len(batcher.stats.skipped)} too long for --seq-len) -> "
           f"{batcher.num_rows} rows of <= {cfg.seq_len} tokens; {total} steps x {rows_per_step} rows")
    return _Run(cfg, d, out, prec, tok, batcher, eval_batches, gen_subset, total)


def _setup_model(r: _Run, init_adapter: bool = True) -> None:
    """The model, its adapters, the optimizer and the step. A shared seed makes the LoRA init identical on every
    rank; the per-rank stream (dropout) comes after resuming. init_adapter: read cfg.init_adapter into the LoRA
    layers (not when a checkpoint will overwrite them)."""
    cfg, d = r.cfg, r.d
    dist.seed_all(cfg.seed)
    r.model = load_model(cfg.model, dtype=r.prec.param_dtype, device=d.device,
                         quantize=None if cfg.quantize == "none" else cfg.quantize, double_quant=cfg.double_quant)
    prepare_model(r.model, cfg, d.device)
    if cfg.init_adapter and init_adapter:  # into the LoRA layers just made (keys and shapes checked)
        load_adapter(r.model, cfg.init_adapter)
        print0(f"LoRA weights from {cfg.init_adapter}")
    params = [p for p in r.model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params), "adapters must be fp32 master weights"
    r.loss_model = dist.wrap_ddp(CausalLMLoss(r.model, cfg.loss_chunk))
    r.opt = make_optimizer(cfg, params, d.device)
    r.step = TrainStep(r.loss_model, params, r.opt, r.prec, grad_clip=cfg.grad_clip, world_size=d.world_size)
    print0(lora_report(r.model))
    if d.is_main:
        _log_ledger(r.model, cfg, r.prec)


def _start_out(r: _Run, guard: RunDir, resume: bool, resume_from: Path | None):
    """OUT, only now that data and model are known to be good; the resume policy: continue from the newest
    complete checkpoint (dropping metrics lines of the steps it redoes) or start a fresh metrics file.
    -> (start step, the open metrics file on rank 0 or None)."""
    cfg, d, out = r.cfg, r.d, r.out
    start_step, metrics_path = 0, out / "metrics.jsonl"
    # the checkpoint is read before anything is written: one that does not read leaves OUT as it was
    state = ckpt.load(resume_from, model=r.model, optimizer=r.opt, precision=r.prec) if resume_from else None
    dist.barrier()  # every rank has read it before rank 0 tidies OUT (remove_partial may move it back into place)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and resume_from is None:  # (a restarted --overwrite run resumes its own checkpoint)
            guard.clear_for_overwrite()
        ckpt.remove_partial(out)
        config_mod.save(cfg, out / "config.json")
        guard.mark_started()
    dist.barrier()
    if resume_from is not None:
        start_step, r.counters = state["step"], state["counters"]
        r.batcher.load_state_dict(state["sampler"])
        # by its name now: a moved-aside step-N.tmp.old has been put back as step-N
        print0(f"resumed from {ckpt.ckpt_root(out) / f'step-{start_step}'} at step {start_step}")
        if d.is_main:  # drop lines of steps after the checkpoint: they are redone
            ckpt.drop_metrics_after(metrics_path, start_step)
    elif resume:
        print0(f"{'--resume' if cfg.resume else 'restart'}: no checkpoint in {out}/checkpoints, starting from step 0")
    if resume_from is None and d.is_main:
        metrics_path.write_text("")
        # nothing a step produced yet (RunDir.discard_unfinished_start); a --resume that starts over from step 0
        # may stand on an earlier run's files (its adapter, read with this config.json): those stay. (A restart,
        # --max-restarts, without a checkpoint is the user's fresh start again.)
        guard.fresh_start = not cfg.resume
    if resume_from is None:  # a resumed run got its RNG states back from the checkpoint instead
        dist.seed_rank(cfg.seed, d.rank)
    return start_step, (open(metrics_path, "a") if d.is_main else None)


def _log_line(row: dict, total: int, eta: float, prec: Precision) -> str:
    return (f"step {row['step']}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:.0f} tok/s | peak {row['peak_mem_bytes'] / 2**30:.2f} GiB | eta {_fmt_time(eta)}"
            + (f" | eval {row['eval_loss']:.4f}" if "eval_loss" in row else "")
            + (f" | similarity {row['eval_avg_similarity']:.1f}" if "eval_avg_similarity" in row else "")
            + (f" | overflow (skipped, {prec.overflows} so far)" if row["overflow"] else ""))


def _write(metrics, row: dict, out: Path):
    if metrics:
        append_metrics(metrics, row, out)


def check_init_adapter(cfg: TrainConfig) -> None:
    """--init-adapter read and checked without a model (model.adapter.check_adapter), and its LoRA shape equal to
    this run's: a rank, alpha, target or rslora that differs would train another adapter than the one saved (or
    fail after the model has loaded). Raises ConfigError naming the flag to set."""
    if not cfg.init_adapter:
        return
    try:
        a = check_adapter(cfg.init_adapter)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--init-adapter: {' '.join(str(e).split())}") from None
    saved = {"--lora-r": int(a["r"]), "--lora-alpha": float(a.get("lora_alpha", 8)),
             "--lora-targets": ",".join(sorted(a["target_modules"])), "rslora": bool(a.get("use_rslora"))}
    mine = {"--lora-r": cfg.lora_r, "--lora-alpha": float(cfg.lora_alpha),
            "--lora-targets": ",".join(sorted(cfg.lora_targets)), "rslora": cfg.use_rslora}
    said = lambda k, v: ("--use-rslora" if v else "--no-use-rslora") if k == "rslora" else f"{k} {v}"  # noqa: E731
    diff = [f"{said(k, saved[k])} (this run: {said(k, mine[k])})" for k in saved if saved[k] != mine[k]]
    if diff:
        raise ConfigError(f"--init-adapter {cfg.init_adapter} was saved with {', '.join(diff)}; pass "
                          f"{'those' if len(diff) > 1 else 'that'} to continue it")


def _run(cfg: TrainConfig, stop: ckpt.StopFlag, d: dist.Dist, out: Path, guard: RunDir, resume: bool) -> dict:
    guard.check_start(cfg, resume)  # before anything is loaded or written: a refused start leaves OUT as it was
    resume_from = ckpt.latest(out) if resume else None
    if cfg.resume:
        ckpt.check_resumable(out)
    if resume_from is None:  # a resumed run's LoRA weights come from its checkpoint: the adapter may be gone
        check_init_adapter(cfg)
    prec = Precision(cfg.precision, d.device, cfg.nonfinite_patience)
    check_device_tools(cfg, d.device)  # now, not after the model has loaded and the first step has begun
    t_setup = time.perf_counter()
    r = _setup_data(cfg, d, out, prec)
    _setup_model(r, init_adapter=resume_from is None)
    print0(f"setup {time.perf_counter() - t_setup:.1f}s | {d.world_size} process(es) on {d.device} | "
           f"precision {prec.mode} | checkpointing {'on' if cfg.checkpointing else 'off'}"
           + (" | blocks compiled (torch.compile; the first steps compile)" if cfg.compile else ""))
    if _stop_requested(stop):  # a signal while data and model loaded (minutes for a 3B model): nothing written
        guard.abandon()
        print0("stopped by signal before training began; nothing was written")
        return _stopped_before_training(stop, out)
    start_step, metrics = _start_out(r, guard, resume, resume_from)

    # ---- the loop
    eval_loss = None
    if cfg.eval_every and start_step == 0:
        eval_loss, gen = r.evaluate()
        print0(f"eval loss before training: {eval_loss:.4f}"
               + (f" | similarity {gen['eval_avg_similarity']:.1f}" if gen else ""))
        _write(metrics, {"step": 0, "eval_loss": eval_loss, **gen}, out)
        if _stop_requested(stop):  # during that evaluation: no step ran, so the start leaves nothing behind
            if metrics:
                metrics.close()
            guard.discard_unfinished_start()
            guard.abandon()
            print0("stopped by signal before the first step; the files of this start were removed")
            return _stopped_before_training(stop, out)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    step, loss, stopped = start_step, float("nan"), False
    while step < r.total:
        t0 = time.perf_counter()
        micro = [_to(r.batcher.next_batch(), d.device) for _ in range(cfg.grad_accum)]
        tokens = torch.tensor([float(sum(int(b["num_tokens"]) for b in micro))], dtype=torch.float64)
        # the schedule counts the optimizer steps that were taken: a step skipped for an inf/NaN gradient (fp16's
        # loss scale finding its level in the first steps) neither warms up nor decays the rate, as in HF's Trainer
        res = r.step(micro, step, lr_at(step - r.prec.overflows, cfg, r.total))
        del micro
        loss = res.loss
        step += 1
        # one small all-reduce: global token count + "did any rank get SIGTERM/SIGINT" (all must stop together)
        sync = dist.all_reduce_sum(torch.cat([tokens, torch.tensor([float(stop.requested)], dtype=torch.float64)]))
        tokens, stop_now = int(sync[0]), bool(sync[1] > 0)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)  # honest step time for tokens/s
        dt = time.perf_counter() - t0
        r.counters["train_seconds"] += dt
        row = {"step": step, "loss": loss, "lr": r.opt.param_groups[0]["lr"], "grad_norm": res.grad_norm,
               "tokens": tokens, "supervised_tokens": res.supervised_tokens, "tokens_per_s": tokens / dt,
               "peak_mem_bytes": peak_memory_bytes(d.device), "overflow": res.overflow}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == r.total):
            eval_loss, gen = r.evaluate()
            row.update(eval_loss=eval_loss, **gen)
            if d.device.type == "cuda":  # generation's KV cache is the evaluation's peak, not the next steps'
                row["eval_peak_mem_bytes"] = peak_memory_bytes(d.device)
                torch.cuda.reset_peak_memory_stats(d.device)
        _write(metrics, row, out)
        guard.fresh_start = False  # a step is logged: from now on OUT holds a run, kept whatever happens
        print0(_log_line(row, r.total, r.counters["train_seconds"] / (step - start_step) * (r.total - step), prec))
        if stop_now and step < r.total:  # (a signal during the last step just lets the run finish)
            path = r.save_checkpoint(step)
            print0(f"stopped by signal after step {step}; checkpoint {path}; continue with --resume")
            stopped = True
            break
        if cfg.save_every and step % cfg.save_every == 0 and step < r.total:
            r.save_checkpoint(step)
    if metrics:
        metrics.close()

    # ---- the adapter (PEFT layout), only after a complete run
    if not stopped and d.is_main:
        try:
            save_adapter(r.model, out / "adapter", base_model=cfg.model)  # atomic: written aside, then renamed
        except OSError as e:
            raise ckpt.write_failed(out, e, "the trained adapter was not saved") from None
        print0(f"wrote {out / 'adapter'} | {step} steps in {_fmt_time(r.counters['train_seconds'])}")
    if not stopped and cfg.save_every:
        r.save_checkpoint(step)  # the final state, so a later --resume with a larger --max-steps continues
    dist.barrier()
    return {"step": step, "loss": loss, "eval_loss": eval_loss, "stopped": stopped, "signal": stop.signum,
            "out": str(out)}


def _stopped_before_training(stop: ckpt.StopFlag, out: Path) -> dict:
    return {"step": 0, "loss": float("nan"), "eval_loss": None, "stopped": True, "signal": stop.signum,
            "out": str(out)}


def _stop_requested(stop: ckpt.StopFlag) -> bool:
    """Whether any rank got SIGTERM/SIGINT (a collective: every rank asks at the same point)."""
    return bool(dist.all_reduce_sum(torch.tensor([float(stop.requested)], dtype=torch.float64))[0] > 0)


def out_of_memory_advice(e: BaseException) -> str:
    """One line for a GPU out-of-memory error: torch's gist (engine.memory.out_of_memory_gist) and the flags
    that lower the peak, with the command that says what fits."""
    return (f"out of GPU memory ({out_of_memory_gist(e)}); the memory ledger printed at the start predicts "
            "this run's peak: lower it with --offload, --mlp-tile 4096, --double-quant or a smaller "
            "--batch-size / --seq-len (python -m engine.memory --config RECIPE.toml with this run's other flags "
            "and --budget 15GiB says what fits: the recipe's knobs, engine.train's defaults for the rest)")


def preflight(argv: list[str]) -> int:
    """What ./launch.sh runs once, in one process, before torchrun starts N of them: the config, the run
    directory and the training data are checked here, so a mistake is one line of error instead of N copies
    inside torchrun's failure report. 0 when all is well, else 2 (usage) or 1 (data, model), after one line."""
    def check():
        cfg = config_mod.parse_args(argv)
        RunDir(cfg.out).check_start(cfg, cfg.resume)
        if cfg.resume:
            ckpt.check_resumable(cfg.out)
        if not (cfg.resume and ckpt.latest(Path(cfg.out))):
            check_init_adapter(cfg)
        check_device_tools(cfg, "cuda" if dist.uses_cuda(cfg.device) else "cpu")
        check_model(cfg.model)  # config.json and the weights' file names (a hub id: its config.json), no weights
        load_validated(cfg.data, cfg.train_split, max_rejected=cfg.max_rejected)

    return preflight_boundary(check)


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
        print(f"error: {ckpt.interrupted_message(cfg.out)}", file=sys.stderr)
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    except Exception as e:  # the user-facing boundary: one line; CLAUSELORA_DEBUG=1 shows the traceback
        if os.environ.get("CLAUSELORA_DEBUG"):
            raise
        where = f"[rank {dist.get().rank}] " if dist.get().world_size > 1 else ""
        if isinstance(e, torch.OutOfMemoryError):
            msg = out_of_memory_advice(e)
        elif isinstance(e, NonFiniteLoss | ConfigError | ValueError | OSError | DataError):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (CLAUSELORA_DEBUG=1 for details)"
        print(f"error: {where}{msg}", file=sys.stderr)
        code = 2 if isinstance(e, ConfigError) else 1  # a usage error, as argparse reports them
    finally:
        dist.teardown()
    return code


if __name__ == "__main__":
    dist.exit_worker(main())  # under torchrun: os._exit, past a gloo shutdown race (engine.dist.exit_worker)
