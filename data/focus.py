"""Training data for the second stage of channel decoding: trimming a chosen sentence to the clause.

The channel decoder (model.channel) quotes whole sentences or paragraphs. CUAD's lawyers often marked less: a date
in the preamble ("March 21, 2005"), a party's name, the part of a sentence after its opening phrase. A focus adapter
is trained (plain engine.train) to copy that part out of the one unit it is given; engine.evaluate / engine.extract
run it on the unit the channel decoder chose (--focus-adapter).

    python -m data.focus cuad:../shared/datasets/cuad --split fit --unit sentence --out runs/focus/cuad.jsonl
    python -m engine.train --data jsonl:runs/focus/cuad.jsonl --out runs/focus_cuad ...

Each line is a jsonl:FILE example (data.jsonl): the unit the answer begins in as its context, the part of the answer
inside that unit as its answer (an answer running on past its unit is clipped where the unit ends: the stage never
sees the next unit). A unit of fewer than MIN_UNIT_WORDS words ('B.' before a list item, ', 2006', 'TABLE 1') is
joined with the units after it until it has that many: alone, it would make a row whose context and answer are a
list marker, the clause that follows it lost. NONE examples are left out: the channel decoder has already decided
there is a clause.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data import load_source
from data.cli import CliParser, run_command
from data.example import NONE, Example, splits_overlap
from data.validate import validate
from model.channel import UNITS, units

MIN_UNIT_WORDS = 3  # fewer words than this, and the unit the answer begins in is joined with the next
_WORDS = re.compile(r"\w+")
SPLIT_AS = {"fit": "train", "train": "train", "calib": "valid", "valid": "valid", "test": "test"}  # jsonl splits


@dataclass
class FocusCounts:
    examples: int = 0  # validated examples read
    none: int = 0  # NONE answers (left out)
    whole: int = 0  # answer is its whole unit
    inside: int = 0  # answer is a strict part of its unit
    clipped: int = 0  # answer runs past its unit: clipped at the unit's end
    unplaced: int = 0  # answer does not begin inside any unit (between paragraphs): left out
    joined: int = 0  # of whole / inside / clipped: answer began in a unit of < MIN_UNIT_WORDS words, joined on


def focus_example(ex: Example, unit: str = "sentence") -> tuple[Example, str, bool] | None:
    """(the focus example for ex, how its answer relates to its unit: whole / inside / clipped, whether the unit was
    joined with the next to reach MIN_UNIT_WORDS words), or None for a NONE answer or one that begins outside every
    unit. The id is ex.id: the prompt template (chosen by id) is the one ex itself would get."""
    answer = ex.answer.strip()
    if answer == NONE:
        return None
    at = ex.context.find(answer)
    assert at >= 0, f"{ex.id}: validated answers are in their context"
    end = at + len(answer)
    spans = units(ex.context, unit)
    for k, (a, b) in enumerate(spans):
        if a <= at < b:
            j = k
            while len(_WORDS.findall(ex.context, a, b)) < MIN_UNIT_WORDS and j + 1 < len(spans):
                j += 1
                b = spans[j][1]  # the text between (whitespace, a paragraph break) comes along: still a slice
            clip = ex.context[at:min(end, b)].strip()
            assert clip, f"{ex.id}: a stripped answer begins with a character a unit holds"
            kind = "whole" if (at, min(end, b)) == (a, b) else "clipped" if end > b else "inside"
            return Example(id=ex.id, source=ex.source, category=ex.category, query=ex.query,
                           context=ex.context[a:b], answer=clip, split=ex.split), kind, j > k
    return None


def focus_examples(examples: list[Example], unit: str = "sentence") -> tuple[list[Example], FocusCounts]:
    counts = FocusCounts(examples=len(examples))
    out = []
    for ex in examples:
        if ex.answer.strip() == NONE:
            counts.none += 1
            continue
        got = focus_example(ex, unit)
        if got is None:
            counts.unplaced += 1
            continue
        focus, kind, joined = got
        out.append(focus)
        setattr(counts, kind, getattr(counts, kind) + 1)
        counts.joined += joined
    return out, counts


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m data.focus", description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="data spec: acord:DIR, cuad:DIR, jsonl:FILE or synthetic")
    ap.add_argument("--split", action="append", default=None,
                    help="split(s) to convert (repeatable; default: fit and calib, written as train and valid, so "
                         "the test split and the NONE rule's calib queries stay unseen by training)")
    ap.add_argument("--unit", choices=sorted(UNITS), default="sentence", help="what the channel decoder quotes")
    ap.add_argument("--out", required=True, help="JSONL file to write (whole, or not at all)")
    return ap


def main(argv=None) -> int:
    from model.files import atomic_write_text, make_dirs

    args = build_parser().parse_args(argv)

    def go():
        lines, report = [], {}
        splits = list(dict.fromkeys(args.split or ["fit", "calib"]))  # each split once (ids must stay unique)
        for split in splits:
            if split not in SPLIT_AS:
                raise ValueError(f"--split {split!r}: choose from {', '.join(SPLIT_AS)}")
        for i, a in enumerate(splits):  # "train" holds "fit" and "calib": both would write its examples twice
            for b in splits[i + 1:]:
                if splits_overlap(a, b):
                    raise ValueError(f"--split {a} and --split {b} share examples (train is fit and calib "
                                     "together), so each would be written twice; pass one of them")
        for split in splits:
            loaded, notes = load_source(args.data, split)
            examples, _ = validate(loaded, args.data, notes)
            focus, counts = focus_examples(examples, args.unit)
            for ex in focus:
                lines.append(json.dumps({"id": ex.id, "query": ex.query, "category": ex.category,
                                         "context": ex.context, "answer": ex.answer, "split": SPLIT_AS[split],
                                         "source": ex.source}, ensure_ascii=False))
            report[split] = counts
        if not lines:
            raise ValueError(f"{args.data}: no example with an answer in split(s) {', '.join(report)}")
        make_dirs(Path(args.out).parent)
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        for split, c in report.items():
            print(f"{split} -> {SPLIT_AS[split]}: {c.whole + c.inside + c.clipped} of {c.examples} examples "
                  f"({c.whole} whole {args.unit}, {c.inside} inside one, {c.clipped} clipped at its end; "
                  f"{c.joined} of them begin in one of < {MIN_UNIT_WORDS} words, joined with the next; "
                  f"{c.none} NONE and {c.unplaced} outside every {args.unit} left out)", file=sys.stderr)
        print(args.out)

    return run_command(go)


if __name__ == "__main__":
    sys.exit(main())
