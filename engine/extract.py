"""Find one clause in a contract file and quote it verbatim, with its character offsets in the file.

    python -m engine.extract --model SRC [--adapter DIR] --contract FILE [FILE ...] --clause NAME [--json]

A contract longer than the model's budget is read in overlapping windows (each one prompt, same templates as
training); every window's answer that is not NONE is located in the contract. The quote is always a slice of
the file: when the generation is not verbatim (changed whitespace, a dropped word) it is snapped to the
best-matching span (rapidfuzz.fuzz.partial_ratio_alignment on whitespace-normalised text, then widened to word
boundaries) and the match score (fuzz.ratio, 0-100) is reported. The model reads the contract with CRLF and CR
line endings made LF (the text it was trained on, which constrained decoding copies byte for byte); offsets are
Python character indices into the file decoded as UTF-8, and the quote is the file's own slice, its line endings
as in the file. A quote whose answer reached --max-new-tokens before the model ended it is flagged truncated.
Several contracts (files, or directories standing for their *.txt files; "-" for standard input) are read with
the model loaded once; --json then prints one object per line.

--decode channel quotes whole units of the contract (model.channel.units: the paragraphs or sentences
engine.evaluate measured with): each window is widened to the units its edges cut, and a window that touches a
single unit reads instead the lines (else sentences) of it that it touches (channel_windows). A unit is scored on
its first MAX_CLAUSE_TOKENS tokens only: a quote of a longer one is warned about on stderr.
"""
from __future__ import annotations

import argparse
import bisect
import errno
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.cli import THREADS_HELP, CliParser, run_command, set_threads
from data.cuad import CATEGORIES, DEFAULT_EXCLUDE
from data.example import TEMPLATES, Example, render_prompt
from data.text import Match, locate, make_windows
from engine.evaluate import (PRECISION_HELP, Progress, _base_of_adapter, answer_budget, choose_decoding, focuser,
                             load_focus, load_for_eval, mark_focus_cut, read_rule, run_model_source)
from engine.precision import INFERENCE_MODES
from engine.rundir import adapter_run_config, learned_decoding, trained_split
from engine.metrics import is_none
from model.files import WriteError
from model.channel import (MAX_CLAUSE_TOKENS, UNITS, ChannelRule, channel_answer, channel_answers, finer,
                           units)
from model.generate import Answer, decode_span, decode_spans, generate

ALL_CATEGORIES = tuple(c for c in CATEGORIES if c not in DEFAULT_EXCLUDE)


@dataclass(frozen=True)
class Quote(Match):
    """A clause found in the contract: where (start, end: text[start:end] is the quote), how closely the model
    copied it (score: fuzz.ratio of the whitespace-normalised generation and the quote, 0-100; how/verbatim:
    "exact" when the generation occurs in the contract character for character), and where it came from. The
    score says how exactly the model copied text, not whether that text is the right clause."""
    generated: str      # what the model wrote
    window: int         # index of the window that produced it
    # the model's confidence: the mean log-probability of its answer; for a channel quote its unit's gain per
    # query token (model.channel.channel_features), which --json calls "gain" (its "logprob" is then null)
    logprob: float | None = None
    truncated: bool = False  # the answer reached --max-new-tokens with no stop token: the clause may go on
    channel: bool = False  # chosen by the channel decoder

    def as_dict(self, text: str) -> dict:
        confidence = {"logprob": None, "gain": self.logprob} if self.channel else {"logprob": self.logprob}
        return {"start": self.start, "end": self.end, "text": text[self.start:self.end], "score": self.score,
                "copy_score": self.score, "verbatim": self.verbatim, **confidence,
                "truncated": self.truncated, "generated": self.generated, "window": self.window}


def _chosen_by_channel(ans) -> bool:
    """Whether an answer is model.channel's (its detail holds the NONE decision's features)."""
    return isinstance(getattr(ans, "detail", None), dict) and "features" in ans.detail


_CR = re.compile(r"\r\n?")


def to_lf(text: str) -> tuple[str, list[int]]:
    """text with CRLF and lone CR line endings made LF, and the map back: for every offset 0..len of the result,
    the file's offset of the same place (the LF of a CRLF maps to its CR, so a quote that ends before it ends
    before the CR too)."""
    out, where, last = [], [], 0
    for m in _CR.finditer(text):
        out.append(text[last:m.start()] + "\n")
        where.extend(range(last, m.start() + 1))
        last = m.end()
    out.append(text[last:])
    where.extend(range(last, len(text) + 1))
    return "".join(out), where


