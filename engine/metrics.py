"""Extraction metrics: how close a generated clause is to the lawyer's clause, and whether the model abstains right.

Per example (`score`):
- similarity: `rapidfuzz.fuzz.ratio` (0-100) on whitespace-normalised text. ratio = 100 * 2*M / (len(a) + len(b)),
  M = characters matched by the InDel alignment (the longest common subsequence). Case-sensitive on purpose: the
  task is copying verbatim, so "Licensee" for "LICENSEE" is a (small) miss. Two empty strings score 100.
- exact_match: 1.0 when the whitespace-normalised strings are identical, else 0.0 (strict, not SQuAD's lowercased
  one: a verbatim copy is the point).
- f1: SQuAD v1.1 token F1 (lowercase, drop punctuation and the articles a/an/the, split on whitespace, bag-of-tokens
  overlap). Both sides without tokens -> 1.0; only one -> 0.0.
- abstention outcome, treating "answer NONE" as the positive class: "tp" (answer NONE, predicted NONE),
  "fp" (predicted NONE on a clause that exists), "fn" (missed abstention: answer NONE, model quoted something),
  "tn" (clause exists and the model quoted something).

Aggregates (`aggregate`): similarity averages 0-100; excellent / good / exact_match / f1 as percentages 0-100
(excellent = share with similarity > 90, good = share > 70); abstention precision = tp / (tp + fp) and recall =
tp / (tp + fn) as percentages, None when the denominator is 0 (nothing to measure, not a perfect score);
predicted_none = share of examples answered NONE (on clause examples: wrongly; on NONE examples: rightly);
verbatim = share of quoted (non-NONE) predictions that are exact substrings of their context; right_start = share
of clause examples whose quote starts at the gold clause (the choice, apart from where the copy stopped): at its
first character, or earlier by no more than a list number the lawyer left out of the clause ("2. ", "(a) ", "12.3 ",
"iv. ": digits, one letter or a roman numeral, with punctuation and whitespace), so that the channel and rank
decoders, which quote a whole paragraph or sentence, are measured by the same rule as a copy starting mid-text.

A prediction that is_none ("None.", "none") is scored as NONE everywhere, not only in the abstention outcome.

By category and by source (`summarize`): the same aggregates per kind (KINDS), never over both kinds together:
{"clause": {name: aggregate}, "none": {name: aggregate}}, a name under a kind only when it has examples of it.
"""
from __future__ import annotations

import re
import string
from collections import Counter

from rapidfuzz import fuzz

from data.example import NONE, is_none  # noqa: F401  (is_none: re-exported, one rule for data and metrics)

_WS = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
# What may stand in a quote before the gold clause's first character for it still to start "right": list numbers
# ("2.", "12.3", "(a)", "iv)"), each followed by punctuation or whitespace, and nothing else. A single letter is
# [A-Za-z]'s alone and a number's dots are the \W+ between its parts: one way to match, so no backtracking blows up
# over a long prefix.
_LIST_NUMBER = re.compile(r"\W*(?:(?:\d+|[A-Za-z]|[ivx]{2,5}|[IVX]{2,5})\W+)*")

# Keys of `aggregate`, in the order tables show them (higher is better for every one but n).
AGGREGATE_KEYS = ("n", "avg_similarity", "excellent", "good", "exact_match", "f1", "right_start", "predicted_none",
                  "verbatim", "abstention_precision", "abstention_recall")
# The two kinds of example, always reported apart: a clause to copy, or NONE to answer. A headline over both
# hides a model that answers NONE to everything behind its NONE examples.
KINDS = ("clause", "none")


def normalize_ws(text: str) -> str:
    """Collapse every whitespace run to one space and strip the ends."""
    return _WS.sub(" ", text or "").strip()


def similarity(prediction: str, answer: str) -> float:
    a, b = normalize_ws(prediction), normalize_ws(answer)
    if not a and not b:
        return 100.0
    return float(fuzz.ratio(a, b))


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_ws(prediction) == normalize_ws(answer))


def _squad_tokens(text: str) -> list[str]:
    text = (text or "").lower().translate(_PUNCT)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, answer: str) -> float:
    p, g = _squad_tokens(prediction), _squad_tokens(answer)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def abstention(prediction: str, answer: str) -> str:
    gold, pred = is_none(answer), is_none(prediction)
    return {(True, True): "tp", (False, True): "fp", (True, False): "fn", (False, False): "tn"}[(gold, pred)]


