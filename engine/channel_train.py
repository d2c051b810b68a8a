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
CHANNEL_NULL) is the decision trained, with one difference: training scores at most --max-candidates units of a
context (8 by default) against CHANNEL_NULL, while the decoder weighs every unit of a window (a median 21 CUAD
sentences), so on NONE contexts the best of more units beats CHANNEL_NULL more often than training saw. Where
that matters, engine.calibrate fits the NONE rule on held-out rows (the README's calib recipes).

The step is engine.step's TrainStep (optimizer, schedule, loss scaling, clipping) on the same NF4 + LoRA model
engine.train builds; only the loss (ChannelLoss) and the batches (one example's candidates per micro-batch)
differ. It runs in one process or under torchrun (DDP over the adapters; rank r takes every r-th example of
one seeded stream, so a step holds the same examples whatever the number of processes) and writes OUT/adapter
(PEFT layout), OUT/metrics.jsonl, OUT/config.json and, with --save-every or when SIGTERM/SIGINT stops it,
OUT/checkpoints/step-N (engine.checkpoint's: adapter/ to evaluate, and the weights, optimizer, loss scale, RNG
and data position from which --resume continues exactly). --config takes the flags from a TOML recipe
(configs/*channel*.toml); --init-adapter starts from a saved adapter with a fresh optimizer and schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.validate import load_validated
from engine import checkpoint as ckpt
from engine import dist
from engine.cli import THREADS_HELP, CliParser, parse_with_config, preflight_boundary, set_threads
from engine.config import ConfigError, TrainConfig
from engine.evaluate import DEFAULT_SEQ_LEN, eval_subset, evaluate_examples, read_eval_json
from engine.loss import LOSS_CHUNK, LinearCrossEntropy, matmul_dtype
from engine.memory import log_ledger, out_of_memory_gist
from engine.metrics import is_none
from engine.precision import Precision
from engine.rundir import RunDir, append_metrics
from engine.step import TrainStep, check_device_tools, lr_at, make_optimizer, peak_memory_bytes, prepare_model
from model import load_model, load_tokenizer
from model.adapter import check_adapter, load_adapter, save_adapter
from model.channel import CHANNEL_NULL, IGNORE, UNITS, channel_batch, longest_channel_row, units
from model.files import atomic_write_text
from model.load import EMBEDDED, check_model


class ChannelLoss(torch.nn.Module):
    """Cross-entropy of the gold choice over one example's channel scores (its paragraphs, then CHANNEL_NULL).
    The call signature is engine.loss.CausalLMLoss's, so TrainStep drives it unchanged; loss_weights only set
    TrainStep's normalisation (they sum to 1 per example: the step's loss is the mean over its examples).
    The scores are model.channel.query_logprobs', computed as engine.train's loss is (LinearCrossEntropy: lm_head
    over the query's tokens only, in chunks, no logits kept for backward), so the memory ledger's loss rows for
    the row's supervised tokens are this step's too."""

    def __init__(self, model, chunk: int = LOSS_CHUNK):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.hits = self.calls = 0  # examples whose gold choice scored highest (before the step): train accuracy

    def scores(self, input_ids, labels, position_ids, segment_ids) -> torch.Tensor:
        """(n_candidates,): log p(query | candidate) per segment of the packed row, differentiable."""
        h = self.model.hidden(input_ids, position_ids=position_ids, segment_ids=segment_ids)  # (1, T, H)
        target = labels[:, 1:]
        where = target != IGNORE
        assert type(self.model.lm_head) is torch.nn.Linear and self.model.lm_head.bias is None
        w = self.model.lm_head.weight
        ce = LinearCrossEntropy.apply(h[:, :-1][where], w, target[where], self.chunk, matmul_dtype(h.device, w),
                                      None, True)  # (N,) per query token
        n = int(segment_ids.max()) + 1
        return torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, segment_ids[:, 1:][where], -ce)

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None, loss_weights=None, choice=None):
        assert choice is not None and segment_ids is not None, "one example's channel_batch per micro-batch"
        scores = self.scores(input_ids, labels, position_ids, segment_ids)  # (n_candidates,)
        self.hits += int(int(scores.detach().argmax()) == int(choice))
        self.calls += 1
        return F.cross_entropy(scores[None], choice.view(1), reduction="sum")


def choice_of(ex, unit: str = "paragraph") -> tuple[list[str], int] | None:
    """(candidate texts: the context's paragraphs, or sentences (model.channel.units), then CHANNEL_NULL; index
    of the gold one) or None when the answer spans two paragraphs (the decoder could not quote it). An answer
    running over several sentences (24% of CUAD's) has the sentence it begins in as its gold one; the others it
    runs over are not wrong either (placed's right units)."""
    found = placed(ex, unit)
    return None if found is None else (found[0], found[1])


def placed(ex, unit: str = "paragraph") -> tuple[list[str], int, frozenset[int]] | None:
    """choice_of's (texts, gold) and the units that are no wrong answer though not the gold one, which
    candidate_order never offers as negatives (training would teach that a right answer is wrong): every unit
    that overlaps an occurrence of the answer (the sentences after the first of an answer running over several;
    the answer again elsewhere in the contract, as on 145 CUAD examples) and every unit whose text is the gold
    one's up to whitespace (a clause repeated word for word). Empty for NONE examples. None as for choice_of."""
    spans = units(ex.context, unit)
    texts = [ex.context[a:b] for a, b in spans] + [CHANNEL_NULL]
    if is_none(ex.answer):
        return texts, len(spans), frozenset()
    answer = ex.answer.strip()
    at = ex.context.find(answer)
    assert at >= 0, f"{ex.id}: validated answers are in their context"
    inside = [i for i, (a, b) in enumerate(spans) if a <= at and at + len(answer) <= b]
    if not inside and unit == "sentence":
        inside = [i for i, (a, b) in enumerate(spans) if a <= at < b]
    if not inside:
        return None
    gold = inside[0]
    occurrences, o = [], at
    while o >= 0:
        occurrences.append(o)
        o = ex.context.find(answer, o + 1)
    same = texts[gold].split()
    right = {i for i, (a, b) in enumerate(spans)
             if any(a < o + len(answer) and o < b for o in occurrences) or texts[i].split() == same}
    return texts, gold, frozenset(right - {gold})


def candidate_order(n_texts: int, gold: int, max_candidates: int, rng: random.Random,
                    hard: list[int] | None = None, share: float = 0.5,
                    right: frozenset[int] = frozenset()) -> list[int]:
    """Indices into an example's texts: at most max_candidates paragraphs (the gold one kept, others sampled)
    in a shuffled order, then CHANNEL_NULL (the last text). hard: the example's paragraphs, likeliest first under
    an earlier adapter (hard_negatives); then a share of the others (rounded up; half by default) are the
    likeliest wrong ones, the rest sampled (all hard would also pick the contract's other passages of the same
    clause type, right answers marked wrong). share 0 samples them all, as without hard. right: units that are
    no wrong answer (placed), never among the others, sampled or hard; they are left out of the list sampled
    from, so an example without any draws exactly what it drew before they were (the same seed, the same
    groups), and one with some draws from fewer."""
    assert 0.0 <= share <= 1.0, share
    paras, null = list(range(n_texts - 1)), n_texts - 1
    others = [i for i in paras if i != gold and i not in right]
    n = min(len(others), max_candidates - (gold != null))
    if hard:
        hardest = [i for i in hard if i != gold and i not in right]
        top = hardest[:math.ceil(round(n * share, 9))]  # 25 x 0.28 is 7, not 7.000...1
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
    d = read_eval_json(path, "hard negatives")
    if d.get("decode") != "channel" or (d.get("channel_unit") or "paragraph") != unit:
        raise ValueError(f"{path}: --hard-negatives needs an eval.json of engine.evaluate --decode channel "
                         f"--channel-unit {unit}; this one is decode {d.get('decode')!r}, unit "
                         f"{d.get('channel_unit')!r}")
    by_id = {ex.id: ex for ex in examples}
    rows = d.get("rows", [])
    if not isinstance(rows, list):
        raise ValueError(f"{path}: 'rows' is not a list; pass an eval.json written by engine.evaluate --decode channel")
    out = {}
    for i, row in enumerate(rows):
        windows = row.get("windows", 1) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("channel") or {}, dict) \
                or not isinstance(windows, int) or isinstance(windows, bool):
            raise ValueError(f"{path}: rows[{i}] is not a row of engine.evaluate --decode channel (an object with "
                             "'id', a 'channel' object and a 'windows' count); pass the eval.json it wrote")
        ex, scores = by_id.get(row.get("id")), (row.get("channel") or {}).get("scores")
        if isinstance(scores, list) and not all(isinstance(x, int | float) and not isinstance(x, bool)
                                                for x in scores):
            raise ValueError(f"{path}: rows[{i}] holds channel scores that are not numbers; pass the eval.json "
                             "engine.evaluate --decode channel wrote")
        if ex is None or not isinstance(scores, list) or windows != 1:
            continue
        if len(scores) == len(units(ex.context, unit)):
            out[ex.id] = sorted(range(len(scores)), key=lambda i: -scores[i])
    if not out:
        raise ValueError(f"{path}: no row matches an example of --split with its units' scores; pass an eval.json "
                         "run on the split trained on")
    return out


def make_group(tok, ex, texts: list[str], gold: int, max_candidates: int, max_clause_tokens: int,
               rng: random.Random, right: frozenset[int] = frozenset()) -> dict:
    """One micro-batch: candidate_order's paragraphs and CHANNEL_NULL as one packed channel_batch; choice is
    where the gold one ended up. right: placed's units that are no wrong answer, never among the others."""
    order = candidate_order(len(texts), gold, max_candidates, rng, right=right)
    return _group(tok, ex, texts, gold, order, max_clause_tokens)


def _group(tok, ex, texts: list[str], gold: int, order: list[int], max_clause_tokens: int) -> dict:
    b = channel_batch(tok, [texts[i] for i in order], ex.query, max_clause_tokens)
    w = (b["labels"] != IGNORE).float()
    return {**b, "loss_weights": w / w.sum(), "choice": torch.tensor(order.index(gold))}


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.channel_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, metavar="FILE.toml",
                    help="a recipe: TOML whose keys are these flags spelled with underscores (max_steps = 410); "
                         "flags on the command line override it (configs/*_channel*.toml)")
    ap.add_argument("--model", default=EMBEDDED, help="HF dir, hub id, .gguf or smollm2-135m")
    ap.add_argument("--data", default=None, help="acord:DIR, cuad:DIR or jsonl:FILE (required, here or in --config)")
    ap.add_argument("--split", default="train", help="split to train on; fit leaves the calib part of train out, for "
                    "engine.calibrate to fit the NONE rule on queries never trained on")
    ap.add_argument("--eval-split", default="valid", help="split for the periodic channel evaluation")
    ap.add_argument("--out", default=None, help="output directory (required, here or in --config)")
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
    ap.add_argument("--eval-limit", type=int, default=200,
                    help="--eval-every evaluates N examples of --eval-split, a fixed category-balanced subset "
                         "(engine.evaluate's --limit; 0: all). Rank 0 evaluates while the other processes wait "
                         "(engine.dist.COLLECTIVE_TIMEOUT: an hour)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="write OUT/checkpoints/step-N every N steps: step-N/adapter to evaluate, and the optimizer, "
                         "loss scale and data position for --resume (a SIGTERM or Ctrl-C writes one too)")
    ap.add_argument("--keep-last", type=int, default=0, help="checkpoints kept, the newest (0: all of them)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in OUT from its newest checkpoint, exactly as if it had not stopped (its "
                         "settings must be the saved ones, except --max-steps, --save-every, --keep-last, "
                         "--eval-every, --eval-split, --threads, --device, --init-adapter)")
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
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (cuda when available), cpu or cuda")  # engine.train's choices
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's adapter in OUT")
    return ap


def usable_examples(examples, unit: str, hard: dict | None = None) -> tuple[list[tuple], dict[str, int]]:
    """(ex, texts, gold, right) of every example training can use (placed), in the given order, and how many of
    the others were left out, by reason: an answer over two paragraphs (the decoder quotes one), or, with hard
    (hard_negatives' ranking), an example the --hard-negatives file does not hold."""
    usable, left = [], {}
    for ex in examples:
        found = placed(ex, unit)
        if found is None:
            why = f"answer not within one {unit}" + (" (the decoder quotes one)" if unit == "paragraph" else "")
        elif hard is not None and ex.id not in hard:
            why = "not ranked in --hard-negatives"  # not there, read in several windows, or other units
        else:
            usable.append((ex, *found))
            continue
        left[why] = left.get(why, 0) + 1
    return usable, left


def _groups(tok, examples, args, rank: int = 0, world_size: int = 1, hard: dict | None = None, skip: int = 0,
            usable: list | None = None):
    """The usable examples (texts, gold) in a seeded order, forever: one pass after another, reshuffled. Every
    rank draws the same global stream (same seed, same candidates); rank r builds and keeps the groups whose
    place in it is r modulo world_size, so the examples of a step do not depend on the number of processes.
    hard: hard_negatives' ranking (read from args.hard_negatives when not given). skip: groups of the stream
    already trained on (a resumed run): drawn, so the generator is where it was, but not built. usable:
    usable_examples' list when the caller has it. The examples are placed (and an unusable set refused) now,
    not at the first group: the returned generator only draws."""
    if args.hard_negatives:  # the examples the earlier adapter was run over, each with its hardest candidates
        hard = hard if hard is not None else hard_negatives(args.hard_negatives, examples, args.unit)
    else:
        hard = None
    if usable is None:
        usable = usable_examples(examples, args.unit, hard)[0]
    if not usable:
        raise ValueError(f"{args.data}: no example whose answer lies within one {args.unit}"
                         + (f" among those {args.hard_negatives} holds" if hard is not None else ""))
    return _stream(tok, usable, args, rank, world_size, hard or {}, skip)


def _stream(tok, usable: list, args, rank: int, world_size: int, hard: dict, skip: int):
    """_groups' generator. Its random draws depend only on --seed and the usable examples (their right units
    included, fixed before the first draw), never on the rank or on skip: a resumed run draws the same stream."""
    rng = random.Random(args.seed)
    k = 0
    while True:
        order = list(range(len(usable)))
        rng.shuffle(order)
        for i in order:
            ex, texts, gold, right = usable[i]
            cands = candidate_order(len(texts), gold, args.max_candidates, rng, hard.get(ex.id),
                                    0.5 if args.hard_share is None else args.hard_share, right)
            if k >= skip and k % world_size == rank:
                yield _group(tok, ex, texts, gold, cands, args.max_clause_tokens)
            k += 1


def _left_out_note(left: dict[str, int], args) -> str:
    """The banner's account of usable_examples' left-out examples: "none left out", or "2 left out: 1 answer not
    within one paragraph (the decoder quotes one), 1 not ranked in --hard-negatives FILE"."""
    if not left:
        return "none left out"
    whys = [f"{n} {why}{' ' + str(args.hard_negatives) if why == 'not ranked in --hard-negatives' else ''}"
            for why, n in left.items()]
    return f"{sum(left.values())} left out: {', '.join(whys)}"


def _evaluate(model, tok, eval_ex, prec, unit: str = "paragraph") -> dict:
    with prec.autocast():
        res = evaluate_examples(model, tok, eval_ex, decode="channel", unit=unit, max_new_tokens=1,
                                seq_len=min(model.config.max_position_embeddings, DEFAULT_SEQ_LEN))
    c, n = res["clause"], res["none"]
    return {"eval_clause_avg_similarity": c["avg_similarity"], "eval_clause_right_start": c["right_start"],
            "eval_clause_wrongly_none": c["predicted_none"], "eval_none_answered_none": n["predicted_none"]}


# Flags a --resume may change: how long the run goes on and how it reports and saves, never what a step computes.
RESUMABLE = {"max_steps", "out", "config", "resume", "overwrite", "save_every", "keep_last", "eval_every",
             "eval_split", "eval_limit", "threads", "device",
             "precision",  # as written ("auto"); the mode it resolves to must be the checkpoint's (engine.checkpoint)
             "init_adapter"}  # the weights a run started from: a resumed run reads its own from the checkpoint


def check_args(args) -> TrainConfig:
    """Every flag's value checked before anything loads (ConfigError, one line, exit 2); the TrainConfig that
    engine.step builds the model and optimizer from."""
    for name in ("data", "out"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required (on the command line or as {name} in --config)")
    for name in ("max_steps", "groups_per_step", "lora_r", "max_candidates", "max_clause_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    for name in ("warmup_steps", "eval_every", "eval_limit", "save_every", "keep_last"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    if args.hard_share is not None and not args.hard_negatives:
        raise ConfigError("--hard-share needs --hard-negatives EVAL.json (the candidates it ranks)")
    if args.hard_share is not None and not 0.0 <= args.hard_share <= 1.0:  # also refuses nan
        raise ConfigError(f"--hard-share must be between 0 and 1, got {args.hard_share}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    return TrainConfig(model=args.model, data=args.data, lr=args.lr, warmup_steps=args.warmup_steps,
                       max_steps=args.max_steps, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                       quantize=args.quantize, precision=args.precision, checkpointing=args.checkpointing,
                       seed=args.seed, overwrite=args.overwrite, resume=args.resume)


def _settings(args) -> dict:
    """What OUT/config.json holds: every flag (the saved run a --resume is checked against), --hard-share as
    the value used (0.5 when not given, as earlier runs recorded it)."""
    return {**vars(args), "hard_share": 0.5 if args.hard_share is None else args.hard_share}


def _check_start(guard: RunDir, cfg: TrainConfig, args, resume: bool) -> None:
    guard.check_start(cfg, resume, settings=_settings(args), may_differ=RESUMABLE)


def preflight(argv: list[str]) -> int:
    """What ./launch.sh --channel runs once, in one process, before torchrun starts N of them: the flags, the run
    directory, --model, the data, --hard-negatives and --init-adapter are checked here, so a mistake is one line of
    error instead of N copies inside torchrun's report. 0 when all is well, else 2 (usage) or 1, after one line."""
    args = parse_with_config(build_parser(), argv)

    def check():
        cfg = check_args(args)
        _check_start(RunDir(args.out), cfg, args, args.resume)
        if args.resume:
            ckpt.check_resumable(args.out)
        check_device_tools(cfg, "cuda" if dist.uses_cuda(args.device) else "cpu")  # NF4 needs bitsandbytes' CUDA
        check_model(args.model)  # config.json and the weights' file names (a hub id: its config.json), no weights
        examples = load_validated(args.data, args.split)[0]
        _eval_examples(args)
        if args.hard_negatives:
            hard_negatives(args.hard_negatives, examples, args.unit)
        if args.init_adapter and not (args.resume and ckpt.latest(Path(args.out))):
            _check_init_adapter(args)

    return preflight_boundary(check)


def _eval_examples(args) -> tuple[list, int]:
    """(the --eval-split examples --eval-every evaluates: --eval-limit of them, chosen by engine.evaluate's
    eval_subset, the same at every evaluation of the run; how many the split holds). None without --eval-every;
    an empty split is refused."""
    if not args.eval_every:
        return [], 0
    found = load_validated(args.data, args.eval_split)[0]
    if not found:
        raise ValueError(f"{args.data}: split {args.eval_split!r} has no usable examples for --eval-every; pass "
                         "another --eval-split or --eval-every 0")
    return eval_subset(found, args.eval_limit or None), len(found)


def _check_init_adapter(args) -> None:
    a = check_adapter(args.init_adapter)
    if int(a["r"]) != args.lora_r:
        raise ConfigError(f"--init-adapter {args.init_adapter} has rank {a['r']}; pass --lora-r {a['r']}")


def run(args, stop: ckpt.StopFlag | None = None) -> dict:
    cfg = check_args(args)
    stop = stop or ckpt.StopFlag()
    out = Path(args.out)
    d = dist.init(args.device)  # torchrun's process group, or none with one process
    try:
        if args.groups_per_step % d.world_size:
            raise ValueError(f"--groups-per-step {args.groups_per_step} must be a multiple of the number of "
                             f"processes ({d.world_size}): each takes the same share of a step")
        guard = RunDir(out)
        if d.is_main:
            guard.lock()  # the user's run directory, as engine.train treats it: one writer, no silent overwrite
        try:
            return _train(args, cfg, out, guard, d, stop)
        finally:
            guard.release()
    finally:
        dist.teardown()


def _train(args, cfg: TrainConfig, out: Path, guard: RunDir, d: dist.Dist, stop: ckpt.StopFlag) -> dict:
    # ./launch.sh or torchrun --max-restarts: a restarted worker group continues from the newest checkpoint
    resume = args.resume or guard.continues_after_restart()
    try:
        # every rank reads OUT; nobody writes before the barrier below
        _check_start(guard, cfg, args, resume)
        resume_from = ckpt.latest(out) if resume else None
        if args.resume:
            ckpt.check_resumable(out)
        set_threads(args.threads)
        device = d.device
        check_device_tools(cfg, device)  # now, not after the model has loaded and its first forward has failed
        train_ex, rep = load_validated(args.data, args.split)
        eval_ex, eval_of = _eval_examples(args)  # on every rank: a refusal on rank 0 alone would leave the others
        # waiting; read now, before the model loads: a wrong file is one line, not an error at the first step
        hard = hard_negatives(args.hard_negatives, train_ex, args.unit) if args.hard_negatives else None
        usable, left_out = usable_examples(train_ex, args.unit, hard)
        if args.init_adapter and resume_from is None:
            _check_init_adapter(args)
        tok = load_tokenizer(args.model)
        prec = Precision(cfg.precision, device)
        dist.seed_all(args.seed)  # the same LoRA init on every rank
        model = load_model(args.model, dtype=prec.param_dtype, device=device,
                           quantize=None if args.quantize == "none" else args.quantize)
        prepare_model(model, cfg, device)
        if args.init_adapter and resume_from is None:  # a resumed run's weights come from its checkpoint
            load_adapter(model, args.init_adapter)  # into the LoRA layers just made; keys and shapes checked
        params = [p for p in model.parameters() if p.requires_grad]
        loss_model = ChannelLoss(model)
        opt = make_optimizer(cfg, params, device)
        step = TrainStep(dist.wrap_ddp(loss_model), params, opt, prec, grad_clip=cfg.grad_clip,
                         world_size=d.world_size)
        # the checkpoint is read before anything is written: one that does not read leaves OUT as it was
        state = ckpt.load(resume_from, model=model, optimizer=opt, precision=prec) if resume_from else None
        start = state["step"] if state else 0
        if state:
            assert state["sampler"]["groups"] == start * args.groups_per_step, state["sampler"]
            if args.max_steps < start:
                raise ConfigError(f"--max-steps {args.max_steps} ends before {resume_from} (step {start}); resume "
                                  f"with --max-steps {start} or more")
        groups = _groups(tok, train_ex, args, d.rank, d.world_size, hard, skip=start * args.groups_per_step,
                         usable=usable)
        if d.is_main:
            _log_ledger(model, cfg, prec, tok, train_ex, args)
    except BaseException:
        guard.abandon()  # a refused or failed start leaves OUT as it was
        raise
    dist.barrier()
    local = args.groups_per_step // d.world_size
    metrics = None
    t0 = time.perf_counter()
    metrics_path = out / "metrics.jsonl"

    def save_checkpoint(n: int) -> Path:
        return ckpt.save(out, n, model=model, optimizer=opt, precision=prec,
                         sampler_state={"groups": n * args.groups_per_step}, counters={},
                         keep_last=args.keep_last or 2**31, base_model=args.model, save_adapter=save_adapter)

    s, stopped = start, False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_mem_bytes: the steps', not the model load's
    try:
        if d.is_main:
            if args.overwrite and not state:  # (a restart of an --overwrite run resumes its own checkpoint)
                guard.clear_for_overwrite()
            ckpt.remove_partial(out)
            atomic_write_text(out / "config.json",
                              json.dumps({**_settings(args), "processes": d.world_size}, indent=1) + "\n")
            guard.mark_started()
            if state:  # drop the lines of steps after the checkpoint: they are redone
                ckpt.drop_metrics_after(metrics_path, start)
            else:
                guard.fresh_start = not args.resume  # until a step is logged, OUT holds nothing a step produced
            print(f"channel training on {len(usable)} of {len(train_ex)} {args.split} examples of {args.data} "
                  f"({_left_out_note(left_out, args)}; {rep.rejected} rejected by the validator), {args.max_steps} "
                  f"steps x {args.groups_per_step} examples ({d.world_size} processes), precision {prec.mode}",
                  file=sys.stderr)
            if eval_ex:
                print(f"--eval-every {args.eval_every}: evaluating {len(eval_ex)} of the {eval_of} {args.eval_split} "
                      f"examples" + ("" if len(eval_ex) == eval_of else " (--eval-limit; 0: all)"), file=sys.stderr)
            if state:
                print(f"resumed from {ckpt.ckpt_root(out) / f'step-{start}'} at step {start}", file=sys.stderr)
            elif resume:
                print(f"{'--resume' if args.resume else 'restart'}: no checkpoint in {out}/checkpoints, starting from "
                      "step 0", file=sys.stderr)
            metrics = open(metrics_path, "a" if state else "w")
        for s in range(start, args.max_steps):
            batch = [{k: v.to(device) for k, v in next(groups).items()} for _ in range(local)]
            loss_model.hits = loss_model.calls = 0
            lr = lr_at(s - prec.overflows, cfg, args.max_steps)  # steps taken: a skipped one moves no schedule
            r = step(batch, s, lr=lr)
            # one small all-reduce: the choices right, and whether any rank got SIGTERM/SIGINT (all stop together)
            hits, calls, stops = dist.all_reduce_sum(torch.tensor(
                [loss_model.hits, loss_model.calls, float(stop.requested)], dtype=torch.float64)).tolist()
            row = {"step": s + 1, "loss": r.loss, "train_acc": hits / calls, "lr": lr,
                   "grad_norm": r.grad_norm, "seconds": round(time.perf_counter() - t0, 1),
                   "peak_mem_bytes": peak_memory_bytes(device), "overflow": r.overflow}  # a skipped step, any mode
            if args.eval_every and ((s + 1) % args.eval_every == 0 or s + 1 == args.max_steps):
                if d.is_main:  # the others wait at the barrier
                    row.update(_evaluate(model, tok, eval_ex, prec, args.unit))
                dist.barrier()
            if d.is_main:
                append_metrics(metrics, row, out)  # strict JSON: an overflow step's inf norm is null
                guard.fresh_start = False
                print(" | ".join(f"peak {v / 2**30:.2f} GiB" if k == "peak_mem_bytes" else
                                 f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      file=sys.stderr, flush=True)
            if stops and s + 1 < args.max_steps:  # (a signal during the last step lets the run finish)
                path = save_checkpoint(s + 1)
                if d.is_main:
                    print(f"stopped by signal after step {s + 1}; checkpoint {path}; continue with --resume",
                          file=sys.stderr)
                stopped = True
                break
            if args.save_every and (s + 1) % args.save_every == 0:
                save_checkpoint(s + 1)
    except BaseException:
        guard.discard_unfinished_start()  # failed in its first step (as engine.train): the same command runs again
        guard.abandon()
        raise
    finally:
        if metrics is not None:
            metrics.close()
    if not stopped:
        if d.is_main:  # the adapters are the same on every rank (DDP averages the gradients)
            try:
                save_adapter(model, out / "adapter", base_model=args.model)
            except OSError as e:
                raise ckpt.write_failed(out, e, "the trained adapter was not saved") from None
            print(f"wrote {out / 'adapter'}")
        if args.save_every and args.max_steps % args.save_every:
            save_checkpoint(args.max_steps)  # the final state, so a --resume with a larger --max-steps continues
        dist.barrier()
    return {"steps": args.max_steps, "stopped": stopped, "signal": stop.signum}


def _log_ledger(model, cfg: TrainConfig, prec: Precision, tok, examples, args) -> None:
    """The memory ledger (engine.memory) for the longest row these examples can make (model.channel.
    longest_channel_row: the step holding it has the run's peak), beside the bytes the model holds. Informational:
    a failure here never stops training."""
    try:
        cache: dict = {}
        rows = [longest_channel_row(tok, e.context, e.query, args.unit, args.max_candidates, args.max_clause_tokens,
                                    cache) for e in examples]
        tokens, supervised = max(r[0] for r in rows), max(r[1] for r in rows)
        log_ledger(model, dataclasses.replace(cfg, seq_len=tokens, batch_size=1, pack=True), prec.mode,
                   next(model.parameters()).device.type, log=lambda t: print(t, file=sys.stderr),
                   supervised=supervised, what=f"at this data's longest row, {tokens} tokens, with the most query "
                                               f"tokens of any row, {supervised} (an upper bound)")
    except Exception as e:  # noqa: BLE001 (a ledger bug must not cost a training run)
        print(f"warning: memory ledger unavailable ({type(e).__name__}: {e})", file=sys.stderr)


def out_of_memory_advice(e: BaseException) -> str:
    """One line for a GPU out-of-memory error: torch's gist and what lowers a channel step's peak."""
    return (f"out of GPU memory ({out_of_memory_gist(e)}); the memory ledger printed at the start predicts the "
            "peak of this data's longest row: lower it with a smaller --max-candidates or --max-clause-tokens, "
            "or --checkpointing (python -m data.check SPEC --tokenizer SRC --channel UNIT prints the longest row, "
            "python -m engine.memory its peak)")


def main(argv=None) -> int:
    """The command: exit status 0, 1 (an error, one line), 2 (usage), or 128 + signal after a SIGTERM or Ctrl-C
    stopped the run at a checkpoint (a second signal, 2 s or more after the first, stops it at once; the
    checkpoint being written is rolled back, the one before stays)."""
    args = parse_with_config(build_parser(), argv)
    stop = ckpt.StopFlag().install()
    try:
        result = run(args, stop)
    except SystemExit as e:  # a second signal, raised by StopFlag wherever the main thread was
        print(f"error: {ckpt.interrupted_message(args.out)}", file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    except ConfigError as e:  # a usage error: a flag, a run directory, a resume that does not match
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # the user-facing boundary, as data.cli.run_command: one line (CLAUSELORA_DEBUG=1: all)
        if os.environ.get("CLAUSELORA_DEBUG"):
            raise
        msg = out_of_memory_advice(e) if isinstance(e, torch.OutOfMemoryError) else ' '.join(str(e).split())
        print(f"error: {msg or type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        stop.uninstall()
    return 128 + result["signal"] if result["stopped"] else 0


if __name__ == "__main__":
    dist.exit_worker(main())  # under torchrun: os._exit, past a gloo shutdown race (engine.dist.exit_worker)