def in_file(q: Quote, where: list[int]) -> Quote:
    """A quote found in to_lf's text, its offsets moved to the file's."""
    return replace(q, start=where[q.start], end=where[q.end])


def read_contract(path) -> str:
    """The file ("-": standard input) as text, or a one-line OSError/ValueError naming the file and what to do."""
    p = Path(path)
    try:
        if str(path) == "-":
            p, data = "standard input", sys.stdin.buffer.read()
        else:
            data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: contract file not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{p}: is a directory; pass a plain-text contract file") from None
    except OSError as e:
        raise OSError(f"{p}: cannot read the contract ({e.strerror or type(e).__name__}); check permissions") from None
    try:
        # newline="" semantics: bytes.decode keeps \r\n, so offsets count every character of the file
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start}); convert the contract to a UTF-8 .txt file "
                         "(PDF/Word files need text extraction first)") from None
    if "\x00" in text:
        raise ValueError(f"{p}: looks binary (NUL bytes); pass a plain-text contract file")
    if not text.strip():
        raise ValueError(f"{p}: the contract file is empty")
    return text


def _asked(query: str) -> Example:
    """The example find_clause renders each window's prompt from, without its context."""
    return Example(id=f"extract:{query}", source="extract", category=query, query=query, context="", answer="",
                   split="test")


def find_clause(text: str, clause: str, answer_fn, count_tokens, max_context_tokens: int, *,
                overlap: float = 0.25, min_score: float = 60.0, log: list | None = None) -> tuple[list[Quote], int]:
    """All distinct matches (best first) and the number of windows.

    answer_fn(user messages, window texts) -> one answer per window: a model.generate.Answer whose start/end
    already give its slice of the window (constrained decoding: copy score 100 by construction), or free text (a
    string, or an Answer without start), located in the window by data.text.locate: exact, up to whitespace, else
    the closest run of whole words. An Answer's truncated flag is the quote's.
    An answer_fn with a channel_unit attribute (window_answerer's for --decode channel) quotes whole units: its
    windows are channel_windows', and it is called with each window's units as a third argument.
    log, when given, receives one dict per window: its offsets and what the model answered there."""
    windows = make_windows(text, count_tokens, max_context_tokens, overlap)
    unit = getattr(answer_fn, "channel_unit", None)
    if unit is not None:
        windows, spans = channel_windows(text, windows, unit)
    prompts = [render_prompt(replace(_asked(clause), context=text[a:b])) for a, b in windows]
    contexts = [text[a:b] for a, b in windows]
    answers = answer_fn(prompts, contexts) if unit is None else answer_fn(prompts, contexts, spans)
    if log is not None:
        log.extend({"start": a, "end": b, "answer": getattr(ans, "text", ans)} for (a, b), ans in zip(windows, answers))
    found: list[Quote] = []
    for w, ((a, b), ans) in enumerate(zip(windows, answers)):
        generated = getattr(ans, "text", ans)
        if is_none(generated):
            continue
        cut = getattr(ans, "truncated", False)
        if getattr(ans, "start", None) is not None:
            found.append(Quote(a + ans.start, a + ans.end, "exact", 100.0, generated, w, ans.logprob, cut,
                               _chosen_by_channel(ans)))
            continue
        # no cutoff inside locate: min_score is judged here, on every kind of match alike
        m = locate(generated, text[a:b], 0.0, fold=False, words=True)
        if m is not None and m.score >= min_score:
            found.append(Quote(a + m.start, a + m.end, m.how, m.score, generated, w, getattr(ans, "logprob", None),
                               cut))
    return distinct(found), len(windows)


def channel_windows(text: str, windows: list, unit: str) -> tuple[list, list]:
    """(windows, each one's units as [start, end) offsets relative to it) for the channel decoder. The units are
    the whole text's units(text, unit), exactly those engine.evaluate scored (its figures describe them), and
    each of make_windows' windows is widened to the whole units its edges cut: no window edge starts or ends a
    quote. Widening costs at most a unit at each end (a channel window's length bounds only how many units one
    forward pass scores: each is read in a prompt of its own). A window that touches a single unit (a contract
    with no blank line, a window inside a long paragraph) would leave the choice of that unit or NONE: it reads
    instead the parts of that unit it touches (model.channel.finer: its lines, else sentences), widened to them."""
    spans = units(text, unit)
    out_windows, out_spans = [], []
    for a, b in windows:
        inside = _touched(spans, a, b)
        if len(inside) == 1:
            inside = _touched(finer(text, *inside[0]), a, b)
        if inside:
            a, b = min(a, inside[0][0]), max(b, inside[-1][1])
        out_windows.append((a, b))
        out_spans.append([(s - a, e - a) for s, e in inside])
    return out_windows, out_spans


