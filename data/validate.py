"""Alignment: every answer must be the context's own text. Locate, repair (>= 95 similarity) or reject.

data.text.locate tries, cheapest first: exact substring; the same after normalising whitespace runs, curly
quotes and dashes; then rapidfuzz's partial alignment. Anything found by the last two is a repair: the answer
becomes the context's own span, so the model never learns text it cannot copy. A fuzzy span has the needle's
length, so one typo can cost it a letter or the final period: its ends are moved to word boundaries, and over the
punctuation beside them, wherever it then reads most like the answer.

An answer found only inside words ('at' in 'the cat sat') is kept, since it is the context's own text, but counted
and named (Report.midword): a clause is copied in whole words, so such a row is most likely a slip.
"""
import dataclasses
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from rapidfuzz import fuzz

from data.example import NONE, DataError, Example
from data.text import MIN_SCORE, locate


@dataclass
class Report:
    """What data.check prints; also the input to the trainer's refusal (check_rejected)."""
    spec: str
    examples: int = 0
    aligned: int = 0       # answer verbatim in context (NONE answers count here too)
    repaired: int = 0
    rejected: int = 0
    none: int = 0
    midword: int = 0       # kept answers that begin or end inside a word of the context wherever they occur
    rejected_list: list = field(default_factory=list)   # "where: why" for the first few
    midword_list: list = field(default_factory=list)    # "where: which end, and the text around it" for the first few
    per_split: dict = field(default_factory=lambda: defaultdict(Counter))
    per_category: dict = field(default_factory=lambda: defaultdict(Counter))
    source: dict = field(default_factory=dict)          # loader notes (counts, unresolved files, clause alignment)

    def rejected_fraction(self) -> float:
        """The worse of the example-level and (CUAD) clause-string-level rejection rates."""
        fr = self.rejected / max(1, self.examples)
        cl = self.source.get("clauses")
        if cl:
            fr = max(fr, cl["rejected"] / max(1, cl["total"]))
        return fr

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["per_split"] = {k: dict(v) for k, v in self.per_split.items()}
        d["per_category"] = {k: dict(v) for k, v in self.per_category.items()}
        d["rejected_fraction"] = self.rejected_fraction()
        if "clauses" not in self.source:  # sources without clause strings of their own (ACORD, JSONL, synthetic):
            # each clause answer is one, so data.check --json has source.clauses for every spec (DESIGN.md)
            d["source"] = {**self.source, "clauses": {
                "total": self.examples - self.none, "aligned": self.aligned - self.none, "repaired": self.repaired,
                "rejected": self.rejected, "rejected_list": list(self.rejected_list)}}
        return d


def validate(examples: list[Example], spec: str = "", notes: dict | None = None, min_score: float = MIN_SCORE,
             show: int = 5) -> tuple[list[Example], Report]:
    """Check every example; return the kept ones (repaired answers replaced by the context's own text)."""
    notes = notes or {}
    origins = notes.get("origins", {})
    rep = Report(spec=spec, source={k: v for k, v in notes.items() if k != "origins"})
    kept = []
    for ex in examples:
        rep.examples += 1
        span = None
        if ex.answer == NONE:
            status = "none"
        else:
            m = locate(ex.answer, ex.context, min_score)
            if m is None:
                status = "rejected"
            elif m.how == "exact" and m.end - m.start == len(ex.answer):
                status, span = "aligned", _whole_word_occurrence(ex.answer, ex.context, m.start)
            else:
                status = "repaired"
                span = (_snap_to_words(ex.context, m.start, m.end, ex.answer.strip()) if m.how == "fuzzy"
                        else (m.start, m.end))
                ex = dataclasses.replace(ex, answer=ex.context[span[0]:span[1]])
        if status == "rejected":
            rep.rejected += 1
            if len(rep.rejected_list) < show:
                rep.rejected_list.append(f"{origins.get(ex.id, ex.id)}: answer not found in its context "
                                         f"(below {min_score:g} similarity): {ex.answer[:80]!r}")
        else:
            kept.append(ex)
            if status == "repaired":
                rep.repaired += 1
            else:
                rep.aligned += 1
                rep.none += status == "none"
            cut = span and _inside_word(ex.context, *span)
            if cut:
                rep.midword += 1
                if len(rep.midword_list) < show:
                    a, b = span
                    rep.midword_list.append(f"{origins.get(ex.id, ex.id)}: answer {cut} inside a word: "
                                            f"{ex.context[max(0, a - 15):a]!r} + {ex.answer[:60]!r} + "
                                            f"{ex.context[b:b + 15]!r}")
        rep.per_split[ex.split][status] += 1
        rep.per_category[ex.category][status] += 1
    return kept, rep


