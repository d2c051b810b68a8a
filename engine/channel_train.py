"""Train the noisy-channel choice itself: LoRA on the listwise loss over a context's paragraphs and "no clause".

    python -m engine.channel_train --data acord:DIR --out runs/channel [--max-steps 100] [--groups-per-step 4]

`engine.evaluate --decode channel` answers with the paragraph under which the attorney's query is likeliest, or
NONE when no paragraph beats an empty clause (model.channel). Zero-shot it already picks the right ACORD clause
70% of the time, but it cannot say NONE: the best of five unrelated clauses still explains a query better than no
clause at all. engine.train's token loss cannot teach that decision (it is under 1% of a clause row's loss, and
it is asked in the other direction). This trains exactly the decision the decoder makes: for each example, the
scores s_i = log p(query | paragraph i) of its paragraphs and of CHANNEL_NULL go through a softmax, and the loss
is the cross-entropy of the gold choice (the paragraph holding the answer, or CHANNEL_NULL for NONE). One
example weighs one, whatever its lengths. After training, the default rule (quote iff the best paragraph beats
CHANNEL_NULL) is the decision trained; no threshold is fitted.

The step is engine.step's TrainStep (optimizer, schedule, loss scaling, clipping) on the same NF4 + LoRA model
engine.train builds; only the loss (ChannelLoss) and the batches (one example's candidates per micro-batch)
differ. It runs in one process or under torchrun (DDP over the adapters; rank r takes every r-th example of
one seeded stream, so a step holds the same examples whatever the number of processes) and writes OUT/adapter
(PEFT layout), OUT/metrics.jsonl, OUT/config.json and,
with --save-every, OUT/checkpoints/step-N/adapter (adapters only: a stopped run is restarted, not resumed;
--init-adapter continues from a saved adapter with a fresh optimizer and schedule).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.validate import load_validated
from engine import dist
from engine.cli import THREADS_HELP, CliParser, run_command, set_threads
from engine.config import TrainConfig
from engine.evaluate import DEFAULT_SEQ_LEN, evaluate_examples, read_eval_json
from engine.metrics import is_none
from engine.precision import Precision
from engine.rundir import RunDir
from engine.step import TrainStep, lr_at, make_optimizer, prepare_model
from model import load_model, load_tokenizer
from model.adapter import load_adapter, save_adapter
from model.channel import CHANNEL_NULL, IGNORE, UNITS, channel_batch, query_logprobs, units
from model.files import atomic_write_text
from model.load import EMBEDDED


class ChannelLoss(torch.nn.Module):
    """Cross-entropy of the gold choice over one example's channel scores (its paragraphs, then CHANNEL_NULL).
    The call signature is engine.loss.CausalLMLoss's, so TrainStep drives it unchanged; loss_weights only set
    TrainStep's normalisation (they sum to 1 per example: the step's loss is the mean over its examples)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.hits = self.calls = 0  # examples whose gold choice scored highest (before the step): train accuracy

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None, loss_weights=None, choice=None):
        assert choice is not None and segment_ids is not None, "one example's channel_batch per micro-batch"
        scores = query_logprobs(self.model, input_ids, labels, position_ids, segment_ids)  # (n_candidates,)
        self.hits += int(int(scores.detach().argmax()) == int(choice))
        self.calls += 1
        return F.cross_entropy(scores[None], choice.view(1), reduction="sum")


def choice_of(ex, unit: str = "paragraph") -> tuple[list[str], int] | None:
    """(candidate texts: the context's paragraphs, or sentences (model.channel.units), then CHANNEL_NULL; index
    of the gold one) or None when the answer spans two paragraphs (the decoder could not quote it). An answer
    running over several sentences (24% of CUAD's) has the sentence it begins in as its gold one."""
    spans = units(ex.context, unit)
    texts = [ex.context[a:b] for a, b in spans] + [CHANNEL_NULL]
    if is_none(ex.answer):
        return texts, len(spans)
    at = ex.context.find(ex.answer.strip())
    assert at >= 0, f"{ex.id}: validated answers are in their context"
    inside = [i for i, (a, b) in enumerate(spans) if a <= at and at + len(ex.answer.strip()) <= b]
    if not inside and unit == "sentence":
        inside = [i for i, (a, b) in enumerate(spans) if a <= at < b]
    return (texts, inside[0]) if inside else None