def _touched(spans: list, a: int, b: int) -> list:
    """The spans (sorted, disjoint) that a..b holds any character of."""
    starts = [s for s, _ in spans]
    i = bisect.bisect_right(starts, a) - 1  # the last span starting at or before a: is a inside it?
    i = i + 1 if i < 0 or spans[i][1] <= a else i
    return spans[i:bisect.bisect_left(starts, b)]


def distinct(found: list[Quote]) -> list[Quote]:
    """Best first (closest copy, then the model's most confident, then earliest); overlapping windows find one
    clause twice: keep the best of each span."""
    found = sorted(found, key=lambda m: (-m.score, not m.verbatim,
                                         -(m.logprob if m.logprob is not None else -1e9), m.start))
    out: list[Quote] = []
    for m in found:
        if all(m.end <= d.start or m.start >= d.end for d in out):
            out.append(m)
    return out


ALL_TEMPLATE = TEMPLATES[1]  # the contract first: every clause type's prompt then shares the contract's keys/values


def find_all(text: str, categories, answer_window, count_tokens, max_context_tokens: int, *, overlap: float = 0.25,
             progress=None) -> tuple[dict[str, list[Quote]], int]:
    """Every category over one contract in one pass over its windows. answer_window(categories, window text,
    progress) -> one model.generate.Answer per category, a slice of the window or NONE (shared_prefill_answerer,
    channel_all_answerer); progress(answers done in this window) may be passed None. An answer_window with a
    channel_unit attribute (channel_all_answerer's) reads channel_windows' windows and is given each one's units
    as a fourth argument. Returns ({category: distinct matches, best first}, number of windows)."""
    windows = make_windows(text, count_tokens, max_context_tokens, overlap)
    unit = getattr(answer_window, "channel_unit", None)
    if unit is not None:
        windows, spans = channel_windows(text, windows, unit)
    found: dict[str, list[Quote]] = {c: [] for c in categories}
    for w, (a, b) in enumerate(windows):
        done = w * len(categories)
        step = (lambda i: progress(done + i)) if progress else None
        answers = answer_window(categories, text[a:b], step) if unit is None else \
            answer_window(categories, text[a:b], step, spans[w])
        for c, ans in zip(categories, answers, strict=True):
            if ans.start is not None and not is_none(ans.text):
                found[c].append(Quote(a + ans.start, a + ans.end, "exact", 100.0, ans.text, w, ans.logprob,
                                      ans.truncated, _chosen_by_channel(ans)))
    return {c: distinct(m) for c, m in found.items()}, len(windows)


def shared_prefill_answerer(model, tok, *, max_new_tokens: int, rank: bool):
    """find_all's answer_window for constrained (rank: rank) decoding: per window, one prefill of the contract
    shared by all categories' prompts (ALL_TEMPLATE puts the contract first; model.generate.decode_spans)."""
    def answer_window(categories, window: str, progress):
        prompts = [ALL_TEMPLATE.format(query=c, context=window) for c in categories]
        with torch.inference_mode():
            return decode_spans(model, tok, prompts, window, max_new_tokens=max_new_tokens, rank=rank,
                                progress=progress)
    return answer_window


def channel_all_answerer(model, tok, *, rule: ChannelRule | None = None, unit: str = "paragraph", focus=None,
                         max_new_tokens: int = 384):
    """find_all's answer_window for channel decoding: each category's name is the query, as window_answerer asks
    it for one clause type, and each of the window's units is read once for all of them
    (model.channel.channel_answers). focus: as for window_answerer, prompted per category. Its channel_unit
    attribute asks find_all for channel_windows' windows and units."""
    def answer_window(categories, window: str, progress, spans=None):
        trims = None
        if focus is not None:
            trims = [focuser(model, tok, focus, _asked(c), max_new_tokens) for c in categories]
        with torch.inference_mode():
            answers = channel_answers(model, tok, list(categories), window, rule, unit, trims, spans)
        if trims is not None:  # a focus copy cut at max_new_tokens: each trim is asked at most once per window
            answers = [mark_focus_cut(a, t) for a, t in zip(answers, trims, strict=True)]
        if progress:
            progress(len(categories))
        return answers
    answer_window.channel_unit = unit
    return answer_window


