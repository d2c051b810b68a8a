"""Find one clause in a contract file and quote it verbatim, with its character offsets in the file.

    python -m engine.extract --model SRC [--adapter DIR] --contract FILE --clause NAME [--json]

A contract longer than the model's budget is read in overlapping windows (each one prompt, same templates as
training); every window's answer that is not NONE is located in the contract. The quote is always a slice of
the file: when the generation is not verbatim (changed whitespace, a dropped word) it is snapped to the
best-matching span (rapidfuzz.fuzz.partial_ratio_alignment on whitespace-normalised text, then widened to word
boundaries) and the match score (fuzz.ratio, 0-100) is reported. Offsets are Python character indices into
the file decoded as UTF-8 (line endings kept as they are in the file).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from rapidfuzz import fuzz

from engine.cli import CliParser, run_command
from engine.metrics import is_none, normalize_ws

_WS = re.compile(r"\s+")


@dataclass
class Match:
    start: int          # character offsets into the contract text: text[start:end] is the quote
    end: int
    score: float        # fuzz.ratio of the whitespace-normalised generation and quote, 0-100
    verbatim: bool      # the generation occurs in the contract character for character
    generated: str      # what the model wrote
    window: int         # index of the window that produced it

    def as_dict(self, text: str) -> dict:
        return {"start": self.start, "end": self.end, "text": text[self.start:self.end], "score": self.score,
                "verbatim": self.verbatim, "generated": self.generated, "window": self.window}


def read_contract(path) -> str:
    """The file as text, or a one-line OSError/ValueError naming the file and what to do."""
    p = Path(path)
    try:
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


# ---- windows -----------------------------------------------------------------------------------------------
def make_windows(text: str, count_tokens, max_tokens: int, overlap: float = 0.25) -> list[tuple[int, int]]:
    """Cover text with [start, end) windows of at most max_tokens tokens each (count_tokens(str) -> int),
    consecutive windows sharing about `overlap` of their length, cut at whitespace where possible. A clause
    shorter than the overlap is therefore whole in at least one window."""
    assert 0 <= overlap < 0.9 and max_tokens > 0
    n_tok = count_tokens(text)
    if n_tok <= max_tokens:
        return [(0, len(text))]
    chars = max(32, int(max_tokens * len(text) / n_tok * 0.95))  # chars per window from the average token size
    windows, start = [], 0
    while True:
        end = min(len(text), start + chars)
        while True:
            if end < len(text):  # end after the last space / newline of the window's second half
                half = start + (end - start) // 2
                cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end))
                end = cut + 1 if cut > start else end
            if count_tokens(text[start:end]) <= max_tokens or end - start <= 8:
                break
            end = start + int((end - start) * 0.9)
        windows.append((start, end))
        if end >= len(text):
            return windows
        nxt = max(start + 1, end - int((end - start) * overlap))
        m = _WS.search(text, nxt, end)  # start the next window at a word
        start = m.end() if m and m.end() < end else nxt


# ---- snapping a generation onto the contract ---------------------------------------------------------------
def _normalize_with_map(text: str) -> tuple[str, list[int]]:
    """Whitespace-normalised text (runs -> one space, ends stripped) and, per output char, its index in text."""
    out, idx = [], []
    for m in re.finditer(r"\S+", text):
        if out:
            out.append(" ")
            idx.append(m.start() - 1)
        out.append(m.group())
        idx.extend(range(m.start(), m.end()))
    return "".join(out), idx


def _word_bounds(norm: str) -> tuple[list[int], list[int]]:
    starts = [m.start() for m in re.finditer(r"\S+", norm)]
    ends = [m.end() for m in re.finditer(r"\S+", norm)]
    return starts, ends


def locate(generated: str, window: str) -> tuple[int, int, float, bool] | None:
    """(start, end, score, verbatim) of the span of window that best matches the generation, offsets into window."""
    if not generated.strip():
        return None
    i = window.find(generated.strip())
    if i >= 0:
        return i, i + len(generated.strip()), 100.0, True
    pred = normalize_ws(generated)
    norm, idx = _normalize_with_map(window)
    if not norm:
        return None
    j = norm.find(pred)
    if j >= 0:  # verbatim up to whitespace
        return idx[j], idx[j + len(pred) - 1] + 1, 100.0, False
    al = fuzz.partial_ratio_alignment(pred, norm)
    s, e = al.dest_start, al.dest_end
    # the alignment span has the generation's length and may cut words: try nearby word boundaries
    starts, ends = _word_bounds(norm)
    si = max((k for k, w in enumerate(starts) if w <= s), default=0)
    ei = min((k for k, w in enumerate(ends) if w >= e), default=len(ends) - 1)
    best = None
    for a in starts[max(0, si - 3): si + 4]:
        for b in ends[max(0, ei - 3): ei + 4]:
            if b > a:
                r = fuzz.ratio(pred, norm[a:b])
                if best is None or r > best[0]:
                    best = (r, a, b)
    if best is None:
        return None
    r, a, b = best
    return idx[a], idx[b - 1] + 1, float(r), False


def find_clause(text: str, clause: str, answer_fn, count_tokens, max_context_tokens: int, *,
                overlap: float = 0.25, min_score: float = 60.0, log: list | None = None) -> tuple[list[Match], int]:
    """All distinct matches (best first) and the number of windows. answer_fn(list of user messages) -> answers.
    log, when given, receives one dict per window: its offsets and what the model answered there."""
    from data.example import Example, render_prompt

    windows = make_windows(text, count_tokens, max_context_tokens, overlap)
    prompts = [render_prompt(Example(id=f"extract:{clause}", source="extract", category=clause, query=clause,
                                     context=text[a:b], answer="", split="test")) for a, b in windows]
    answers = answer_fn(prompts)
    if log is not None:
        log.extend({"start": a, "end": b, "answer": ans} for (a, b), ans in zip(windows, answers))
    found: list[Match] = []
    for w, ((a, b), ans) in enumerate(zip(windows, answers)):
        if is_none(ans):
            continue
        loc = locate(ans, text[a:b])
        if loc is not None and loc[2] >= min_score:
            found.append(Match(a + loc[0], a + loc[1], loc[2], loc[3], ans, w))
    found.sort(key=lambda m: (-m.score, not m.verbatim, m.start))
    distinct: list[Match] = []
    for m in found:  # overlapping windows find the same clause twice: keep the best of each span
        if all(m.end <= d.start or m.start >= d.end for d in distinct):
            distinct.append(m)
    return distinct, len(windows)


# ---- the command -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.extract", description=__doc__.split("\n\n")[0])
    ap.add_model_args(adapter_required=False)
    ap.add_argument("--contract", required=True, help="plain-text (UTF-8) contract file")
    ap.add_argument("--clause", required=True, help='clause type or query, e.g. "Governing Law"')
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per window: prompt + answer")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="generation budget per window")
    ap.add_argument("--overlap", type=float, default=0.25, help="fraction of a window shared with the next")
    ap.add_argument("--batch-size", type=int, default=4, help="windows decoded together")
    ap.add_argument("--min-score", type=float, default=60.0,
                    help="drop answers whose best span in the contract matches worse than this (0-100)")
    ap.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the base in NF4 or full")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 on a busy shared machine)")
    return ap


def run(args) -> dict:
    if not 0 <= args.overlap < 0.9:
        raise ValueError(f"--overlap {args.overlap}: use a fraction in [0, 0.9)")
    if not args.clause.strip():
        raise ValueError("--clause is empty; name a clause type, e.g. --clause 'Governing Law'")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    text = read_contract(args.contract)  # before loading the model: a bad path fails in a second
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from engine.evaluate import load_for_eval
    from model.generate import generate

    model, tok, _ = load_for_eval(args.model, args.adapter, device=args.device,
                                  quantize=None if args.quantize == "none" else args.quantize)
    from data.example import Example, render_prompt

    empty = render_prompt(Example(id=f"extract:{args.clause}", source="extract", category=args.clause,
                                  query=args.clause, context="", answer="", split="test"))
    overhead = len(tok.encode(tok.chat_prompt(empty))) + 8  # + a margin for merges across the context's edges
    budget = args.seq_len - args.max_new_tokens - overhead
    if budget < 64:
        raise ValueError(f"--seq-len {args.seq_len} leaves {budget} context tokens per window after the prompt "
                         f"and --max-new-tokens {args.max_new_tokens}; raise --seq-len")
    per_window: list[dict] = []
    matches, n_windows = find_clause(
        text, args.clause,
        lambda prompts: generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                 batch_size=args.batch_size),
        lambda s: len(tok.encode(s)), budget, overlap=args.overlap, min_score=args.min_score, log=per_window)
    best = matches[0] if matches else None
    result = {"contract": str(args.contract), "clause": args.clause, "found": best is not None,
              "windows": n_windows, **(best.as_dict(text) if best else {}),
              "matches": [m.as_dict(text) for m in matches], "per_window": per_window}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif best is None:
        print(f"No {args.clause} clause found.")
    else:
        how = "verbatim" if best.verbatim else (
            "verbatim up to whitespace" if best.score == 100 else
            "not verbatim: showing the closest span of the contract")
        print(f"{args.clause} clause, characters {best.start}-{best.end} of {args.contract} "
              f"(match {best.score:.1f}, {how}):")
        print(text[best.start:best.end])
        if len(matches) > 1:
            print(f"({len(matches) - 1} more match(es): --json lists them)", file=sys.stderr)
    return result


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
