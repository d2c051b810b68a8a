"""CUAD v1 (master_clauses.csv + full_contract_txt/) -> windows of contracts with one clause, or NONE.

- File names: master_clauses.csv names PDFs; the .txt names differ in suffix case, accents, trailing dots,
  apostrophes and '&'. Both sides are reduced to a key (NFKD, ASCII letters and digits, lower case); rows whose key
  matches no file are reported in notes["unresolved_files"], never dropped silently.
- Clause strings: '<omitted>' joins disjoint pieces; each piece is located on its own (data.text.locate: exact,
  then normalised whitespace/quotes, then rapidfuzz >= 95). Pieces of one category closer than merge_gap
  characters are merged into one span of the contract's own text; that span is the answer.
- Windows: each answer span sits in a window of at most max_context_chars characters that holds no other span
  of its category; NONE examples are windows (consecutive chunks) holding no span of their category, about
  none_ratio per positive, picked by stable hash.
- Splits: by contract, from a stable hash of the resolved file name (80 / 10 / 10 train / valid / test), so no
  contract is in two splits; contracts whose texts are alike (the same filing twice, versions of one agreement)
  share one split (split_by_contract).
"""
import ast
import re
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

from data.example import NONE, SPLITS, DataError, Example, stable_hash
from data.io import read_csv, read_text
from data.text import locate, normalize, snap_end, snap_start

OMITTED = "<omitted>"
LINE_REACH = 400  # characters a window edge may move to fall at a line break instead of a word break
MIN_ANCHOR = 12  # characters: a shorter piece of an <omitted> string is used only within merge_gap of another
MAX_FIRSTS = 200  # occurrences of an <omitted> string's first piece tried when placing the rest after it
SHINGLE, SKETCH = 8, 256  # words per shingle and values per bottom-k sketch, for split_by_contract
# CUAD v1's 41 categories, in category_descriptions.csv's order (engine.extract --clause all asks for each).
CATEGORIES = (
    "Document Name", "Parties", "Agreement Date", "Effective Date", "Expiration Date", "Renewal Term",
    "Notice Period to Terminate Renewal", "Governing Law", "Most Favored Nation", "Non-Compete", "Exclusivity",
    "No-Solicit of Customers", "Competitive Restriction Exception", "No-Solicit of Employees", "Non-Disparagement",
    "Termination for Convenience", "Rofr/Rofo/Rofn", "Change of Control", "Anti-Assignment",
    "Revenue/Profit Sharing", "Price Restrictions", "Minimum Commitment", "Volume Restriction",
    "IP Ownership Assignment", "Joint IP Ownership", "License Grant", "Non-Transferable License",
    "Affiliate License-Licensor", "Affiliate License-Licensee", "Unlimited/All-You-Can-Eat-License",
    "Irrevocable or Perpetual License", "Source Code Escrow", "Post-Termination Services", "Audit Rights",
    "Uncapped Liability", "Cap on Liability", "Liquidated Damages", "Warranty Duration", "Insurance",
    "Covenant Not to Sue", "Third Party Beneficiary",
)
DEFAULT_EXCLUDE = ("Parties",)  # a list of names repeated all through a contract: no window is truly without it
LEFT_OUT_WHY = {"Parties": "party names run through the whole contract, so no window would truly answer NONE"}


def file_key(name: str) -> str:
    name = re.sub(r"\.(pdf|txt)'?$", "", name.strip(), flags=re.IGNORECASE)
    name = unicodedata.normalize("NFKD", name)
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def contract_split(filename: str, fractions=(0.8, 0.1, 0.1)) -> str:
    u = stable_hash("cuad-split", file_key(filename)) / 2**64
    return "train" if u < fractions[0] else "valid" if u < fractions[0] + fractions[1] else "test"


def split_by_contract(files: dict, fractions=(0.8, 0.1, 0.1), group: dict | None = None) -> dict:
    """{file key: split}: the split of each contract's group of alike contracts (alike_groups, or `group` when
    the caller has it), drawn from the group's first key."""
    return {key: contract_split(first, fractions) for key, first in (group or alike_groups(files)).items()}


