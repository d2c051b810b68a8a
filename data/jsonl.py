"""User data: one JSON object per line with the Example fields. Errors name the file and line.

Required: query, context, answer (a clause copied from context, or "NONE", in any case, quoted or with a final
period). Optional: id (default "<file stem>:<line>"), category (default: query), split (default "train"), source
(default "jsonl"). Any other key is an error: a misspelt "spilt": "test" would otherwise put a test row in
training. So is a file without one example: an empty export would pass data.check with nothing checked.
Whether the answer is really in its context is the validator's job (it repairs or rejects, and names the line).
"""
import difflib
from pathlib import Path

from data.example import NONE, SPLITS, DataError, Example, is_none
from data.io import read_jsonl

REQUIRED = ("query", "context", "answer")
OPTIONAL = ("id", "category", "split", "source")


def load(path, split=None):
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; jsonl:FILE needs a .jsonl file")
    examples, origins, seen = [], {}, {}
    for n, d in read_jsonl(path, "JSONL data"):
        for k in d:  # before the required fields, so {"Answer": ...} is named as the slip it is, not as missing
            if k not in REQUIRED + OPTIONAL:
                close = difflib.get_close_matches(k.lower(), REQUIRED + OPTIONAL, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(f"{path}:{n}: unknown field {k!r}{hint}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
        for k in REQUIRED:
            if k not in d:
                raise DataError(f"{path}:{n}: missing field {k!r}; each line needs {', '.join(REQUIRED)}")
        for k in REQUIRED + OPTIONAL:
            if k in d and not isinstance(d[k], str):
                raise DataError(f"{path}:{n}: field {k!r} must be a string, got {type(d[k]).__name__}")
        if not d["answer"].strip():
            raise DataError(f"{path}:{n}: empty answer; write the clause copied from the context, or NONE")
        if not d["query"].strip():
            raise DataError(f"{path}:{n}: empty query; give the clause type or the attorney's question")
        # 'none', 'None.', '"NONE"': what the metrics and the channel decoder read as NONE is NONE here too, never
        # a one-word clause that happens to be in a context holding 'nonetheless'
        answer = NONE if is_none(d["answer"]) else d["answer"].strip()
        if not d["context"].strip():
            raise DataError(f"{path}:{n}: empty context; give the contract text the answer is copied from")
        s = d.get("split", "train")
        if s not in SPLITS:
            raise DataError(f"{path}:{n}: split {s!r} is not one of {', '.join(SPLITS)}")
        ex_id = d.get("id") or f"{path.stem}:{n}"
        if ex_id in seen:
            raise DataError(f"{path}:{n}: id {ex_id!r} already used on line {seen[ex_id]}; ids must be unique")
        seen[ex_id] = n
        if split is not None and s != split:
            continue
        examples.append(Example(id=ex_id, source=d.get("source", "jsonl"), category=d.get("category") or d["query"],
                                query=d["query"], context=d["context"], answer=answer, split=s))
        origins[ex_id] = f"{path}:{n}"
    if not seen:
        raise DataError(f"{path}: no examples (empty or blank lines only); write one JSON object per line")
    return examples, {"origins": origins}