def candidate_order(n_texts: int, gold: int, max_candidates: int, rng: random.Random,
                    hard: list[int] | None = None, share: float = 0.5) -> list[int]:
    """Indices into an example's texts: at most max_candidates paragraphs (the gold one kept, others sampled)
    in a shuffled order, then CHANNEL_NULL (the last text). hard: the example's paragraphs, likeliest first under
    an earlier adapter (hard_negatives); then a share of the others (rounded up; half by default) are the
    likeliest wrong ones, the rest sampled (all hard would also pick the contract's other passages of the same
    clause type, right answers marked wrong). share 0 samples them all, as without hard."""
    assert 0.0 <= share <= 1.0, share
    paras, null = list(range(n_texts - 1)), n_texts - 1
    others = [i for i in paras if i != gold]
    n = min(len(others), max_candidates - (gold != null))
    if hard:
        top = [i for i in hard if i != gold][:math.ceil(round(n * share, 9))]  # 25 x 0.28 is 7, not 7.000...1
        keep = top + rng.sample([i for i in others if i not in top], n - len(top))
    else:
        keep = rng.sample(others, n)
    order = keep + ([gold] if gold != null else [])
    rng.shuffle(order)
    return order + [null]


def hard_negatives(path, examples, unit: str) -> dict[str, list[int]]:
    """{example id: its units, likeliest first} from an engine.evaluate --decode channel eval.json of the
    training split (the adapter being continued, run over the examples it will train on): the candidates it
    finds hardest. Rows read in more than one window, or whose scores do not match the example's units, are
    left out (their examples keep sampled candidates)."""
    d = read_eval_json(path)
    if d.get("decode") != "channel" or (d.get("channel_unit") or "paragraph") != unit:
        raise ValueError(f"{path}: --hard-negatives needs an eval.json of engine.evaluate --decode channel "
                         f"--channel-unit {unit}; this one is decode {d.get('decode')!r}, unit "
                         f"{d.get('channel_unit')!r}")
    by_id = {ex.id: ex for ex in examples}
    out = {}
    for row in d.get("rows", []):
        ex, scores = by_id.get(row.get("id")), (row.get("channel") or {}).get("scores")
        if ex is None or not isinstance(scores, list) or int(row.get("windows", 1)) != 1:
            continue
        if len(scores) == len(units(ex.context, unit)):
            out[ex.id] = sorted(range(len(scores)), key=lambda i: -scores[i])
    if not out:
        raise ValueError(f"{path}: no row matches an example of --split with its units' scores; pass an eval.json "
                         "run on the split trained on")
    return out


def make_group(tok, ex, texts: list[str], gold: int, max_candidates: int, max_clause_tokens: int,
               rng: random.Random) -> dict:
    """One micro-batch: candidate_order's paragraphs and CHANNEL_NULL as one packed channel_batch; choice is
    where the gold one ended up."""
    order = candidate_order(len(texts), gold, max_candidates, rng)
    return _group(tok, ex, texts, gold, order, max_clause_tokens)


def _group(tok, ex, texts: list[str], gold: int, order: list[int], max_clause_tokens: int) -> dict:
    b = channel_batch(tok, [texts[i] for i in order], ex.query, max_clause_tokens)
    w = (b["labels"] != IGNORE).float()
    return {**b, "loss_weights": w / w.sum(), "choice": torch.tensor(order.index(gold))}


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.channel_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=EMBEDDED, help="HF dir, hub id, .gguf or smollm2-135m")
    ap.add_argument("--data", required=True, help="acord:DIR, cuad:DIR or jsonl:FILE")
    ap.add_argument("--split", default="train", help="split to train on; fit leaves the calib part of train out, for "
                    "engine.calibrate to fit the NONE rule on queries never trained on")
    ap.add_argument("--eval-split", default="valid", help="split for the periodic channel evaluation")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--groups-per-step", type=int, default=4, help="examples (candidate groups) per step, all "
                    "processes together (a multiple of their number)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine decay to 10%%)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    ap.add_argument("--unit", choices=tuple(UNITS), default="paragraph",
                    help="what the decoder quotes and training chooses among: paragraphs (ACORD's clauses) or "
                         "sentences (CUAD's spans; then evaluate with --channel-unit sentence)")
    ap.add_argument("--max-candidates", type=int, default=8,
                    help="paragraphs (or sentences, --unit) per example, the gold one included")
    ap.add_argument("--max-clause-tokens", type=int, default=768, help="a paragraph is cut to its first N tokens "
                                                                       "(as the decoder reads it)")
    ap.add_argument("--quantize", choices=("nf4", "none"), default="nf4", help="the frozen base: NF4 or as loaded")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute each decoder block in backward (less memory, about a third more compute)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="auto: fp32 on the CPU, bf16/fp16 on a GPU; bf16 is fast on CPUs with AMX")
    ap.add_argument("--eval-every", type=int, default=0, help="channel evaluation on --eval-split every N steps "
                                                              "and at the end (0: never)")
    ap.add_argument("--save-every", type=int, default=0, help="also save OUT/checkpoints/step-N/adapter")
    ap.add_argument("--init-adapter", default=None, help="start from this adapter (an earlier run's adapter/ or "
                    "checkpoints/step-N/adapter; its rank must equal --lora-r) instead of fresh LoRA; the optimizer "
                    "and schedule start afresh: use another --seed for a new data order")
    ap.add_argument("--hard-negatives", default=None, metavar="EVAL_JSON",
                    help="an engine.evaluate --decode channel eval.json of --split (from the adapter given to "
                         "--init-adapter): training takes the examples it holds, and a share (--hard-share) of "
                         "each one's other candidates are the ones that adapter scored likeliest, the rest sampled")
    ap.add_argument("--hard-share", type=float, default=None, metavar="F",
                    help="with --hard-negatives: the share of each example's other candidates taken likeliest "
                         "first (rounded up); 0 samples them all, the control for the same examples and steps "
                         "(default: 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="LoRA init and data order")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's adapter in OUT")
    return ap


