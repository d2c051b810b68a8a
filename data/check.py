"""python -m data.check SPEC [--split S] [--json] [--seq-len N] [--max-rejected F]
                     [--tokenizer SRC [--channel UNIT [--max-candidates N] [--max-clause-tokens N]]]

Loads a dataset, checks that every answer is its context's own text (repairing near-matches, rejecting the
rest), and prints counts per split and category, token lengths and what rows of --seq-len tokens do to the
examples: with --tokenizer, counted by data.batch.encode_example, which builds training's rows (contexts
shortened, long clauses supervised on their first tokens, skipped); without, estimated as characters / 4 (said
so). With --channel, also the longest row engine.channel_train can build from each example (its candidates and
the empty clause, each followed by the query, packed in one row), to size its memory with engine.memory.
Exit status: 0 ok, 1 more than --max-rejected rejected, 2 bad input (one line on stderr, no traceback).
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time

import numpy as np

from data import NONE, DataError, load_source, render_prompt
from data.cli import CliParser
from data.example import HOLDOUT_SPLITS, SPLITS, Example
from data.validate import RejectedError, Report, check_rejected, validate


def _load_tokenizer(src: str):
    try:
        if src.endswith(".json"):
            from model.tokenizer import Tokenizer
            return Tokenizer.from_file(src)
        from model import load_tokenizer
        return load_tokenizer(src)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {src}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def token_stats(examples: list[Example], seq_len: int, tok=None) -> dict:
    """Length of prompt + answer in tokens (or chars / 4), and what a row of seq_len does to the examples: with a
    tokenizer, counted by data.batch.encode_example itself, the function training builds its rows with (context
    shortened, target cut to the clause's first tokens, skipped); without one, its rule applied to the estimate."""
    if tok is None:
        prompt = np.array([len(render_prompt(e)) + 16 for e in examples]) / 4   # +16: chat markup, +4: end of turn
        target = np.array([len(e.answer) + 4 for e in examples]) / 4
        how = "estimated as characters / 4 (pass --tokenizer SRC to count)"
    else:
        enc = getattr(tok, "encode_batch", None) or (lambda ts: [tok.encode(t) for t in ts])
        prompt = np.array([len(x) for x in enc([tok.chat_prompt(render_prompt(e)) for e in examples])])
        target = np.array([len(x) for x in enc([tok.chat_answer(e.answer) for e in examples])])
        how = f"counted with {getattr(tok, 'source', 'the tokenizer')}"
    full = prompt + target   # as encode_example tokenizes them: apart
    out = {"how": how, "seq_len": seq_len, "p50": 0, "p90": 0, "max": 0, "over_seq_len": 0, "answer_too_long": 0,
           "answer_target_cut": 0}
    if not len(full):
        return out
    over = [e for e, n in zip(examples, full) if n > seq_len]
    if tok is not None:
        from data.batch import encode_example   # torch: only with --tokenizer (which loads it anyway)

        rows = [encode_example(tok, e, seq_len) for e in over]
        skipped = sum(r is None for r in rows)
        cut = sum(r.target_cut for r in rows if r is not None)
    else:   # encode_example's rule on the estimate: skipped when the clause cannot be whole in the context (+2
        # tokens around it) beside min(16, target) target tokens; cut when half the room its copy leaves is less
        # than the target (the context's budget keeps the other half for other text)
        t = target[full > seq_len]
        empty = np.array([len(render_prompt(dataclasses.replace(e, context=""))) + 16 for e in over]) / 4
        in_ctx = np.array([0 if e.answer == NONE else len(e.answer) / 4 + 2 for e in over])
        fits = empty + in_ctx + np.minimum(16, t) <= seq_len
        skipped = int((~fits).sum())
        cut = int((fits & ((seq_len - empty - in_ctx + 1) / 2 < t)).sum())
    return {**out, "p50": int(np.percentile(full, 50)), "p90": int(np.percentile(full, 90)), "max": int(full.max()),
            "over_seq_len": len(over) - skipped, "answer_too_long": skipped, "answer_target_cut": cut}


def channel_stats(examples: list[Example], tok, unit: str, max_candidates: int, max_clause_tokens: int) -> dict:
    """The longest engine.channel_train row of each example (model.channel.longest_channel_row, an upper bound:
    its longest units as the candidates): percentiles and maximum of its tokens, and the most query tokens of
    any row (the rows' supervised tokens). The ledger at both maxima bounds the step's peak."""
    from model.channel import longest_channel_row  # torch: only with --channel

    cache: dict = {}
    rows = [longest_channel_row(tok, e.context, e.query, unit, max_candidates, max_clause_tokens, cache)
            for e in examples]
    n = np.array([r[0] for r in rows]) if rows else np.zeros(1, dtype=int)
    return {"unit": unit, "max_candidates": max_candidates, "max_clause_tokens": max_clause_tokens,
            "examples": len(rows), "p50": int(np.percentile(n, 50)), "p99": int(np.percentile(n, 99)),
            "max": int(n.max()), "max_supervised": max((r[1] for r in rows), default=0)}


def format_channel(ch: dict) -> str:
    return (f"channel rows (engine.channel_train --unit {ch['unit']} --max-candidates {ch['max_candidates']} "
            f"--max-clause-tokens {ch['max_clause_tokens']}; the longest each example can make): {ch['examples']} "
            f"examples, p50 {ch['p50']}  p99 {ch['p99']}  max {ch['max']} tokens; at most {ch['max_supervised']} "
            f"query tokens in a row\n  a bound on the step's peak: python -m engine.memory --config RECIPE.toml "
            f"--seq-len {ch['max']} --batch-size 1 --pack --supervised {ch['max_supervised']} [--capability 7.5 for "
            "a T4] (RECIPE: the channel recipe you train with; or --model MODEL and its flags instead)")


def format_report(rep: Report, tokens: dict, seconds: float) -> str:
    lines = [f"data.check {rep.spec}  ({seconds:.1f} s)"]
    src = rep.source
    part = src.get("holdout")
    if part:   # fit / calib: the loader's lines below count the whole train split the part is cut from
        unit = {"acord": "queries", "cuad": "contracts", "synthetic": "documents"}.get(rep.spec.split(":")[0],
                                                                                      "examples")
        lines.append(f"split {part['part']}: {part['examples']} of the train split's {part['of_train']} examples "
                     f"({part['examples'] / max(1, part['of_train']):.1%}, cut by whole {unit}); the loader's lines "
                     f"count all of train, those from 'examples:' on the {part['part']} part only")
    if "counts" in src:
        lines.append("source counts: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                                                   for s, c in src["counts"].items()))
    if "resolved_files" in src:
        lines.append(f"contract files: {src['resolved_files']} resolved, {len(src['unresolved_files'])} unresolved"
                     + "".join(f"\n  unresolved: {f}" for f in src["unresolved_files"]))
        lines.append(f"split rule: {src['split_rule']}")
    cl = src.get("clauses")
    if cl:
        lines.append(f"clause strings: {cl['total']}  aligned {cl['aligned']}  repaired {cl['repaired']} "
                     f"(of which '<omitted>' split into pieces: {cl['omitted_split']})  rejected {cl['rejected']}"
                     f"  ({(cl['aligned'] + cl['repaired']) / max(1, cl['total']):.2%} usable)")
        if "widened" in cl:
            lines.append(f"  short pieces dropped (far from the rest of their string): {cl['short_dropped']}  "
                         f"spans widened to whole words: {cl['widened']}")
        lines += [f"  rejected: {r}" for r in cl["rejected_list"]]
        for cat, info in src.get("left_out", {}).items():
            lines.append(f"left out of training: {cat!r} ({info['clause_strings']} clause strings, validated above): "
                         f"{info['why']}")
        if src.get("too_long"):
            lines.append(f"answer spans longer than max_context_chars (skipped): {src['too_long']}")
    if src.get("unmatched_query_formats"):
        lines.append(f"queries without short/medium/long wordings: {src['unmatched_query_formats']}")
    lines.append(f"examples: {rep.examples}  aligned {rep.aligned} (NONE {rep.none})  repaired {rep.repaired}  "
                 f"rejected {rep.rejected}")
    lines += [f"  rejected: {r}" for r in rep.rejected_list]
    if rep.midword:  # kept, but a clause is copied in whole words: most likely a slip in the data
        lines.append(f"answers beginning or ending inside a word (kept): {rep.midword}")
        lines += [f"  inside a word: {r}" for r in rep.midword_list]
    lines.append("per split:")
    for s, c in rep.per_split.items():
        name = f"{part['part']} (part of train)" if part and s == "train" else s
        lines.append(f"  {name:6s} " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
    lines.append(f"per category ({len(rep.per_category)}):  examples / clause / NONE / repaired / rejected")
    width = max((len(k) for k in rep.per_category), default=10)
    for cat, c in sorted(rep.per_category.items()):
        lines.append(f"  {cat[:60]:{min(width, 60)}s} {sum(c.values()):6d} {c['aligned']:6d} {c['none']:6d} "
                     f"{c['repaired']:6d} {c['rejected']:6d}")
    lines.append(f"tokens (prompt + answer, {tokens['how']}): p50 {tokens['p50']}  p90 {tokens['p90']}  "
                 f"max {tokens['max']}")
    how = "counted by data.batch.encode_example, which builds training's rows" if tokens["how"].startswith(
        "counted") else "estimated with data.batch.encode_example's rule"
    lines.append(f"at --seq-len {tokens['seq_len']}: {tokens['over_seq_len']} examples have their context shortened "
                 f"(paragraphs dropped at random, never the answer), {tokens['answer_target_cut']} of them long "
                 "clauses supervised on their first tokens only (the clause stays whole in the context, which keeps "
                 "half the room beside it for other text; the target gets what is left), "
                 f"{tokens['answer_too_long']} skipped (the clause whole in the context, 16 target tokens and the "
                 f"template exceed --seq-len); {how}")
    lines.append(f"rejected fraction {rep.rejected_fraction():.2%}")
    return "\n".join(lines)


def _say(text: str) -> None:
    """print() to standard output, flushed: a reader that has gone (`| head`) ends the command quietly, as it would
    a Unix tool (exit status 141, 128 + SIGPIPE; stdout pointed at /dev/null so that the interpreter's own flush
    at exit does not complain), as engine.extract's does; any other failure names standard output."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout with no descriptor (a test's capture)
            pass
        raise SystemExit(128 + signal.SIGPIPE) from None
    except OSError as e:
        raise DataError(f"standard output: cannot write to it ({e.strerror or e}); redirect it elsewhere") from None


def main(argv=None) -> int:
    ap = CliParser(prog="python -m data.check", description=__doc__.split("\n\n")[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="acord:DIR, cuad:DIR, jsonl:FILE or synthetic")
    ap.add_argument("--split", choices=SPLITS + HOLDOUT_SPLITS, help="one split only (default: all)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ap.add_argument("--seq-len", type=int, default=2048, help="count examples over this length (default 2048)")
    ap.add_argument("--tokenizer", help="tokenizer.json, model dir, .gguf, hub id (its tokenizer files only) or "
                    "smollm2-135m (default: chars / 4)")
    ap.add_argument("--channel", choices=("paragraph", "sentence"), default=None,
                    help="also the longest row engine.channel_train --unit UNIT builds from each example (needs "
                         "--tokenizer), and the engine.memory command for its peak")
    ap.add_argument("--max-candidates", type=int, default=8, help="with --channel: engine.channel_train's")
    ap.add_argument("--max-clause-tokens", type=int, default=768, help="with --channel: engine.channel_train's")
    ap.add_argument("--max-rejected", type=float, default=0.01, help="fraction rejected that fails (default 0.01)")
    args = ap.parse_args(argv)
    if args.channel and not args.tokenizer:
        ap.error("--channel counts tokens: pass --tokenizer SRC (the model's tokenizer)")
    if args.max_candidates < 1 or args.max_clause_tokens < 1:
        ap.error("--max-candidates and --max-clause-tokens must be positive integers")
    if args.seq_len < 1:
        ap.error(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
    if not 0 <= args.max_rejected <= 1:
        ap.error(f"--max-rejected is a fraction from 0 to 1, got {args.max_rejected}")
    t0 = time.perf_counter()
    try:
        tok = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        examples, notes = load_source(args.spec, args.split)
        kept, rep = validate(examples, args.spec, notes)
        tokens = token_stats(kept, args.seq_len, tok)
        channel = channel_stats(kept, tok, args.channel, args.max_candidates, args.max_clause_tokens) \
            if args.channel else None
        seconds = time.perf_counter() - t0
        if args.json:
            _say(json.dumps({**rep.to_dict(), "tokens": tokens, **({"channel": channel} if channel else {}),
                             "seconds": round(seconds, 2)}, indent=1))
        else:
            _say(format_report(rep, tokens, seconds) + (f"\n{format_channel(channel)}" if channel else ""))
        check_rejected(rep, args.max_rejected)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RejectedError) else 2
    except (OSError, ValueError) as e:  # a tokenizer file that will not load, a read that fails
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
