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
of clause examples whose prediction starts at the gold clause (the choice, apart from where the copy stopped).
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
    whether a clause example's prediction starts where the gold clause starts: the model chose the right clause,
    however well it then stopped (start: the prediction's offset in the context when the decoder knows it)."""
    quoted = not is_none(prediction)
    right = None
    if context is not None and not is_none(answer):
        gold = context.find(answer.strip())
        if start is None and quoted and prediction.strip():
            start = context.find(prediction.strip())
        right = quoted and start is not None and start >= 0 and start == gold
    return {
        "right_start": right,
        "similarity": similarity(prediction, answer),
        "exact_match": exact_match(prediction, answer),
        "f1": token_f1(prediction, answer),
        "abstention": abstention(prediction, answer),
        "verbatim": (bool(prediction.strip()) and prediction in context) if quoted and context is not None else None,
    }


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
    "by_source"} aggregates; "clause" and "none" split the rows by their gold answer (see KINDS)."""
    out = {"overall": aggregate([r["scores"] for r in rows]), "by_category": {}, "by_source": {}}
    for k in KINDS:
        out[k] = aggregate([r["scores"] for r in rows if kind(r["answer"]) == k])
    for key, field in (("by_category", "category"), ("by_source", "source")):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(str(r.get(field)), []).append(r["scores"])
        out[key] = {g: aggregate(groups[g]) for g in sorted(groups)}
    return out