def _inside_word(text: str, a: int, b: int) -> str:
    """Which end of text[a:b] cuts a word ("begins", "ends", "begins and ends"), or "" when neither does."""
    begins = 0 < a < len(text) and text[a - 1].isalnum() and text[a].isalnum()
    ends = 0 < b < len(text) and text[b - 1].isalnum() and text[b].isalnum()
    return " and ".join(w for w, cut in (("begins", begins), ("ends", ends)) if cut)


def _whole_word_occurrence(answer: str, text: str, first: int) -> tuple[int, int]:
    """The first occurrence of answer in text (from `first`, the first one) that cuts no word, else the first:
    'the' in 'bathe the dog' is a whole word, just not at its first occurrence."""
    i = first
    while i >= 0:
        if not _inside_word(text, i, i + len(answer)):
            return i, i + len(answer)
        i = text.find(answer, i + 1)
    return first, first + len(answer)


def _snap_to_words(text: str, a: int, b: int, answer: str, reach: int = 40) -> tuple[int, int]:
    """A fuzzy span [a, b) moved to word boundaries: each end cut inside a word goes to that word's far side or
    its near side, and may take the punctuation next to it, whichever candidate reads most like the answer
    (fuzz.ratio). rapidfuzz's span has the answer's length, so a typo early on costs it the final period
    ('Software' for 'Software.'), and quote marks the context lacks make it run on into the next line's number."""
    def marks(i: int, step: int) -> int:  # from i, over the punctuation (not letters, digits or spaces) in step's way
        while 0 < i < len(text) and not (text[i - (step < 0)].isalnum() or text[i - (step < 0)].isspace()):
            i += step
        return i

    def cut(i: int) -> bool:
        return 0 < i < len(text) and text[i - 1].isalnum() and text[i].isalnum()
    lo, hi = a, b
    while lo > max(0, a - reach) and cut(lo):  # the start's word, whole
        lo -= 1
    while hi < min(len(text), b + reach) and cut(hi):  # the end's word, whole
        hi += 1
    inner_a, inner_b = a, b
    while inner_a < b and cut(inner_a):  # or the near side, the cut word left out
        inner_a += 1
    while inner_b > a and cut(inner_b):
        inner_b -= 1
    starts = {inner_a + (len(text[inner_a:b]) - len(text[inner_a:b].lstrip()))} | set(range(marks(lo, -1), lo + 1))
    ends = {inner_b - (len(text[a:inner_b]) - len(text[a:inner_b].rstrip()))} | set(range(hi, marks(hi, 1) + 1))
    best = max(((fuzz.ratio(answer, text[s:e]), -abs(s - a) - abs(e - b), s, e) for s in starts for e in ends
                if e > s), default=None)
    return (best[2], best[3]) if best else (a, b)


class RejectedError(DataError):
    """More answers rejected than allowed."""


def check_rejected(rep: Report, max_rejected: float = 0.01) -> None:
    """Refuse data with more than max_rejected rejected (a fraction); one-line error naming the first one."""
    fr = rep.rejected_fraction()
    if fr > max_rejected:
        first = (rep.rejected_list or rep.source.get("clauses", {}).get("rejected_list") or ["?"])[0]
        raise RejectedError(f"{rep.spec}: {fr:.1%} of answers rejected (limit {max_rejected:.1%}), first: {first}; "
                        "fix the data (python -m data.check shows all) or raise the limit (--max-rejected)")


def load_validated(spec: str, split: str | None = None, *, max_rejected: float = 0.01, min_score: float = MIN_SCORE,
                   **opts) -> tuple[list[Example], Report]:
    """What the trainer calls: load, validate, repair, drop rejected; DataError if more than max_rejected."""
    from data import load_source

    examples, notes = load_source(spec, split, **opts)
    kept, rep = validate(examples, spec, notes, min_score)
    check_rejected(rep, max_rejected)
    if rep.midword and os.environ.get("RANK", "0") == "0":  # kept (the text is the context's own), but the
        # trainer's user should hear of it, once: under torchrun every rank loads the data
        print(f"warning: {spec}: {rep.midword} answer(s) begin or end inside a word, first: {rep.midword_list[0]}; "
              "check them (python -m data.check names the first few)", file=sys.stderr)
    return kept, rep