def alike_groups(files: dict, threshold: float = 0.5) -> dict:
    """{file key: its group's first key}. Contracts whose texts share at least `threshold` of their 8-word
    shingles (estimated from 256-value bottom-k sketches) form one group: CUAD holds the same filing twice
    ('...AGREEMENT.txt' and '...AGREEMENT(1).txt') and versions of one agreement (0.5-0.9 alike), which split
    apart would put a test contract's clauses in training (and a calib contract's in fit)."""
    import numpy as np

    sketch, word_hash = {}, {}
    for key, path in sorted(files.items()):
        words = re.findall(r"\w+", read_text(path, "contract text").lower())
        word_hash.update((x, zlib.crc32(x.encode())) for x in set(words) - word_hash.keys())
        w = np.fromiter(map(word_hash.__getitem__, words), dtype=np.uint64, count=len(words))
        h = np.zeros(max(len(w) - SHINGLE + 1, 0), dtype=np.uint64)
        for j in range(SHINGLE):  # a polynomial hash of each run of SHINGLE words, wrapping at 2**64
            h = h * np.uint64(1000003) + w[j:len(h) + j]
        sketch[key] = np.unique(h)[:SKETCH]
    holders = {}  # sketch value -> keys; only contracts sharing a value can be alike
    for key, values in sketch.items():
        for v in values.tolist():
            holders.setdefault(v, []).append(key)
    group = {key: key for key in sketch}

    def root(k):
        while group[k] != k:
            k = group[k]
        return k
    shared = Counter((a, b) for keys in holders.values() for i, a in enumerate(keys) for b in keys[i + 1:])
    for (a, b), n in sorted(shared.items()):
        if n < threshold * SKETCH / 2:  # too few values in common for the estimate below to reach threshold
            continue
        both = np.union1d(sketch[a], sketch[b])[:SKETCH]  # the union's sketch; its share held by both ~ Jaccard
        if (np.isin(both, sketch[a]) & np.isin(both, sketch[b])).mean() >= threshold:
            ra, rb = sorted((root(a), root(b)))
            group[rb] = ra
    return {key: root(key) for key in sketch}


def read_categories(path: Path) -> dict[str, str]:
    """{category: description} from category_descriptions.csv ("Category: X", "Description: ...")."""
    out = {}
    for line, row in read_csv(path, "CUAD category descriptions"):
        if line == 1:  # the header
            continue
        if len(row) < 2 or not row[0].startswith("Category:"):
            raise DataError(f"{path}:{line}: expected 'Category: NAME','Description: TEXT'")
        out[row[0].split(":", 1)[1].strip()] = row[1].split(":", 1)[-1].strip()
    return out


