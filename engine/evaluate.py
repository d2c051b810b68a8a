"""Measure the task itself: greedy extraction over a split, scored against the lawyers' clauses.

    python -m engine.evaluate --model SRC [--adapter DIR] --data SPEC [--split test] [--limit N] --out DIR

Writes OUT/eval.json (run facts, aggregates overall / per category / per source, clause and NONE examples apart,
one row per example) and OUT/report.md (+ PNG plots when matplotlib is installed); says so, and records it, when
the adapter trained on the split it scores (not held out). `--compare BEFORE/eval.json` prints the
metric | before | after | change table. Loss does not predict extraction quality; this does.

For the trainer: `eval_subset(examples, n)` picks a fixed, category-balanced subset once, and
`evaluate_for_training(model, tok, subset, ...)` returns flat `eval_*` numbers for metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from data import load_source
from data.example import render_prompt, splits_overlap, stable_hash
from data.text import make_windows
from data.validate import validate
from engine.cli import THREADS_HELP, CliParser, run_command, set_threads
from engine.metrics import KINDS, is_none, score, summarize
from engine.precision import INFERENCE_MODES, inference_dtype
from engine.report import (_pyplot, decoding_note, print_results, read_metrics_jsonl, same_data, same_examples_note,
                           setting_notes, write_report)
from engine.rundir import adapter_run_config, learned_decoding, trained_split
from model import load_adapter, load_model, load_tokenizer
from model.adapter import AdapterBank
from model.files import check_writable, staged_files
from model.channel import UNITS, ChannelRule, channel_answer
from model.generate import Answer, decode_span
from model.load import EMBEDDED

DECODES = ("constrained", "rank", "free", "channel")
DEFAULT_SEQ_LEN = 8192  # tokens per window when the model reads more (Llama 3.2: 131,072; memory grows with it)

METRIC_NOTES = {
    "similarity": "rapidfuzz.fuzz.ratio (0-100) on whitespace-normalised text (case-sensitive)",
    "exact_match": "whitespace-normalised strings identical (percent of examples)",
    "f1": "SQuAD v1.1 token F1 (lowercase, no punctuation/articles), percent",
    "excellent": "percent of examples with similarity > 90",
    "good": "percent of examples with similarity > 70",
    "right_start": "percent of clause examples whose quote begins where the gold clause begins, or before it by a "
                   "list number only ('2. ', '(a) ')",
    "abstention": "NONE is the positive class: precision tp/(tp+fp), recall tp/(tp+fn), percent; null = undefined",
}


# ---- choosing examples -------------------------------------------------------------------------------------
def eval_subset(examples: list, n: int | None, salt: str = "eval") -> list:
    """A deterministic subset of n examples, round-robin over categories so a small n still covers many.

    Within a category the order is a stable hash of the id (the same on every machine and run), and the
    categories take turns in a hashed order, so n smaller than the number of categories is not "the
    alphabetically first ones". The result keeps the input order. n None or >= len -> everything.
    """
    if n is None or n >= len(examples):
        return list(examples)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.category, []).append(i)
    for idx in groups.values():
        idx.sort(key=lambda i: stable_hash(salt, examples[i].id))
    order = sorted(groups, key=lambda c: stable_hash(salt, "category", c))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for c in order:
            if depth < len(groups[c]):
                picked.append(groups[c][depth])
                if len(picked) == n:
                    break
        depth += 1
    return [examples[i] for i in sorted(picked)]


def prompt_windows(tok, ex, budget: int) -> list[tuple[int, int]]:
    """[start, end) character windows of ex.context whose prompts each fit `budget` tokens (chat template
    included), built from the query and the context alone: the gold answer never shapes what the model is shown.

    One window, the whole context, whenever it fits (SmolLM2 reads 8,192 tokens: every ACORD context fits whole).
    Otherwise overlapping windows cut at whitespace (engine.extract.make_windows, as for a long contract); the
    answers of all windows are combined by answer_example.
    """
    if len(tok.encode(tok.chat_prompt(render_prompt(ex)))) <= budget:
        return [(0, len(ex.context))]
    overhead = len(tok.encode(tok.chat_prompt(render_prompt(replace(ex, context=""))))) + 8  # + edge merges
    if budget - overhead < 64:
        raise ValueError(f"a prompt budget of {budget} tokens leaves {budget - overhead} for the contract; raise "
                         "--seq-len or lower --max-new-tokens")
    return make_windows(ex.context, lambda text: len(tok.encode(text)), budget - overhead)


def focuser(model, tok, bank: AdapterBank, ex, max_new_tokens: int):
    """channel_answer's focus stage for example ex: bank's "focus" adapter copies, constrained, the part of the
    chosen unit that answers ex's query, prompted as ex itself is (its template and query, the unit as the
    context: what data.focus trains on); None (quote the unit whole) when it answers NONE. The channel adapter is
    back in place when it returns. Its attribute truncated says whether its last copy reached max_new_tokens
    with no stop token (channel_focused carries that onto the answer)."""
    def focus(text: str):
        with bank.using("focus"):
            ans = decode_span(model, tok, render_prompt(replace(ex, context=text)), text,
                              max_new_tokens=max_new_tokens)
        focus.truncated = ans.truncated
        return None if ans.start is None else (ans.start, ans.end)
    focus.truncated = False
    return focus


def channel_focused(model, tok, query: str, context: str, rule: ChannelRule | None, unit: str, trim) -> Answer:
    """model.channel.channel_answer, marked truncated when its focus stage (trim, a focuser) cut the quote at
    --max-new-tokens: the unit itself is quoted whole, so only a trim can be cut short."""
    if trim is not None:
        trim.truncated = False
    ans = channel_answer(model, tok, query, context, rule, unit, trim)
    return mark_focus_cut(ans, trim)


def mark_focus_cut(ans: Answer, trim) -> Answer:
    """ans with truncated set when its quote is trim's copy (detail "focus") and that copy was cut short."""
    if trim is not None and (ans.detail or {}).get("focus") is not None and getattr(trim, "truncated", False):
        ans.truncated = True
    return ans


