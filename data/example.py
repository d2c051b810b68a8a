"""The Example record, the imperative prompt templates, and the one error type users see from data/."""
import hashlib
from dataclasses import dataclass

NONE = "NONE"  # the answer when the context holds no matching clause


def is_none(text: str) -> bool:
    """True when an answer (or a prediction) is the abstention NONE, in any case, quoted or with a final period,
    whatever whitespace surrounds it: one rule for the data loaders, the metrics and the channel decoder."""
    return " ".join((text or "").split()).strip(" .\"'`").upper() == NONE


SPLITS = ("train", "valid", "test")
# The train split cut in two by whole units (ACORD queries, CUAD contracts, synthetic documents, JSONL rows), so
# that what decides NONE can be fitted on queries the model never trained on: train on "fit", calibrate on
# "calib" (engine.calibrate), test on "test". "train" stays the whole train split.
HOLDOUT_SPLITS = ("fit", "calib")
CALIB_SHARE = 1 / 8  # of the train split's units, at least one
# the parts of the data each split name covers: "train" is "fit" and "calib" together
SPLIT_PARTS = {"train": {"fit", "calib"}, "fit": {"fit"}, "calib": {"calib"}, "valid": {"valid"}, "test": {"test"}}


def splits_overlap(a: str | None, b: str | None) -> bool:
    """Whether two split names share examples (unknown names overlap only when equal)."""
    return bool(SPLIT_PARTS.get(a, {a}) & SPLIT_PARTS.get(b, {b}))


class DataError(Exception):
    """Bad input a user can fix. The message is one line: where (file:line or key), what is wrong, what to do."""


@dataclass(frozen=True)
class Example:
    id: str        # stable across runs: it picks the template and seeds every deterministic choice
    source: str    # "acord" | "cuad" | "jsonl" | "synthetic"
    category: str  # clause category (ACORD: the query's category; CUAD: the column name)
    query: str     # what to look for: a clause type or an attorney's query
    context: str   # contract text or excerpt
    answer: str    # the clause, verbatim from context, or NONE
    split: str     # "train" | "valid" | "test"


def holdout_unit(ex: "Example") -> str:
    """The unit an official split is drawn by, so that a held-out part shares nothing with the rest: the ACORD
    query (acord:SPLIT:QUERY:...), the CUAD contract (cuad:STEM:...), the synthetic document (synthetic:SPLIT:I:...),
    or the example itself (JSONL)."""
    parts = ex.id.split(":")
    if ex.source == "acord" and len(parts) >= 3:
        return parts[2]
    if ex.source == "cuad" and len(parts) >= 2:
        return parts[1]
    if ex.source == "synthetic" and len(parts) >= 3:
        return parts[2]
    return ex.id


def holdout(examples: list["Example"], part: str, same_unit: dict | None = None) -> list["Example"]:
    """The "calib" or "fit" part of train-split examples: the CALIB_SHARE of units (holdout_unit) that hash lowest
    go to calib, the rest to fit; each example keeps its order. The cut depends only on the units present.
    same_unit: {unit: the unit it goes with} from the loader (CUAD's alike contracts, data.cuad.alike_groups)."""
    assert part in HOLDOUT_SPLITS, part
    same_unit = same_unit or {}

    def unit(ex):
        u = holdout_unit(ex)
        return same_unit.get(u, u)
    units = sorted({unit(ex) for ex in examples}, key=lambda u: (stable_hash("holdout", u), u))
    calib = set(units[:max(1, round(CALIB_SHARE * len(units)))]) if units else set()
    return [ex for ex in examples if (unit(ex) in calib) == (part == "calib")]


def stable_hash(*parts: str) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike hash(), which is salted)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big")


# Imperative, no system message, no chat pleasantries: the model is a copier, not an assistant.
# The query is always set apart ("...: {query}") so it reads well for clause names ("Governing Law"), short
# attorney queries ("cap on liability") and long descriptions ("A clause that states that ...").
TEMPLATES = (
    "Copy the exact clause from this contract that matches: {query}\n"
    "If the contract has no such clause, answer NONE.\n\nContract:\n{context}",
    "Contract:\n{context}\n\nClause to find: {query}\n"
    "Copy that clause word for word from the contract above. If it is not there, answer NONE.",
    "Find the clause in the contract below that fits this description and copy it verbatim: {query}\n"
    "Write NONE if no clause fits.\n\n{context}",
    "Extract, exactly as written, the contract text for: {query}\n"
    "Reply NONE when the contract has none.\n\n---\n{context}\n---",
    "{context}\n\nQuote verbatim the clause of this contract for: {query}\n"
    "Answer NONE if the contract contains no such clause.",
)


def template_index(example_id: str) -> int:
    return stable_hash("template", example_id) % len(TEMPLATES)


def render_prompt(ex: Example) -> str:
    """The user message for ex: one of TEMPLATES, picked by ex.id so training and evaluation format alike."""
    return TEMPLATES[template_index(ex.id)].format(query=ex.query, context=ex.context)