def _groups(tok, examples, args, rank: int = 0, world_size: int = 1, hard: dict | None = None):
    """The usable examples (texts, gold) in a seeded order, forever: one pass after another, reshuffled. Every
    rank draws the same global stream (same seed, same candidates); rank r builds and keeps the groups whose
    place in it is r modulo world_size, so the examples of a step do not depend on the number of processes.
    hard: hard_negatives' ranking (read from args.hard_negatives when not given)."""
    usable = [(ex, *c) for ex in examples if (c := choice_of(ex, args.unit)) is not None]
    if not usable:
        raise ValueError(f"{args.data}: no example whose answer lies within one {args.unit}")
    if args.hard_negatives:  # the examples the earlier adapter was run over, each with its hardest candidates
        hard = hard if hard is not None else hard_negatives(args.hard_negatives, examples, args.unit)
        n = len(usable)
        usable = [u for u in usable if u[0].id in hard]
        if rank == 0:
            print(f"hard negatives: training on the {len(usable)} of {n} usable examples that "
                  f"{args.hard_negatives} holds", file=sys.stderr)
    else:
        hard = {}
    rng = random.Random(args.seed)
    k = 0
    while True:
        order = list(range(len(usable)))
        rng.shuffle(order)
        for i in order:
            ex, texts, gold = usable[i]
            cands = candidate_order(len(texts), gold, args.max_candidates, rng, hard.get(ex.id),
                                    0.5 if args.hard_share is None else args.hard_share)
            if k % world_size == rank:
                yield _group(tok, ex, texts, gold, cands, args.max_clause_tokens)
            k += 1


def _evaluate(model, tok, eval_ex, prec, unit: str = "paragraph") -> dict:
    with prec.autocast():
        res = evaluate_examples(model, tok, eval_ex, decode="channel", unit=unit, max_new_tokens=1,
                                seq_len=min(model.config.max_position_embeddings, DEFAULT_SEQ_LEN))
    c, n = res["clause"], res["none"]
    return {"eval_clause_avg_similarity": c["avg_similarity"], "eval_clause_right_start": c["right_start"],
            "eval_clause_wrongly_none": c["predicted_none"], "eval_none_answered_none": n["predicted_none"]}