def answer_budget(decode: str, max_new_tokens: int, focus: bool = False) -> int:
    """Tokens a window's prompt must leave for its answer: none for --decode channel, which generates nothing
    there (it scores the query after each unit, in prompts of their own), else --max-new-tokens. With a
    --focus-adapter the chosen unit (up to a whole window) is copied from in a prompt of its own, which then needs
    that room too."""
    return 0 if decode == "channel" and not focus else max_new_tokens


def read_rule(path, unit: str, adapter: str | None, model: str | None) -> ChannelRule:
    """--channel-rule's ChannelRule, checked against the run it is used in: a rule calibrated on another
    --channel-unit is refused (its features' scales, per query token over sentences or over paragraphs, are the
    unit's); one calibrated on another adapter or model is used with a warning on stderr (the adapter may have
    moved; calibrate again if it is another). A rule file written before engine.calibrate recorded the unit
    is accepted as it is."""
    rule = ChannelRule.from_file(path)  # a missing or malformed file: its own one-line error
    cal = json.loads(Path(path).read_text(encoding="utf-8")).get("calibration")
    if not isinstance(cal, dict):
        return rule
    if cal.get("channel_unit") not in (None, unit):
        raise ValueError(f"{path}: the rule was calibrated on --channel-unit {cal['channel_unit']} rows and this run "
                         f"quotes {unit}s; its feature scales are the unit's: pass --channel-unit "
                         f"{cal['channel_unit']}, or calibrate a rule on an eval.json of --channel-unit {unit}")
    for what, theirs, mine in (("adapter", cal.get("adapter"), adapter), ("model", cal.get("model"), model)):
        if what in cal and not _same_source(theirs, mine):
            print(f"warning: {path} was calibrated with {what} {theirs or 'none'} and this run reads "
                  f"{mine or 'none'}: its NONE threshold may not fit this {what}'s scores (calibrate again on an "
                  "eval.json of this run if it is another)", file=sys.stderr)
    return rule