def window_budget(tok, clause: str, seq_len: int, max_new_tokens: int) -> int:
    """Contract tokens per window: seq_len less the answer budget (0 where nothing is generated after the window's
    prompt: answer_budget) and the longest prompt around the context (clause "all": the longest category's
    shared-contract prompt). ValueError when fewer than 64 remain. tok None: the prompt is not counted, so a
    --seq-len too short for the answer alone is refused before the model (and its tokenizer) loads."""
    every = clause.strip().lower() == "all"
    longest = max(ALL_CATEGORIES, key=len) if every else clause
    empty = render_prompt(Example(id=f"extract:{longest}", source="extract", category=longest,
                                  query=longest, context="", answer="", split="test"))
    if every:
        empty = ALL_TEMPLATE.format(query=longest, context="")
    # + a margin for merges across the context's edges
    overhead = 0 if tok is None else len(tok.encode(tok.chat_prompt(empty))) + 8
    budget = seq_len - max_new_tokens - overhead
    if budget < 64:
        raise ValueError(f"--seq-len {seq_len} leaves {budget} context tokens per window after the prompt"
                         + (f" and --max-new-tokens {max_new_tokens}" if max_new_tokens else "")
                         + "; raise --seq-len" + (" or lower --max-new-tokens" if max_new_tokens else ""))
    return budget


def window_answerer(model, tok, *, decode: str = "constrained", max_new_tokens: int = 384, batch_size: int = 4,
                    quiet: bool = True, query: str | None = None, rule: ChannelRule | None = None,
                    unit: str = "paragraph", focus=None):
    """find_clause's answer_fn for a loaded model: constrained/rank answers are slices of each window, decoded
    one window at a time; free answers are greedy text, batch_size windows at a time; channel answers are the
    window's paragraph (or sentence: `unit`) under which `query` is likeliest, or NONE as `rule` decides
    (model.channel); focus (an AdapterBank with a "focus" adapter) then trims that unit to the clause
    (engine.evaluate.focuser), prompted as the window was. For channel decoding the answer_fn has a channel_unit
    attribute: find_clause then gives it channel_windows' windows and each one's units (spans)."""
    assert decode != "channel" or query, "the channel decoder scores the query itself"
    trim = focuser(model, tok, focus, _asked(query), max_new_tokens) if focus is not None else None
    def answer_fn(prompts, contexts, spans=None):
        bar = Progress(len(prompts), label="reading", enabled=not quiet, unit="windows")
        bar.update(0)
        out = []
        with torch.inference_mode():
            if decode == "free":
                for s in range(0, len(prompts), batch_size):
                    stopped = []
                    texts = generate(model, tok, prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                                     temperature=0.0, batch_size=batch_size, stopped=stopped)
                    out += [Answer(t, None, None, None, 0, 0, truncated=not e) for t, e in zip(texts, stopped,
                                                                                               strict=True)]
                    bar.update(len(out))
                return out
            for k, (prompt, ctx) in enumerate(zip(prompts, contexts)):
                if decode == "channel":  # engine.evaluate.channel_focused, over the units find_clause chose
                    if trim is not None:
                        trim.truncated = False
                    ans = channel_answer(model, tok, query, ctx, rule, unit, trim, None if spans is None else spans[k])
                    out.append(mark_focus_cut(ans, trim))
                else:
                    out.append(decode_span(model, tok, prompt, ctx, max_new_tokens=max_new_tokens,
                                           rank=decode == "rank"))
                bar.update(len(out))
        return out
    if decode == "channel":
        answer_fn.channel_unit = unit
    return answer_fn


