"""Alignment: every answer must be the context's own text. Locate, repair (>= 95 similarity) or reject.

data.text.locate tries, cheapest first: exact substring; the same after normalising whitespace runs, curly
quotes and dashes; then rapidfuzz's partial alignment. Anything found by the last two is a repair: the answer
becomes the context's own span, so the model never learns text it cannot copy.
"""
import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field

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
    rejected_list: list = field(default_factory=list)   # "where: why" for the first few
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
        if ex.answer == NONE:
            status = "none"
        else:
            m = locate(ex.answer, ex.context, min_score)
            if m is None:
                status = "rejected"
            elif m.how == "exact" and m.end - m.start == len(ex.answer):
                status = "aligned"
            else:
                status = "repaired"
                ex = dataclasses.replace(ex, answer=ex.context[m.start:m.end])
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
        rep.per_split[ex.split][status] += 1
        rep.per_category[ex.category][status] += 1
    return kept, rep


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
    return kept, rep