def _merge(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _columns(header: list, master: Path, descriptions: dict, categories, exclude,
             notes: dict) -> tuple[list, list, list]:
    """(every category column, the ones asked for, the ones that become examples) from the CSV header."""
    if "Filename" not in header:
        raise DataError(f"{master}:1: no 'Filename' column; is this CUAD's master_clauses.csv?")
    cats = [c for c in header if c != "Filename" and f"{c}-Answer" in header]
    missing = [c for c in cats if c not in descriptions]
    if missing:
        raise DataError(f"{master}:1: categories {missing} are not in category_descriptions.csv")
    asked = list(categories or cats)
    unknown = [c for c in asked if c not in cats]
    if unknown:
        raise DataError(f"cuad: unknown categories {unknown}; choose from {cats}")
    wanted = [c for c in asked if c not in (exclude or ())]
    for c in asked:
        if c not in wanted:
            notes["left_out"][c] = {"clause_strings": 0, "why": LEFT_OUT_WHY.get(c, "excluded by the caller")}
    return cats, asked, wanted


def _cell_strings(row: dict, cat: str, where: str) -> list[str]:
    try:
        strings = ast.literal_eval(row.get(cat) or "[]")
        assert isinstance(strings, list) and all(isinstance(x, str) for x in strings)
    except (ValueError, SyntaxError, AssertionError):
        raise DataError(f"{where}: column {cat!r} is not a Python list of strings") from None
    return strings


def _spans(strings: list[str], text: str, norm: dict, clauses: dict, where: str, show: int,
           gap: int) -> tuple[list, bool]:
    """Where one cell's clause strings sit in the contract: (spans, whether any string was not found). Each string
    is counted as aligned (found as it is), repaired (found after splitting at <omitted> or by locate) or
    rejected (some piece not found in order: none of it is used). norm caches the contract's normalised text
    across the row's cells; gap is the merge gap, within which a short piece must sit by a longer one."""
    spans, uncertain = [], False
    for cl in strings:
        clauses["total"] += 1
        pieces = [p.strip() for p in cl.split(OMITTED) if p.strip()]
        clauses["omitted_split"] += len(pieces) > 1
        clauses["pieces"] += len(pieces)
        placed = _place(pieces, text, norm) if pieces else None
        if placed is None:
            status = "rejected"
        else:
            status = "aligned" if len(pieces) == 1 and placed[0][2] else "repaired"
            if len(placed) > 1:  # '.', 'us.', '7/27': too common to stand alone; kept only beside their neighbours
                gaps = [q[0] - p[1] for p, q in zip(placed, placed[1:])]  # in order: gaps[i] follows piece i
                near = [min(gaps[max(i - 1, 0):i + 1]) for i in range(len(placed))]
                kept = [p for p, n in zip(placed, near) if p[1] - p[0] >= MIN_ANCHOR or n <= gap]
                clauses["short_dropped"] += len(placed) - len(kept)
                placed = kept
                if not kept:  # only short pieces, each far from the next: where the clause is, nobody can say
                    status = "rejected"
            for a, b, _ in placed:
                a2, b2 = _whole_words(text, a, b)
                clauses["widened"] += (a2, b2) != (a, b)
                spans.append((a2, b2))
        clauses[status] += 1
        if status == "rejected":
            uncertain = True
            if len(clauses["rejected_list"]) < show:
                why = "only short pieces, far apart" if placed == [] else "not found in the contract"
                clauses["rejected_list"].append(f"{where}: {why}: {cl[:80]!r}")
    return spans, uncertain


def _place(pieces: list[str], text: str, norm: dict) -> list[tuple[int, int, bool]] | None:
    """(start, end, found exactly) of one clause string's pieces, in reading order, or None when a piece is not
    found. A whole string takes its first occurrence; a string cut at <omitted> takes the occurrence of its first
    piece that keeps all its pieces in order and closest together (CUAD marks where text was left out of one
    highlighted passage, so its pieces follow each other), and only when no order fits, each piece's first."""
    firsts, i = [], text.find(pieces[0])
    while i >= 0 and len(firsts) < (1 if len(pieces) == 1 else MAX_FIRSTS):
        firsts.append((i, i + len(pieces[0]), True))
        i = text.find(pieces[0], i + 1)
    if not firsts:
        if "text" not in norm:
            norm["text"] = normalize(text)
        m = locate(pieces[0], text, norm_hay=norm["text"])
        firsts = [(m.start, m.end, False)] if m else []
    best = None
    for first in firsts:
        out = [first]
        for piece in pieces[1:]:
            j = text.find(piece, out[-1][1])
            if j >= 0:
                out.append((j, j + len(piece), True))
                continue
            m = locate(piece, text[out[-1][1]:])
            if m is None:
                break
            out.append((out[-1][1] + m.start, out[-1][1] + m.end, False))
        else:
            if best is None or out[-1][1] - out[0][0] < best[-1][1] - best[0][0]:
                best = out
    if best is None and firsts and len(pieces) > 1:  # a few strings list their pieces out of reading order
        rest = [_place([piece], text, norm) for piece in pieces[1:]]
        best = None if None in rest else sorted([firsts[0]] + [r[0] for r in rest])
    return best


def _whole_words(text: str, a: int, b: int, reach: int = 40) -> tuple[int, int]:
    """[a, b) widened to whole words: some CUAD highlights stop inside a word ('Manufacturing Agreemen')."""
    lo, hi = max(0, a - reach), min(len(text), b + reach)
    while a > lo and text[a - 1].isalnum() and text[a].isalnum():
        a -= 1
    while b < hi and text[b - 1].isalnum() and text[b].isalnum():
        b += 1
    return a, b


def _clause_windows(text: str, merged: list, key: tuple, max_context_chars: int, notes: dict) -> list:
    """(answer start, end, window start, end) for each merged clause span: the clause with a seeded share of
    the room left on each side (never into a neighbouring span), edges snapped to a line break or a word."""
    out = []
    for k, (a, b) in enumerate(merged):
        if b - a > max_context_chars:
            notes["too_long"] += 1
            continue
        lo = merged[k - 1][1] if k else 0
        hi = merged[k + 1][0] if k + 1 < len(merged) else len(text)
        budget = max_context_chars - (b - a)
        left = min(a - lo, budget * (stable_hash("cuad-pad", *key, str(a)) % 1000) // 1000)
        right = min(hi - b, budget - left)
        left = min(a - lo, budget - right)  # give what the right side could not use back to the left
        ws = snap_start(text, a - left, a, line_reach=LINE_REACH, any_space=True)
        we = snap_end(text, b + right, b, line_reach=LINE_REACH)
        out.append((a, b, ws, we))
    return out


def _none_examples(candidates: list, n: int, query: dict, split: str, seed: int, max_context_chars: int) -> list:
    """n NONE examples: consecutive max_context_chars chunks of contracts that overlap no clause of the category
    and hold none of its clause strings elsewhere either (a date or a title repeated in a page header), picked by
    a seeded hash. candidates: (stem, category, text, merged clause spans, clause strings) per contract and
    category. A string counts in any case and spacing: a footer's 'Sponsorship Agreement - July 16, 2012' names
    the document its title 'SPONSORSHIP AGREEMENT' does."""
    chunks = []  # (hash, stem, cat, chunk start, chunk end)
    cut = {}  # stem -> [(chunk start, end, its text folded)]: the chunks depend on the text only, not the category
    for stem, cat, text, merged, strings in candidates:
        if stem not in cut:
            cut[stem], start = [], 0
            while start < len(text):
                end = snap_end(text, min(len(text), start + max_context_chars), start + 1, line_reach=LINE_REACH)
                cut[stem].append((start, end, _fold(text[start:end])))
                start = end
        needles = {_fold(p) for cl in strings for p in cl.split(OMITTED)
                   if len(p.strip()) >= MIN_ANCHOR or p.strip() == cl.strip()} - {""}
        for start, end, folded in cut[stem]:
            if (not any(a < end and b > start for a, b in merged) and folded
                    and not any(x in folded for x in needles)):
                chunks.append((stable_hash("cuad-none", str(seed), stem, cat, str(start)), stem, cat, start, end))
    chunks.sort()
    texts = {stem: text for stem, _, text, _, _ in candidates}
    return [Example(id=f"cuad:{stem}:{cat}:none@{a}", source="cuad", category=cat, query=query[cat],
                    context=texts[stem][a:b].strip(), answer=NONE, split=split)
            for _, stem, cat, a, b in chunks[:n]]


def _fold(text: str) -> str:
    """text in one case with its whitespace runs as one space and its ends stripped: for "does this chunk hold
    that string" asked loosely."""
    return " ".join(text.casefold().split())


def _contract_files(txt_dir: Path) -> dict:
    if not txt_dir.is_dir():
        raise DataError(f"{txt_dir}: contract text directory not found")
    files = {}
    for p in txt_dir.iterdir():
        if p.suffix.lower() == ".txt":
            files.setdefault(file_key(p.name), p)
    return files


def load(root, split=None, *, max_context_chars: int = 4000, none_ratio: float = 0.5, merge_gap: int = 200,
         categories=None, exclude=DEFAULT_EXCLUDE, with_description: bool = False, seed: int = 0, show: int = 5):
    """(examples, notes). The query is the category name ("Governing Law"), or with_description=True the name
    followed by its description from category_descriptions.csv. Every clause string is validated, the left-out
    categories' too; examples are built only for the categories asked for and not excluded."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CUAD directory not found; pass cuad:DIR with master_clauses.csv, full_contract_txt/")
    splits = SPLITS if split is None else (split,)
    descriptions = read_categories(root / "category_descriptions.csv")
    txt_dir = root / "full_contract_txt"
    files = _contract_files(txt_dir)
    group = alike_groups(files)
    split_of = split_by_contract(files, group=group)
    master = root / "master_clauses.csv"
    clauses = {"total": 0, "aligned": 0, "repaired": 0, "rejected": 0, "omitted_split": 0, "pieces": 0,
               "short_dropped": 0, "widened": 0, "rejected_list": []}
    notes = {"unresolved_files": [], "resolved_files": 0, "contracts": {s: 0 for s in SPLITS}, "clauses": clauses,
             "too_long": 0, "counts": {}, "left_out": {},
             "split_rule": "stable hash of the contract file name (for alike contracts, their group's first "
                           "name): 80/10/10 train/valid/test",
             # data.example.holdout's unit for the fit / calib cut: an alike contract goes with its group's first
             "holdout_units": {files[k].stem: files[first].stem for k, first in group.items() if k != first}}
    positives = {s: [] for s in splits}
    none_candidates = {s: [] for s in splits}
    rows = read_csv(master, "CUAD master_clauses.csv")
    header = next(rows, (1, []))[1]
    cats, asked, wanted = _columns(header, master, descriptions, categories, exclude, notes)
    query = {c: f"{c} ({descriptions[c]})" if with_description else c for c in cats}
    for line, values in rows:
        row = dict(zip(header, values))
        fname = row.get("Filename", "")
        path = files.get(file_key(fname))
        if path is None:
            notes["unresolved_files"].append(fname)
            continue
        notes["resolved_files"] += 1
        s = split_of[file_key(path.name)]
        notes["contracts"][s] += 1
        if s not in splits:
            continue
        text, norm, stem = read_text(path, "contract text"), {}, path.stem
        for cat in asked:
            strings = _cell_strings(row, cat, f"{master}:{line}")
            spans, uncertain = _spans(strings, text, norm, clauses, f"{master}:{line} {cat!r} ({path.name})", show,
                                      merge_gap)
            if cat not in wanted:  # validated and counted above; no examples
                notes["left_out"][cat]["clause_strings"] += len(strings)
                continue
            merged = _merge(spans, merge_gap)
            for a, b, ws, we in _clause_windows(text, merged, (str(seed), stem, cat), max_context_chars, notes):
                positives[s].append(Example(id=f"cuad:{stem}:{cat}:{a}", source="cuad", category=cat,
                                            query=query[cat], context=text[ws:we].strip(), answer=text[a:b],
                                            split=s))
            # a category with an unlocated clause, or with an answer column that names a clause no string
            # shows ('California', 'Perpetual'), has no trustworthy NONE window
            if not uncertain and (strings or (row.get(f"{cat}-Answer") or "").strip() in ("", "No")):
                none_candidates[s].append((stem, cat, text, merged, strings))
    if not notes["resolved_files"]:
        raise DataError(f"{txt_dir}: no contract in master_clauses.csv matched a .txt file")
    examples = []
    for s in splits:
        nones = _none_examples(none_candidates[s], round(none_ratio * len(positives[s])), query, s, seed,
                               max_context_chars)
        notes["counts"][s] = {"contracts": notes["contracts"][s], "clause": len(positives[s]), "none": len(nones)}
        examples += positives[s] + nones
    return examples, notes
