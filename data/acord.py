"""ACORD (BEIR layout) -> Examples: each relevant clause hidden among clauses rated irrelevant for the same query.

Official query splits only: a query's examples come from qrels/<its split>.tsv, so no test query reaches training.
For each query and each clause rated >= min_score (3 = four stars), the context is that clause among k clauses
rated 0 for the query, in a deterministic shuffle; the answer is the clause. Abstention examples hold k + 1
rated-0 clauses and answer NONE. Training examples are repeated in the query's short / medium / long wordings
(query_formats.tsv); valid and test use the official (short) query text only.
"""
import random
import re
from collections import Counter
from pathlib import Path

from data.example import NONE, SPLITS, DataError, Example, stable_hash
from data.io import read_jsonl, read_tsv

WORDINGS = ("short", "medium", "long")
SEP = "\n\n"  # between clauses in a context


def _key(text: str) -> str:
    """Loose key that matches query_formats.tsv rows to query ids (they differ in quotes, case and hyphens)."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _closest(formats: dict, qid: str):
    """query_formats.tsv has small wording slips ("includes" for "include"): accept a near-identical key."""
    from rapidfuzz import fuzz, process

    hit = process.extractOne(_key(qid), list(formats), scorer=fuzz.ratio, score_cutoff=90)
    return formats[hit[0]] if hit else None


def _read_formats(path: Path) -> dict[str, tuple[str, str, str]]:
    if not path.exists():
        return {}
    out = {}
    for n, row in read_tsv(path, "query_formats.tsv"):
        if len(row) < 3:
            raise DataError(f"{path}:{n}: expected 3 tab-separated wordings (short, medium, long), got {len(row)}")
        out[_key(row[0])] = tuple(c.strip() for c in row[:3])
    return out


def _or_empty(value):
    return "" if value is None else value


def load(root, split=None, *, k: int = 4, min_score: int = 3, abstain_ratio: float = 0.25,
         augment: bool = True, seed: int = 0):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ACORD directory not found; pass acord:DIR with corpus.jsonl, queries.jsonl, qrels/")
    splits = SPLITS if split is None else (split,)
    corpus = {}
    for n, d in read_jsonl(root / "corpus.jsonl", "ACORD corpus"):
        if "_id" not in d or "text" not in d:
            raise DataError(f"{root / 'corpus.jsonl'}:{n}: missing field '_id' or 'text'")
        if not isinstance(d["text"], str):
            raise DataError(f"{root / 'corpus.jsonl'}:{n}: field 'text' must be a string, got "
                            f"{type(d['text']).__name__}")
        corpus[str(d["_id"])] = d["text"]
    queries = {}
    for n, d in read_jsonl(root / "queries.jsonl", "ACORD queries"):
        meta, where = d.get("metadata") or {}, f"{root / 'queries.jsonl'}:{n}"
        if not isinstance(meta, dict):
            raise DataError(f"{where}: field 'metadata' must be an object with 'split' (and 'category')")
        if "_id" not in d or "split" not in meta:
            raise DataError(f"{where}: missing field '_id' or 'metadata.split'")
        fields = {"text": _or_empty(d.get("text")), "metadata.split": meta["split"],  # null: as if absent
                  "metadata.category": _or_empty(meta.get("category")),
                  "_id": str(d["_id"]) if type(d["_id"]) is int else d["_id"]}  # qrels name queries as text
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{where}: field {bad[0]!r} must be a string")
        qid = fields["_id"]
        queries[qid] = (fields["text"] or qid, fields["metadata.category"] or qid, fields["metadata.split"])
    formats = _read_formats(root / "query_formats.tsv")

    examples, notes = [], {"counts": {}, "unmatched_query_formats": []}
    for s in splits:
        qrels_path = root / "qrels" / f"{s}.tsv"
        pos, neg = {}, {}
        for n, row in read_tsv(qrels_path, f"ACORD qrels ({s})", header=["query-id", "corpus-id", "score"]):
            if len(row) != 3:
                raise DataError(f"{qrels_path}:{n}: expected query-id, corpus-id, score; got {len(row)} fields")
            qid, cid, score = row
            if qid not in queries:
                raise DataError(f"{qrels_path}:{n}: query {qid!r} is not in queries.jsonl")
            if queries[qid][2] != s:
                raise DataError(f"{qrels_path}:{n}: query {qid!r} belongs to split {queries[qid][2]!r}, not {s!r}")
            if cid not in corpus:
                raise DataError(f"{qrels_path}:{n}: clause {cid!r} is not in corpus.jsonl")
            try:
                score = int(score)
            except ValueError:
                score = None
            if score not in range(5):  # a 7 would pass as a positive and a -2 vanish, silently
                raise DataError(f"{qrels_path}:{n}: score {row[2]!r} is not an integer 0-4 (the lawyers' 1-5 stars "
                                "less one); fix the line")
            if score >= min_score:
                pos.setdefault(qid, []).append(cid)
            elif score == 0:
                neg.setdefault(qid, []).append(cid)
        c = Counter()
        for qid in sorted(set(pos) | set(neg)):
            text, category, _ = queries[qid]
            if s == "train" and augment:
                wf = formats.get(_key(qid)) or _closest(formats, qid)
                if wf is None:
                    notes["unmatched_query_formats"].append(qid)
                    wordings = [("short", text)]
                else:
                    wordings = [("short", text)] + [(w, t) for w, t in zip(WORDINGS[1:], wf[1:]) if t]
            else:
                wordings = [("short", text)]
            negs = sorted(neg.get(qid, []))
            if len(negs) < k + 1:
                raise DataError(f"{qrels_path}: query {qid!r} has {len(negs)} clauses rated 0; need k+1 = {k + 1}")
            contexts = []  # (id stem, clause ids in order, answer)
            for cid in sorted(pos.get(qid, [])):
                rng = random.Random(stable_hash("acord", str(seed), qid, cid))
                ids = rng.sample(negs, k) + [cid]
                rng.shuffle(ids)
                contexts.append((cid, ids, corpus[cid]))
            n_none = max(1, round(abstain_ratio * len(pos.get(qid, [])))) if abstain_ratio > 0 else 0
            for j in range(n_none):
                rng = random.Random(stable_hash("acord-none", str(seed), qid, str(j)))
                contexts.append((f"none{j}", rng.sample(negs, k + 1), NONE))
            for stem, ids, answer in contexts:
                context = SEP.join(corpus[i] for i in ids)
                for w, qtext in wordings:
                    examples.append(Example(id=f"acord:{s}:{qid}:{stem}:{w}", source="acord", category=category,
                                            query=qtext, context=context, answer=answer, split=s))
                    c["none" if answer == NONE else "clause"] += 1
            c["queries"] += 1
        notes["counts"][s] = dict(c)
    return examples, notes