def _same_source(a, b) -> bool:
    """Whether two --model/--adapter values name the same thing: equal, or paths to the same directory."""
    if a == b:
        return True
    if not a or not b:
        return False
    pa, pb = Path(str(a)), Path(str(b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def run_model_source(model: str | None, adapter: str | None) -> str:
    """The model a run reads, as load_for_eval resolves it (and eval.json records it) without loading it."""
    return model or (_base_of_adapter(adapter) if adapter else None) or EMBEDDED


def load_focus(model, focus_adapter: str, main_adapter: str | None) -> AdapterBank:
    """An AdapterBank holding the loaded model's adapter (or none) as "main" and focus_adapter as "focus"; both
    must be for the same base model."""
    base = _base_of_adapter(focus_adapter, "--focus-adapter")
    main_base = _base_of_adapter(main_adapter) if main_adapter else None
    if main_base and base and base != main_base:
        raise ValueError(f"--focus-adapter {focus_adapter} was trained on {base}, --adapter {main_adapter} on "
                         f"{main_base}; train the focus adapter on the same base model")
    return AdapterBank(model).add("focus", focus_adapter)


def answer_example(model, tok, ex, *, seq_len: int, max_new_tokens: int, decode: str = "constrained",
                   rule: ChannelRule | None = None, unit: str = "paragraph", focus: AdapterBank | None = None) -> dict:
    """Answer one example from its query and context alone: each window decoded greedily (decode_span); when
    several windows quote something, the quote with the highest mean log-probability wins; all NONE -> NONE.
    Returns prediction, start/end (character offsets into ex.context, None for NONE or a free-text answer),
    logprob, windows, prompt_tokens (of the first window) and tokens generated; with decode "channel" also
    channel: the winning window's paragraph (or, unit "sentence", sentence) scores and NONE features (rule decides
    NONE; engine.calibrate). focus (decode "channel"): an AdapterBank with a "focus" adapter that trims the chosen
    unit to the clause (focuser; the row's channel detail then says what it kept)."""
    windows = prompt_windows(tok, ex, seq_len - answer_budget(decode, max_new_tokens, focus is not None))
    best, n_prompt, n_tokens = None, None, 0
    trim = focuser(model, tok, focus, ex, max_new_tokens) if focus is not None else None
    for a, b in windows:
        prompt = render_prompt(replace(ex, context=ex.context[a:b]))
        if decode == "channel":  # the paragraph that best explains the query, whole (model.generate.channel_answer)
            ans = channel_focused(model, tok, ex.query, ex.context[a:b], rule, unit, trim)
            ans.prompt_tokens = len(tok.encode(tok.chat_prompt(prompt)))
        else:
            ans = decode_span(model, tok, prompt, ex.context[a:b], max_new_tokens=max_new_tokens,
                              constrained=decode != "free", rank=decode == "rank")
        n_prompt = n_prompt or ans.prompt_tokens
        n_tokens += ans.tokens
        quoted = not is_none(ans.text)
        key = (quoted, ans.logprob)  # any quote beats NONE; among quotes, the model's most confident
        if best is None or key > best[0]:
            best = (key, ans, a)
    _, ans, a = best
    start = None if ans.start is None else a + ans.start
    end = None if ans.end is None else a + ans.end
    row = {"prediction": ans.text, "start": start, "end": end, "logprob": round(ans.logprob, 4),
           "windows": len(windows), "prompt_tokens": n_prompt, "tokens": n_tokens,
           "truncated": bool(ans.truncated)}  # cut at max_new_tokens with no stop token (a focus copy, for channel)
    if ans.detail is not None:  # channel: offsets made relative to the whole context, like start/end
        row["channel"] = {**ans.detail, "best": [a + x for x in ans.detail["best"]]}
        if ans.detail.get("focus") is not None:
            row["channel"]["focus"] = [a + x for x in ans.detail["focus"]]
    return row


# ---- running the model -------------------------------------------------------------------------------------
class Progress:
    """One status line: done/total, examples/s, ETA. Rewritten in place on a terminal, a line per update otherwise."""

    def __init__(self, total: int, label: str = "eval", stream=None, enabled: bool = True, unit: str = "examples"):
        stream = sys.stderr if stream is None else stream
        self.total, self.label, self.stream, self.enabled, self.unit = total, label, stream, enabled, unit
        self.t0 = time.perf_counter()
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        line = f"{self.label} {done}/{self.total} {self.unit} | {rate:.2f}/s | {dt:.0f}s elapsed | ETA {eta}"
        end = "" if self.tty and done < self.total else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def evaluate_examples(model, tok, examples: list, *, max_new_tokens: int = 1024, seq_len: int = 8192,
                      decode: str = "constrained", rule: ChannelRule | None = None, unit: str = "paragraph",
                      focus: AdapterBank | None = None, progress: bool = False) -> dict:
    """Answer every example (answer_example) and score it -> {"overall", "clause", "none", "by_category",
    "by_source", "rows"}.

    seq_len: tokens the model reads per window, prompt + answer; a prompt gets seq_len - answer_budget (the
    whole seq_len for channel decoding without a focus stage, else seq_len - max_new_tokens).
    decode: "constrained" (every answer a verbatim slice of its context, or NONE), "rank" (constrained, the start
    chosen among paragraph starts and NONE by the log-probability of their first tokens) or "free" (plain greedy).
    The model is put in eval mode for the call and restored after (the trainer calls this mid-run).
    """
    assert decode in DECODES, decode
    rows = []
    bar = Progress(len(examples), enabled=progress)
    bar.update(0)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, ex in enumerate(examples):
                r = answer_example(model, tok, ex, seq_len=seq_len, max_new_tokens=max_new_tokens, decode=decode,
                                   rule=rule, unit=unit, focus=focus)
                rows.append({"id": ex.id, "category": ex.category, "source": ex.source, "query": ex.query,
                             "answer": ex.answer, **r,
                             "scores": score(r["prediction"], ex.answer, ex.context, r["start"])})
                bar.update(i + 1)
    finally:
        model.train(was_training)
    return {**summarize(rows), "truncated": sum(r["truncated"] for r in rows), "rows": rows}


def evaluate_for_training(model, tok, subset: list, *, max_new_tokens: int = 256, seq_len: int = 8192,
                          decode: str = "rank") -> dict:
    """Flat numbers for one metrics.jsonl line: eval_n, eval_avg_similarity, ... over all examples, then
    eval_clause_* and eval_none_* for the two kinds apart (a collapse to NONE shows as eval_clause_predicted_none
    rising), eval_seconds. Rank decoding, answers capped at max_new_tokens (an early warning, not the headline:
    engine.evaluate gives that).

    Call on rank 0 with the unwrapped model and a subset chosen once with eval_subset (so every eval of a run
    scores the same examples). report.plot_loss draws eval_avg_similarity beside the loss.
    """
    t0 = time.perf_counter()
    res = evaluate_examples(model, tok, subset, max_new_tokens=max_new_tokens, seq_len=seq_len, decode=decode)
    out = {f"eval_{k}": v for k, v in res["overall"].items()}
    for kind_ in KINDS:
        out.update({f"eval_{kind_}_{k}": v for k, v in res[kind_].items()})
    out["eval_seconds"] = time.perf_counter() - t0
    return out


# ---- the command -------------------------------------------------------------------------------------------
def _base_of_adapter(adapter: str, flag: str = "--adapter") -> str | None:
    """The adapter's base_model_name_or_path; a relative path (older adapters) that is not there from the cwd is
    taken relative to the adapter directory when it exists there. flag: the option that named it, for errors."""
    cfg = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or None
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{cfg} not found: {flag} must be a PEFT adapter directory "
                                "(the adapter/ folder of a training run)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: malformed JSON at line {e.lineno} ({e.msg}); {flag} must be a PEFT adapter "
                         "directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: does not read ({e}); {flag} must be a PEFT adapter directory") from None
    if isinstance(base, str) and not Path(base).exists() and (Path(adapter) / base).exists():
        return str(Path(adapter) / base)
    return base


PRECISION_HELP = ("dtype the model answers in: auto = bf16 on a GPU with bf16 (fp16 below sm 80); on the CPU bf16 "
                  "where it multiplies bf16 natively (AMX / AVX-512 BF16: ~2.8x faster), fp32 otherwise")


def _device_and_dtype(device: str, precision: str = "auto"):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is visible; use --device cpu")
    return device, inference_dtype(precision, device)


def load_for_eval(model_src: str | None, adapter: str | None, *, device: str = "auto", quantize=None,
                  precision: str = "auto"):
    """(model, tokenizer, resolved model source). Without --model, an adapter's base model is used."""
    if model_src is None and adapter:
        model_src = _base_of_adapter(adapter)
    device, dtype = _device_and_dtype(device, precision)
    model = load_model(model_src, dtype=dtype, device=device, quantize=quantize)
    tok = load_tokenizer(model_src)
    if adapter:
        _base_of_adapter(adapter)  # a clear error for a wrong directory before load_adapter's own
        load_adapter(model, adapter)
    return model, tok, model_src or EMBEDDED


def adapter_training(adapter: str | None, depth: int = 0) -> dict | None:
    """{config, data, split} of the run an adapter came from (engine.rundir.adapter_run_config), or None where
    there is no adapter or no config; with "before": the same for the adapter that run started from
    (--init-adapter), and so on back: a continued adapter has seen what every run before it trained on."""
    found = adapter_run_config(adapter) if adapter else None
    if found is None:
        return None
    cfg, c = found
    out = {"config": str(cfg), "data": c.get("data"), "split": trained_split(c)}
    before = adapter_training(c["init_adapter"], depth + 1) if c.get("init_adapter") and depth < 16 else None
    return {**out, "before": before} if before else out


def trainings(trained: dict | None):
    """The runs of an adapter_training chain, newest first."""
    while trained:
        yield trained
        trained = trained.get("before")


def not_held_out_note(trained: dict | None, flag: str, adapter: str, data: str, split: str) -> str | None:
    """A line when a run of adapter_training's chain trained on data's split (or a split holding it, or one it
    holds: splits_overlap), so that the evaluation scores examples the adapter has seen; else None."""
    for t in trainings(trained):
        if same_data(t["data"], data) and splits_overlap(t["split"], split):
            return (f"{flag} {adapter} trained on split {t['split']!r} of {t['data']} ({t['config']}), which shares "
                    f"examples with the {split!r} split scored here")
    return None


# How to make the eval.json a command lacks, by what it is to that command (read_eval_json's role)
MAKE_EVAL_JSON = {
    "baseline": "run engine.evaluate without the adapter first, e.g. --out runs/before",
    "calibration": "run engine.evaluate --adapter ADAPTER --data DATA --split calib --decode channel --out DIR "
                   "first: it writes DIR/eval.json",
    "--check": "engine.evaluate --adapter ADAPTER --data DATA --split test --decode channel --out DIR writes "
             "DIR/eval.json",
    "hard negatives": "run engine.evaluate --adapter ADAPTER --data DATA --split fit --decode channel --out DIR "
                      "first: it writes DIR/eval.json",
}


def read_eval_json(path, role: str = "baseline") -> dict:
    """An eval.json engine.evaluate wrote, checked for its 'overall' aggregates. role: what the file is to the
    command ("baseline": --compare's; MAKE_EVAL_JSON says how to make each kind when it is missing)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        how = MAKE_EVAL_JSON.get(role, "engine.evaluate --out DIR writes DIR/eval.json")
        raise FileNotFoundError(f"{p}: {role} eval.json not found ({how})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: malformed JSON at line {e.lineno} ({e.msg}); pass an eval.json written by "
                         "engine.evaluate") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: does not read ({e}); pass an eval.json written by engine.evaluate") from None
    if not isinstance(d, dict) or not isinstance(d.get("overall"), dict):
        raise ValueError(f"{p}: no 'overall' aggregates; pass an eval.json written by engine.evaluate")
    return d


def read_baseline(path, role: str = "baseline") -> dict:
    """--compare's eval.json: read_eval_json's, and every row scored (the before/after histogram reads them)."""
    p, d = Path(path), read_eval_json(path, role)
    rows = d.get("rows", [])
    for i, row in enumerate(rows if isinstance(rows, list) else [None]):
        if not (isinstance(row, dict) and isinstance(row.get("answer"), str) and isinstance(row.get("scores"), dict)
                and isinstance(row["scores"].get("similarity"), int | float)):
            raise ValueError(f"{p}: rows[{i}] lacks 'answer' or 'scores.similarity'; pass an eval.json written by "
                             "engine.evaluate")
    return d


def choose_decoding(args) -> None:
    """args.decode and args.channel_unit when the command line left them out: an adapter trained by
    engine.channel_train answers with the decision it learned (--decode channel, its --unit; a note on stderr
    says so), anything else constrained over paragraphs. Then the flags that only channel decoding reads are
    refused without it."""
    learned = learned_decoding(args.adapter)
    explicit_unit = args.channel_unit is not None
    if args.decode is None:
        args.decode = "constrained"
        if args.adapter and (Path(args.adapter) / "adapter_config.json").is_file() \
                and adapter_run_config(args.adapter) is None:  # (a wrong --adapter is refused on its own)
            print(f"note: no run config.json beside {args.adapter} (the trainers write one) says how it was "
                  "trained: reading with --decode constrained; pass --decode channel for an engine.channel_train "
                  "adapter", file=sys.stderr)
        elif learned:
            args.decode = "channel"
            print(f"note: --decode channel --channel-unit {args.channel_unit or learned[1]}: {args.adapter} was "
                  "trained by engine.channel_train (pass --decode to choose another)", file=sys.stderr)
    if args.channel_unit is None:
        args.channel_unit = learned[1] if learned and args.decode == "channel" else "paragraph"
    if args.channel_rule and args.decode != "channel":
        raise ValueError("--channel-rule decides NONE for --decode channel; add --decode channel or drop it")
    if explicit_unit and args.decode != "channel":
        raise ValueError("--channel-unit is what --decode channel quotes; add --decode channel or drop it")
    if getattr(args, "focus_adapter", None) and args.decode != "channel":  # (engine.demo has no focus stage)
        raise ValueError("--focus-adapter trims what --decode channel quotes; add --decode channel or drop it")


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_model_args(adapter_required=False)
    ap.add_argument("--data", required=True, help="acord:DIR, cuad:DIR, jsonl:FILE or synthetic")
    ap.add_argument("--split", default="test", help="train, valid or test; fit and calib are the two parts of train "
                    "(calib: 1/8 of its queries or contracts, held out for engine.calibrate)")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate N examples, a deterministic category-balanced subset (default: all)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="accepted for compatibility; examples are decoded one at a time (copy-ahead decoding "
                         "verifies up to 16 tokens per forward pass instead)")
    ap.add_argument("--decode", choices=DECODES, default=None,
                    help="constrained: every answer is a verbatim slice of its context (or NONE), decided on the "
                         "text; rank: constrained, starting at the paragraph (or NONE) whose first 16 tokens the model "
                         "finds likeliest; free: plain greedy decoding; channel: the whole paragraph under which "
                         "the query is likeliest (noisy channel), NONE when none beats an empty clause (default: "
                         "channel for an --adapter trained by engine.channel_train, else constrained)")
    ap.add_argument("--channel-unit", choices=tuple(UNITS), default=None,
                    help="with --decode channel: what it quotes: whole paragraphs (ACORD's clauses) or sentences "
                         "(CUAD's annotated spans) (default: the --unit an engine.channel_train adapter was trained "
                         "with, else paragraph)")
    ap.add_argument("--channel-rule", default=None, metavar="RULE_JSON",
                    help="with --decode channel: when to answer NONE, as fitted by python -m engine.calibrate on "
                         "training-split queries (default: NONE only when no paragraph beats an empty clause)")
    ap.add_argument("--focus-adapter", default=None, metavar="DIR",
                    help="with --decode channel: a second adapter (engine.train on python -m data.focus output) "
                         "that copies the clause out of the chosen sentence or paragraph, instead of quoting it whole "
                         "(CUAD marks dates, names and sentence parts); same base model, rank and targets as "
                         "--adapter")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per answer")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens the model reads per window, prompt + answer; a context whose prompt does not fit "
                         "is read in overlapping windows, never cut with the help of the answer (default: the "
                         f"model's context length, at most {DEFAULT_SEQ_LEN})")
    ap.add_argument("--quantize", choices=("none", "nf4"), default="none",
                    help="load the base in NF4 (as QLoRA trained it) or full precision")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--precision", choices=INFERENCE_MODES, default="auto", help=PRECISION_HELP)
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--metrics", default=None, help="a training run's metrics.jsonl: adds the loss curve")
    ap.add_argument("--compare", default=None, metavar="BASELINE_EVAL_JSON",
                    help="eval.json of a baseline run: prints metric | before | after | change")
    ap.add_argument("--out", required=True, help="output directory for eval.json, report.md and plots")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    return ap


def run(args) -> dict:
    for name in ("limit", "batch_size", "max_new_tokens", "seq_len", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.metrics and not Path(args.metrics).is_file():
        raise FileNotFoundError(f"{args.metrics}: metrics.jsonl not found (a training run writes OUT/metrics.jsonl)")
    if args.metrics:
        read_metrics_jsonl(args.metrics)  # now, not after the evaluation: a file that does not read is one line
    set_threads(args.threads)
    choose_decoding(args)
    # channel decoding generates nothing after a window (a focus stage does, from the unit it chose)
    room = answer_budget(args.decode, args.max_new_tokens, bool(getattr(args, "focus_adapter", None)))
    if args.seq_len is not None and args.seq_len <= room + 64:
        raise ValueError(f"--seq-len {args.seq_len} leaves no room for a prompt"
                         + (f" beside --max-new-tokens {args.max_new_tokens}; raise --seq-len or lower "
                            "--max-new-tokens" if room else "; raise --seq-len"))
    rule = read_rule(args.channel_rule, args.channel_unit, args.adapter, run_model_source(args.model, args.adapter)) \
        if args.channel_rule else None
    baseline = read_baseline(args.compare) if args.compare else None
    # a wrong --adapter or --focus-adapter is one line now, before the data and the model load
    adapters = {flag: a for flag, a in (("--adapter", args.adapter), ("--focus-adapter", args.focus_adapter)) if a}
    for flag, a in adapters.items():
        _base_of_adapter(a, flag)
    # an adapter that trained on the examples scored here: said, not refused (hard-negative mining scores the
    # training split on purpose), and recorded in eval.json and report.md
    trained = {flag: adapter_training(a) for flag, a in adapters.items()}
    not_held_out = [n for flag, a in adapters.items()
                    if (n := not_held_out_note(trained[flag], flag, a, args.data, args.split))]
    for note in not_held_out:
        print(f"warning: {note}: the figures are not held out (evaluate a split it never trained on, e.g. "
              "--split test, for ones that are)", file=sys.stderr)
    out = Path(args.out)
    check_writable(out)  # before the evaluation, not after it

    # the same checked examples training sees: answers repaired to the context's own text, unfindable ones dropped
    loaded, notes = load_source(args.data, args.split)
    examples, rep = validate(loaded, args.data, notes)
    if not examples:
        raise ValueError(f"{args.data}: no usable examples in split {args.split!r}")
    if rep.rejected and not args.quiet:
        print(f"note: {rep.rejected} of {rep.examples} examples dropped (answer not found in its context; "
              f"python -m data.check {args.data} lists them)", file=sys.stderr)
    subset = eval_subset(examples, args.limit)
    if baseline is not None:  # now, before the model loads: the user may want to stop here
        budgets = {"max_new_tokens": args.max_new_tokens, "decode": args.decode,
                   "focus_adapter": args.focus_adapter}
        for note in (same_examples_note(baseline, {ex.id: ex.answer for ex in subset}, args.data, args.split),
                     decoding_note(baseline, args.decode, args.channel_unit), *setting_notes(baseline, budgets)):
            if note:
                print(f"note: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    model, tok, model_src = load_for_eval(args.model, args.adapter, device=args.device, precision=args.precision,
                                          quantize=None if args.quantize == "none" else args.quantize)
    bank = load_focus(model, args.focus_adapter, args.adapter) if args.focus_adapter else None
    load_s = time.perf_counter() - t0
    if args.seq_len is None:
        args.seq_len = min(model.config.max_position_embeddings, DEFAULT_SEQ_LEN)
    for note in setting_notes(baseline, {"seq_len": args.seq_len}) if baseline is not None else []:
        print(f"note: {note}", file=sys.stderr)
    if not args.quiet:
        print(f"evaluating {len(subset)} of {len(examples)} {args.split} examples from {args.data} "
              f"with {model_src}{' + ' + args.adapter if args.adapter else ''} (loaded in {load_s:.1f}s)",
              file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    res = evaluate_examples(model, tok, subset, max_new_tokens=args.max_new_tokens, seq_len=args.seq_len,
                            decode=args.decode, rule=rule, unit=args.channel_unit, focus=bank,
                            progress=not args.quiet)
    seconds = time.perf_counter() - t1
    result = {
        "model": model_src, "adapter": args.adapter, "data": args.data, "split": args.split,
        "limit": args.limit, "n_available": len(examples), "n_rejected": rep.rejected, "seq_len": args.seq_len,
        "max_new_tokens": args.max_new_tokens, "decode": args.decode, "quantize": args.quantize,
        "channel_rule": None if args.decode != "channel" else {"file": args.channel_rule,
                                                               **(rule or ChannelRule()).to_dict()},
        "channel_unit": args.channel_unit if args.decode == "channel" else None,
        "focus_adapter": args.focus_adapter,
        # what the adapters trained on (adapter_training: data, split, config, and the runs before), and where
        # that is the split scored here, the lines report.md shows
        "adapter_trained_on": trained.get("--adapter"), "focus_adapter_trained_on": trained.get("--focus-adapter"),
        "not_held_out": not_held_out,
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "examples_per_s": round(len(subset) / seconds, 3) if seconds > 0 else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": args.compare, "metrics_jsonl": args.metrics, "definitions": METRIC_NOTES, **res,
    }
    try:
        with staged_files(out) as tmp:  # report.md, the PNGs and eval.json land together or not at all
            write_report(result, tmp, metrics_jsonl=args.metrics, baseline=baseline)
            (tmp / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    except OSError:  # a disk that filled during the run: the results are still shown before the one-line error
        print_results(result, baseline)
        raise
    if _pyplot() is None:
        print("note: report.md has tables only: matplotlib is not installed (pip install -e '.[plot]')",
              file=sys.stderr)
    print_results(result, baseline)
    if res["truncated"]:  # said once the files are written: a run that fails says only why
        print(f"warning: {res['truncated']} answer(s) cut at --max-new-tokens {args.max_new_tokens} (rows' "
              "\"truncated\"); raise it to score whole clauses", file=sys.stderr)
    print(f"wrote {out / 'eval.json'} and {out / 'report.md'}")
    return result


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