def score(prediction: str, answer: str, context: str | None = None, start: int | None = None) -> dict:
    """All per-example scores for one prediction. With the context, "verbatim" says whether a quoted (non-NONE)
    prediction is an exact substring of it (None for a NONE prediction, or without context), and "right_start"
    whether a clause example's quote starts at the gold clause (right_start_of): the model chose the right clause,
    however well it then stopped (start: the prediction's offset in the context when the decoder knows it).
    A prediction or answer that is_none is compared as NONE itself ("None." for NONE is a right abstention, and an
    exact one)."""
    quoted = not is_none(prediction)
    prediction, answer = (prediction if quoted else NONE), (NONE if is_none(answer) else answer)
    right = None
    if context is not None and answer != NONE:
        right = quoted and right_start_of(prediction, answer, context, start)
    return {
        "right_start": right,
        "similarity": similarity(prediction, answer),
        "exact_match": exact_match(prediction, answer),
        "f1": token_f1(prediction, answer),
        "abstention": abstention(prediction, answer),
        "verbatim": (bool(prediction.strip()) and prediction in context) if quoted and context is not None else None,
    }


def right_start_of(quote: str, answer: str, context: str, start: int | None = None) -> bool:
    """Whether a quote (at offset start of context, else where it is first found) starts at the gold answer's first
    occurrence: there exactly, or before it by a list number only (_LIST_NUMBER) with the gold start inside the
    quote. The channel decoder quotes "2. The liability ..." for the lawyer's "The liability ...": the right
    clause."""
    gold = context.find(answer.strip())
    if start is None:
        quote = quote.strip()
        start = context.find(quote) if quote else -1
    if start < 0 or gold < 0 or not start <= gold < start + len(quote):
        return False
    return _LIST_NUMBER.fullmatch(context[start:gold]) is not None


def kind(answer: str) -> str:
    """"none" for an example whose gold answer is NONE, else "clause"."""
    return "none" if is_none(answer) else "clause"


def aggregate(scores: list[dict]) -> dict:
    """Averages over a list of `score` dicts (see the module docstring for units)."""
    n = len(scores)
    if n == 0:
        return {k: (0 if k == "n" else None) for k in AGGREGATE_KEYS}
    sims = [s["similarity"] for s in scores]
    outcomes = Counter(s["abstention"] for s in scores)
    tp, fp, fn = outcomes["tp"], outcomes["fp"], outcomes["fn"]
    pct = lambda num, den: (100.0 * num / den) if den else None  # noqa: E731
    verb = [s["verbatim"] for s in scores if s.get("verbatim") is not None]
    starts = [s["right_start"] for s in scores if s.get("right_start") is not None]
    return {
        "n": n,
        "avg_similarity": sum(sims) / n,
        "excellent": pct(sum(x > 90 for x in sims), n),
        "good": pct(sum(x > 70 for x in sims), n),
        "exact_match": pct(sum(s["exact_match"] for s in scores), n),
        "f1": pct(sum(s["f1"] for s in scores), n),
        "right_start": pct(sum(starts), len(starts)),
        "predicted_none": pct(tp + fp, n),
        "verbatim": pct(sum(verb), len(verb)),
        "abstention_precision": pct(tp, tp + fp),
        "abstention_recall": pct(tp, tp + fn),
    }


def summarize(rows: list[dict]) -> dict:
    """rows carry "answer", "category", "source" and "scores" -> {"overall", "clause", "none", "by_category",
    "by_source"} aggregates; "clause" and "none" split the rows by their gold answer (see KINDS), and so do
    by_category and by_source (by_kind)."""
    out = {"overall": aggregate([r["scores"] for r in rows])}
    for k in KINDS:
        out[k] = aggregate([r["scores"] for r in rows if kind(r["answer"]) == k])
    out["by_category"], out["by_source"] = by_kind(rows, "category"), by_kind(rows, "source")
    return out


def by_kind(rows: list[dict], field: str) -> dict[str, dict[str, dict]]:
    """{kind: {value of row[field]: aggregate of that kind's rows}} for each of KINDS: clause examples and NONE
    examples of one category apart, as everywhere (a category's NONE examples answered NONE would otherwise lift
    its similarity, and its clause examples' quotes lower its answered NONE rate)."""
    out: dict[str, dict[str, dict]] = {}
    for k in KINDS:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if kind(r["answer"]) == k:
                groups.setdefault(str(r.get(field)), []).append(r["scores"])
        out[k] = {g: aggregate(groups[g]) for g in sorted(groups)}
    return out