def run(args) -> dict:
    for name in ("max_steps", "groups_per_step", "lora_r", "max_candidates", "max_clause_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    for name in ("warmup_steps", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.hard_share is not None and not args.hard_negatives:
        raise ValueError("--hard-share needs --hard-negatives EVAL.json (the candidates it ranks)")
    if args.hard_share is None:
        args.hard_share = 0.5
    if not 0.0 <= args.hard_share <= 1.0:  # also refuses nan
        raise ValueError(f"--hard-share must be between 0 and 1, got {args.hard_share}")
    out = Path(args.out)
    cfg = TrainConfig(model=args.model, data=args.data, lr=args.lr, warmup_steps=args.warmup_steps,
                      max_steps=args.max_steps, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                      quantize=args.quantize, precision=args.precision, checkpointing=args.checkpointing,
                      seed=args.seed, overwrite=args.overwrite)
    d = dist.init(args.device)  # torchrun's process group, or none with one process
    try:
        if args.groups_per_step % d.world_size:
            raise ValueError(f"--groups-per-step {args.groups_per_step} must be a multiple of the number of "
                             f"processes ({d.world_size}): each takes the same share of a step")
        guard = RunDir(out)
        if d.is_main:
            guard.lock()  # the user's run directory, as engine.train treats it: one writer, no silent overwrite
        try:
            return _train(args, cfg, out, guard, d)
        finally:
            guard.release()
    finally:
        dist.teardown()


def _train(args, cfg: TrainConfig, out: Path, guard: RunDir, d: dist.Dist) -> dict:
    try:
        # every rank reads OUT; nobody writes before the barrier below
        guard.check_start(cfg, resume=False, resumable=False)
        set_threads(args.threads)
        device = d.device
        train_ex, rep = load_validated(args.data, args.split)
        eval_ex = load_validated(args.data, args.eval_split)[0] if args.eval_every and d.is_main else []
        if args.eval_every and d.is_main and not eval_ex:
            raise ValueError(f"{args.data}: split {args.eval_split!r} has no usable examples for --eval-every; "
                             "pass another --eval-split or --eval-every 0")
        # read now, before the model loads: a wrong file is one line, not an error at the first step
        hard = hard_negatives(args.hard_negatives, train_ex, args.unit) if args.hard_negatives else None
        tok = load_tokenizer(args.model)
        prec = Precision(cfg.precision, device)
        dist.seed_all(args.seed)  # the same LoRA init on every rank
        model = load_model(args.model, dtype=prec.param_dtype, device=device,
                           quantize=None if args.quantize == "none" else args.quantize)
        prepare_model(model, cfg, device)
        if args.init_adapter:
            load_adapter(model, args.init_adapter)  # into the LoRA layers just made; keys and shapes checked
        params = [p for p in model.parameters() if p.requires_grad]
        loss_model = ChannelLoss(model)
        step = TrainStep(dist.wrap_ddp(loss_model), params, make_optimizer(cfg, params, device), prec,
                         grad_clip=cfg.grad_clip, world_size=d.world_size)
        groups = _groups(tok, train_ex, args, d.rank, d.world_size, hard)
    except BaseException:
        guard.abandon()  # a refused or failed start leaves OUT as it was
        raise
    dist.barrier()
    local = args.groups_per_step // d.world_size
    metrics = None
    t0 = time.perf_counter()
    try:
        if d.is_main:
            if args.overwrite:
                guard.clear_for_overwrite()
            guard.fresh_start = True  # until a step is logged, OUT holds nothing a step produced
            atomic_write_text(out / "config.json",
                              json.dumps({**vars(args), "processes": d.world_size}, indent=1) + "\n")
            print(f"channel training on {len(train_ex)} {args.split} examples of {args.data} ({rep.rejected} "
                  f"rejected), {args.max_steps} steps x {args.groups_per_step} examples ({d.world_size} processes), "
                  f"precision {prec.mode}", file=sys.stderr)
            metrics = open(out / "metrics.jsonl", "w")
        for s in range(args.max_steps):
            batch = [{k: v.to(device) for k, v in next(groups).items()} for _ in range(local)]
            loss_model.hits = loss_model.calls = 0
            r = step(batch, s, lr=lr_at(s, cfg, args.max_steps))
            hits, calls = dist.all_reduce_sum(torch.tensor([loss_model.hits, loss_model.calls],
                                                           dtype=torch.float64)).tolist()
            row = {"step": s + 1, "loss": r.loss, "train_acc": hits / calls, "lr": lr_at(s, cfg, args.max_steps),
                   "grad_norm": r.grad_norm, "seconds": round(time.perf_counter() - t0, 1)}
            if args.eval_every and ((s + 1) % args.eval_every == 0 or s + 1 == args.max_steps):
                if d.is_main:  # the others wait at the barrier
                    row.update(_evaluate(model, tok, eval_ex, prec, args.unit))
                dist.barrier()
            if d.is_main:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                guard.fresh_start = False
                print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      file=sys.stderr, flush=True)
                if args.save_every and (s + 1) % args.save_every == 0:
                    save_adapter(model, out / "checkpoints" / f"step-{s + 1}" / "adapter", base_model=args.model)
    except BaseException:
        guard.discard_unfinished_start()  # failed in its first step (as engine.train): the same command runs again
        guard.abandon()
        raise
    finally:
        if metrics is not None:
            metrics.close()
    if d.is_main:  # the adapters are the same on every rank (DDP averages the gradients)
        save_adapter(model, out / "adapter", base_model=args.model)
        print(f"wrote {out / 'adapter'}")
    dist.barrier()
    return {"steps": args.max_steps}


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