# ---- the command -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.extract", description=__doc__.split("\n\n")[0])
    ap.add_model_args(adapter_required=False)
    ap.add_argument("--contract", required=True, nargs="+", metavar="FILE_OR_DIR",
                    help='plain-text (UTF-8) contract file(s), "-" for standard input, or a directory: its *.txt '
                         "files, in name order; with several, the model is loaded once and each contract answered "
                         "in turn (--json: one line each)")
    ap.add_argument("--clause", required=True,
                    help='clause type or query, e.g. "Governing Law"; "all": every CUAD category but Parties, '
                         "one pass over the contract's windows (each window's prefill, or with --decode channel "
                         "each of its units, shared by all categories), a table (or --json)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per window: prompt + answer")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="generation budget per window")
    ap.add_argument("--overlap", type=float, default=0.25, help="fraction of a window shared with the next")
    ap.add_argument("--batch-size", type=int, default=4, help="windows decoded together (--decode free)")
    ap.add_argument("--decode", choices=("constrained", "rank", "free", "channel"), default=None,
                    help="constrained: every answer is a verbatim slice of the contract (or NONE), decided on the "
                         "text; rank: constrained, starting at the paragraph the model finds likeliest; free: plain "
                         "greedy decoding, the answer snapped to its closest span; channel: the whole paragraph "
                         "under which the clause name is likeliest, or NONE; free not with --clause all (default: "
                         "channel for an --adapter trained by engine.channel_train, else constrained)")
    ap.add_argument("--channel-unit", choices=tuple(UNITS), default=None,
                    help="with --decode channel: what it quotes: whole paragraphs, or sentences (CUAD-style "
                         "clause spans) (default: the --unit an engine.channel_train adapter was trained with, else "
                         "paragraph)")
    ap.add_argument("--channel-rule", default=None, metavar="RULE_JSON",
                    help="with --decode channel: when to answer NONE (python -m engine.calibrate); default: NONE "
                         "when no paragraph beats an empty clause")
    ap.add_argument("--focus-adapter", default=None, metavar="DIR",
                    help="with --decode channel: a second adapter (engine.train on python -m data.focus output) "
                         "that copies the clause out of the chosen sentence or paragraph instead of quoting it whole")
    ap.add_argument("--min-score", type=float, default=60.0,
                    help="--decode free: drop answers whose closest span of the contract has a copy score (how "
                         "exactly the text was copied, 0-100) below this")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the base in NF4 or full")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--precision", choices=INFERENCE_MODES, default="auto", help=PRECISION_HELP)
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return ap


def run(args) -> dict:
    if not 0 <= args.overlap < 0.9:
        raise ValueError(f"--overlap {args.overlap}: use a fraction in [0, 0.9)")
    if not args.clause.strip():
        raise ValueError("--clause is empty; name a clause type, e.g. --clause 'Governing Law'")
    for name in ("threads", "batch_size", "max_new_tokens", "seq_len"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if not 0 <= args.min_score <= 100:
        raise ValueError(f"--min-score must be within 0-100, got {args.min_score}")
    every = args.clause.strip().lower() == "all"
    chosen_unit = args.channel_unit
    choose_decoding(args)
    learned = learned_decoding(args.adapter)
    if chosen_unit and learned and args.decode == "channel" and learned[1] != chosen_unit:
        print(f"warning: {args.adapter} was trained to choose {learned[1]}s (engine.channel_train --unit "
              f"{learned[1]}) and --channel-unit {chosen_unit} asks it to choose among {chosen_unit}s, which it "
              "was not trained on; drop --channel-unit to read with the unit it learned", file=sys.stderr)
    if every and args.decode == "free":
        raise ValueError("--clause all needs --decode constrained, rank or channel, not free (free text has no "
                         "one pass that serves every clause type)")
    answer_room = answer_budget(args.decode, args.max_new_tokens, bool(args.focus_adapter))
    window_budget(None, args.clause, args.seq_len, answer_room)  # minutes before the model would have loaded
    rule = read_rule(args.channel_rule, args.channel_unit, args.adapter, run_model_source(args.model, args.adapter)) \
        if args.channel_rule else None
    for flag, path in (("--adapter", args.adapter), ("--focus-adapter", args.focus_adapter)):
        if path:  # a wrong adapter directory is one line now, not after the model has loaded
            _base_of_adapter(path, flag)
    paths = contract_paths(args.contract)
    texts = [read_contract(p) for p in paths]  # before loading the model: a bad path fails in a second
    set_threads(args.threads)
    model, tok, _ = load_for_eval(args.model, args.adapter, device=args.device, precision=args.precision,
                                  quantize=None if args.quantize == "none" else args.quantize)
    bank = load_focus(model, args.focus_adapter, args.adapter) if args.focus_adapter else None
    if not args.json:
        for flag, path in (("adapter", args.adapter), ("focus adapter", args.focus_adapter)):
            if path:
                print(f"{flag} {path}: {adapter_provenance(path)}", file=sys.stderr)
    budget = window_budget(tok, args.clause, args.seq_len, answer_room)
    results = []
    for i, (path, text) in enumerate(zip(paths, texts)):
        if len(paths) > 1 and not args.json:
            _say(f"== {path} ({i + 1} of {len(paths)})")
        results.append((_run_all if every else _run_one)(args, path, text, model, tok, budget, rule, bank))
    return results[0] if len(results) == 1 else {"contracts": results}


def contract_paths(given: list[str]) -> list[str]:
    """The contract files named on the command line, in order, each once: a directory stands for its *.txt files
    in name order (ValueError when it holds none); "-" is standard input. Files are checked by read_contract."""
    out = []
    for g in given:
        p = Path(g)
        if g != "-" and p.is_dir():
            found = sorted(str(f) for f in p.glob("*.txt") if f.is_file())
            if not found:
                raise ValueError(f"{p}: no .txt contract files in this directory")
            out += found
        else:
            out.append(g)
    return list(dict.fromkeys(out))


def _run_one(args, path: str, text: str, model, tok, budget: int, rule=None, bank=None) -> dict:
    """One clause type in one contract: the quote (or "No NAME clause found.") or one JSON object."""
    per_window: list[dict] = []
    answer_fn = window_answerer(model, tok, decode=args.decode, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, quiet=args.quiet, query=args.clause, rule=rule,
                                unit=args.channel_unit, focus=bank)
    lf, where = to_lf(text)
    read, n_windows = find_clause(lf, args.clause, answer_fn, lambda s: len(tok.encode(s)), budget,
                                  overlap=args.overlap, min_score=args.min_score, log=per_window)
    matches = [in_file(m, where) for m in read]
    for w in per_window:
        w["start"], w["end"] = where[w["start"]], where[w["end"]]
    best = matches[0] if matches else None
    result = {"contract": path, "clause": args.clause, "found": best is not None,
              "windows": n_windows, **(best.as_dict(text) if best else {}),
              "matches": [m.as_dict(text) for m in matches], "per_window": per_window}
    if args.json:
        _say(json.dumps(result, ensure_ascii=False))
    elif best is None:
        _say(f"No {args.clause} clause found.")
    else:
        how = "verbatim" if best.verbatim else (
            "verbatim up to whitespace" if best.score == 100 else
            "not verbatim: showing the closest span of the contract")
        _say(f"{args.clause} clause, characters {best.start}-{best.end} of {path} "
              f"(copy score {best.score:.1f}, {how}; the copy score says how exactly the text was copied, not "
              "whether it is the right clause):")
        _say(text[best.start:best.end])
        if best.truncated:
            print(f"warning: the answer was cut at --max-new-tokens {args.max_new_tokens}; raise it to quote the "
                  "whole clause", file=sys.stderr)
        if len(matches) > 1:
            print(f"({len(matches) - 1} more match(es): --json lists them)", file=sys.stderr)
    n = _unread_tail(read[0], lf, tok, args) if read else 0
    if n:
        print(f"warning: the quote is {n:,} tokens long and --decode channel chose it on its first "
              f"{MAX_CLAUSE_TOKENS} only: it may hold several clauses; check where the clause begins and ends"
              f"{_shorter(args)}", file=sys.stderr)
    return result


def _unread_tail(q: Quote, lf: str, tok, args) -> int:
    """The tokens of q when it is a channel quote (a unit quoted whole: no --focus-adapter trims it) longer than
    the MAX_CLAUSE_TOKENS its prompt read (model.channel.channel_prompt_ids cuts it there), else 0."""
    if not q.channel or args.focus_adapter:
        return 0
    n = len(tok.encode(lf[q.start:q.end]))
    return n if n > MAX_CLAUSE_TOKENS else 0


def _shorter(args) -> str:
    """What makes --decode channel's quotes shorter, for a long-quote warning."""
    return "; --channel-unit sentence quotes sentences" if args.channel_unit == "paragraph" else ""


def _run_all(args, path: str, text: str, model, tok, budget: int, rule=None, bank=None) -> dict:
    """--clause all: every category, a table (category, found, offsets, first words) or one JSON object.
    Every category in one pass over the windows (find_all): constrained and rank decoding share each window's
    prefill across the categories' prompts, channel decoding each unit's prompt across the categories' queries."""
    count = lambda t: len(tok.encode(t))  # noqa: E731
    lf, where = to_lf(text)
    n_windows = len(make_windows(lf, count, budget, args.overlap))
    bar = Progress(n_windows * len(ALL_CATEGORIES), label="reading", enabled=not args.quiet,
                   unit="window x clause type answers")
    bar.update(0)
    if args.decode == "channel":
        answer_window = channel_all_answerer(model, tok, rule=rule, unit=args.channel_unit, focus=bank,
                                             max_new_tokens=args.max_new_tokens)
    else:
        answer_window = shared_prefill_answerer(model, tok, max_new_tokens=args.max_new_tokens,
                                                rank=args.decode == "rank")
    found, n_windows = find_all(lf, ALL_CATEGORIES, answer_window, count, budget, overlap=args.overlap,
                                progress=bar.update)
    clauses = {c: {"found": bool(m), **(in_file(m[0], where).as_dict(text) if m else {}), "matches": len(m)}
               for c, m in found.items()}
    result = {"contract": path, "clause": "all", "windows": n_windows, "clauses": clauses}
    long = [c for c, m in found.items() if m and _unread_tail(m[0], lf, tok, args)]
    if long:
        print(f"warning: {len(long)} quote(s) longer than {MAX_CLAUSE_TOKENS} tokens, which --decode channel chose "
              f"on their first {MAX_CLAUSE_TOKENS} only (first: {long[0]}): they may hold several clauses; check "
              f"where those clauses begin and end{_shorter(args)}", file=sys.stderr)
    if args.json:
        _say(json.dumps(result, ensure_ascii=False))
        return result
    width = max(len(c) for c in ALL_CATEGORIES)
    _say(f"{'category':{width}s}  found  characters       first words")
    for c, r in clauses.items():
        if r["found"]:
            words = " ".join(r["text"].split()[:10])
            _say(f"{c:{width}s}  {'yes*' if r['truncated'] else 'yes':5s}  {r['start']:>7d}-{r['end']:<7d}  "
                  f"{words[:70]}")
        else:
            _say(f"{c:{width}s}  no")
    print(f"{sum(r['found'] for r in clauses.values())} of {len(clauses)} clause types found in {n_windows} "
          "window(s); quotes are verbatim slices of the file (--json for the full text and offsets)",
          file=sys.stderr)
    cut = sum(r["found"] and r["truncated"] for r in clauses.values())
    if cut:
        print(f"warning: {cut} answer(s) (yes*) cut at --max-new-tokens {args.max_new_tokens}; raise it to quote "
              "the whole clause", file=sys.stderr)
    return result


def adapter_provenance(adapter) -> str:
    """What an adapter was trained on, from its run's config.json (engine.rundir.adapter_run_config):
    "trained on DATA (split S), N steps, seq_len L" (a checkpoint: "step K of a run of N steps"; seq_len only
    where the run has one), or a note that nothing says."""
    found = adapter_run_config(adapter)
    if found is None:
        return "no training config found beside it; what it was trained on is unknown"
    c, p = found[1], Path(adapter)
    steps = f"{c.get('max_steps', '?')} steps"
    if p.parent.parent.name == "checkpoints" and p.parent.name.startswith("step-"):
        steps = f"{p.parent.name.replace('-', ' ')} of a run of {steps}"
    return (f"trained on {c['data']} (split {trained_split(c)}), {steps}"
            + (f", seq_len {c['seq_len']}" if "seq_len" in c else ""))


def _say(*parts) -> None:
    """print() to standard output, flushed: a reader that has gone (`| head`) ends the command quietly, as it
    would a Unix tool (exit status 141, 128 + SIGPIPE; stdout pointed at /dev/null so that the interpreter's own
    flush at exit does not complain), and any other failure (`> /dev/full`) is the one-line error that says it
    was standard output."""
    try:
        print(*parts)
        sys.stdout.flush()
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout with no descriptor (a test's capture)
            pass
        raise SystemExit(128 + signal.SIGPIPE) from None
    except OSError as e:
        raise WriteError(f"standard output: cannot write to it ({e.strerror or e}); "
                         + ("free disk space or redirect it elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                            else "redirect it elsewhere")) from None


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
