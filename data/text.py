"""Text surgery shared by data/ and engine/: finding a quote in a text, cutting at words and paragraphs, windows.

- normalize / locate / Match: where a quote occurs in a text, cheapest first: exact substring; the same after
  collapsing whitespace runs (and, with fold, unifying curly quotes and dashes); then rapidfuzz's alignment.
  Offsets are always the original text's, so what is found is a slice of it. Used by the validator (answers
  must be their context's own text), the CUAD loader (clause strings in contracts) and extraction (a free-text
  generation snapped onto the contract).
- snap_start / snap_end: move a cut so it does not split a word (or, with line_reach, falls at a line end).
- paragraphs / cut_context: a context shortened to a budget by dropping whole paragraphs, the answer kept (a
  word-cut window of one left out fills a budget otherwise left mostly empty).
- make_windows: overlapping windows over a text too long for one prompt.
"""
import bisect
import random
import re
from dataclasses import dataclass

from rapidfuzz import fuzz

from data.example import NONE, stable_hash

MIN_SCORE = 95.0  # the validator's bar for a fuzzy repair: a typo or two in a clause, not a different clause
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                       "\u2014": "-", "\u00a0": " ", "\u2212": "-"})
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\S+")
_SPACE_OR_NEWLINE = re.compile(r"[ \n]")
_ANY_SPACE = re.compile(r"\s")
# A blank line and the whitespace around it; a "blank" line may hold any whitespace but a newline, \r included, so
# "\r\n\r\n" breaks too and no \r is left at a paragraph's end (model/generate.py's _PARAGRAPH_BREAK is the same
# pattern: model/ cannot import data/).
PARAGRAPH_BREAK = re.compile(r"\r?\n[^\S\n]*\n\s*")


# ---- locating a quote -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    start: int     # text[start:end] is the quote, in the searched text's own characters
    end: int
    how: str       # "exact" | "normalized" | "fuzzy"
    score: float   # 100 unless fuzzy

    @property
    def verbatim(self) -> bool:
        """The quote occurs character for character (after stripping its ends)."""
        return self.how == "exact"


def normalize(text: str, fold: bool = True) -> tuple[str, list[int]]:
    """text with whitespace runs collapsed to one space (ends kept as one space) and, with fold, curly quotes,
    dashes and no-break spaces made plain; plus for every character of the result the index of the original
    character it came from (a collapsed run maps to its first character)."""
    if fold:
        text = text.translate(_FOLD)  # one character for one: indices stay valid
    out, index, last = [], [], 0
    for m in _WS.finditer(text):
        out.append(text[last:m.start()])
        index.extend(range(last, m.start()))
        out.append(" ")
        index.append(m.start())
        last = m.end()
    out.append(text[last:])
    index.extend(range(last, len(text)))
    return "".join(out), index


def locate(needle: str, hay: str, min_score: float = MIN_SCORE, *, fold: bool = True, words: bool = False,
           norm_hay: tuple[str, list[int]] | None = None) -> Match | None:
    """Where needle (its ends stripped) occurs in hay, first occurrence, or None.

    Exact, then normalised (see normalize; fold as given), then fuzzy, which differs by caller:
    words=False (the validator, CUAD): rapidfuzz's partial alignment scoring at least min_score and covering at
      least 90% of the needle, its span trimmed of whitespace; score = the alignment's.
    words=True (extraction): the alignment anywhere, then the span between nearby word boundaries with the
      highest fuzz.ratio, kept when that ratio is at least min_score; score = that ratio.
    norm_hay = normalize(hay, fold) may be passed in when many needles are looked up in one haystack.
    """
    needle = needle.strip()
    if not needle:
        return None
    i = hay.find(needle)
    if i >= 0:
        return Match(i, i + len(needle), "exact", 100.0)
    nh, index = norm_hay if norm_hay is not None else normalize(hay, fold)
    if words:  # word boundaries are those of the text itself: no run of whitespace at either end
        lead, trail = int(nh[:1] == " "), int(len(nh) > 1 and nh[-1:] == " ")
        nh, index = nh[lead:len(nh) - trail], index[lead:len(index) - trail]
    if not nh.strip():
        return None
    nn = normalize(needle, fold)[0].strip()
    j = nh.find(nn)
    if j >= 0:
        return Match(index[j], index[j + len(nn) - 1] + 1, "normalized", 100.0)
    if words:
        return _fuzzy_words(nn, nh, index, min_score)
    return _fuzzy_cover(nn, nh, index, hay, min_score)


def _fuzzy_cover(nn: str, nh: str, index: list[int], hay: str, min_score: float) -> Match | None:
    if len(nn) > len(nh):  # rapidfuzz would swap the strings; a needle longer than its haystack is not in it
        return None
    a = fuzz.partial_ratio_alignment(nn, nh, score_cutoff=min_score)
    if a is None or a.dest_end - a.dest_start < 0.9 * len(nn):
        return None
    start, end = index[a.dest_start], index[a.dest_end - 1] + 1
    while start < end and hay[start].isspace():
        start += 1
    while end > start and hay[end - 1].isspace():
        end -= 1
    return Match(start, end, "fuzzy", a.score)


def _fuzzy_words(nn: str, nh: str, index: list[int], min_score: float) -> Match | None:
    al = fuzz.partial_ratio_alignment(nn, nh)
    s, e = al.dest_start, al.dest_end
    # the alignment span has the needle's length and may cut words: try nearby word boundaries
    starts = [m.start() for m in _WORD.finditer(nh)]
    ends = [m.end() for m in _WORD.finditer(nh)]
    si = max((k for k, w in enumerate(starts) if w <= s), default=0)
    ei = min((k for k, w in enumerate(ends) if w >= e), default=len(ends) - 1)
    best = None
    for a in starts[max(0, si - 3): si + 4]:
        for b in ends[max(0, ei - 3): ei + 4]:
            if b > a:
                r = fuzz.ratio(nn, nh[a:b])
                if best is None or r > best[0]:
                    best = (r, a, b)
    if best is None or best[0] < min_score:
        return None
    r, a, b = best
    return Match(index[a], index[b - 1] + 1, "fuzzy", float(r))


# ---- cutting at words, lines and paragraphs ---------------------------------------------------------------
def snap_start(text: str, i: int, limit: int, *, line_reach: int = 0, any_space: bool = False) -> int:
    """A cut start moved forward (not beyond limit) so no partial word begins the piece: to the next line start
    when one is within line_reach characters, else past the cut word. The word ends at a space or newline, or
    with any_space at any whitespace character (tab, carriage return, ...)."""
    i = max(i, 0)
    if i == 0 or text[i - 1] == "\n":
        return i
    nl = text.find("\n", i, min(limit, i + line_reach))
    if nl >= 0:
        return nl + 1
    if text[i - 1].isspace():
        return i
    m = (_ANY_SPACE if any_space else _SPACE_OR_NEWLINE).search(text, i, limit)
    return m.end() if m else i


def snap_end(text: str, j: int, limit: int, *, line_reach: int = 0) -> int:
    """A cut end moved back (not below limit) so no partial word ends the piece: to the last line end when one
    is within line_reach characters, else to the space or newline before the cut word."""
    if j >= len(text) or text[j] == "\n":
        return min(j, len(text))
    nl = text.rfind("\n", max(limit, j - line_reach), j)
    if nl >= limit and nl > 0:
        return nl
    if text[j].isspace():
        return j
    k = max(text.rfind(" ", limit, j), text.rfind("\n", limit, j))
    return k if k >= limit else j


def paragraphs(text: str) -> list[tuple[int, int]]:
    """[start, end) of the paragraphs of text: runs separated by a blank line ("\n\n" or more)."""
    out, i = [], 0
    for m in PARAGRAPH_BREAK.finditer(text):
        if m.start() > i:
            out.append((i, m.start()))
        i = m.end()
    if i < len(text):
        out.append((i, len(text)))
    return out


def cut_context(context: str, answer: str, max_chars: int, key: str = "") -> str:
    """At most max_chars of context, holding the whole answer, cut so that nothing marks where the answer is.

    Whole paragraphs first: the answer's paragraph(s) stay, the others are taken in a random order (seeded by
    `key`, the example id), each kept if it still fits; what stays keeps the context's order. For ACORD this keeps
    whole distractor clauses and leaves the clause at a random place among them. If more than half the room
    beside the answer is still empty (the paragraphs left out are longer than it, as ACORD's clauses often are), a
    window of the first paragraph left out, at a random offset and cut at words, fills it in that paragraph's
    place: else a long clause's context was often the clause alone (a fifth of ACORD's train clauses at seq_len
    1024, teaching "copy the start of the context") and a NONE context could be a page number. Only when
    the answer's own paragraph(s) are too long is a character window taken, with the answer at a uniformly random
    offset in it (not centred: a model must not learn "the answer is in the middle"), cut at word boundaries.
    NONE: the same with no paragraph protected. Answers must be validated (verbatim in context) first.
    """
    if len(context) <= max_chars:
        return context
    rng = random.Random(stable_hash("cut", key))
    blocks = paragraphs(context)
    a = b = -1
    if answer != NONE:
        a = context.find(answer)
        assert a >= 0, "answer not in context: validate examples first (data.validate)"
        b = a + len(answer)
    keep = [i for i, (s, e) in enumerate(blocks) if s < b and e > a]
    others = [i for i in range(len(blocks)) if i not in keep]
    rng.shuffle(others)

    def gap(i: int, j: int) -> int:   # characters between kept paragraphs i < j: their own text when neighbours
        return blocks[j][0] - blocks[i][1] if j == i + 1 else 2

    chosen = list(keep)   # sorted; keep is a run of neighbours
    size = blocks[keep[-1]][1] - blocks[keep[0]][0] if keep else 0   # len of the joined text, exactly
    spare, dropped = max_chars - size, []
    for i in others:
        k = bisect.bisect(chosen, i)
        p, q = (chosen[k - 1] if k else None), (chosen[k] if k < len(chosen) else None)
        grow = blocks[i][1] - blocks[i][0] + (p is not None and gap(p, i)) + (q is not None and gap(i, q)) \
            - (p is not None and q is not None and gap(p, q))
        if size + grow <= max_chars:
            chosen.insert(k, i)
            size += grow
        else:
            dropped.append(i)
    pieces = {i: context[blocks[i][0]:blocks[i][1]] for i in chosen}
    if size <= max_chars and dropped and max_chars - size > spare / 2:
        i = dropped[0]   # the first paragraph left out, in the seeded order: a random one, not the answer's neighbour
        width = max_chars - size - (2 if chosen else 0)   # a blank line beside what is kept
        para = context[blocks[i][0]:blocks[i][1]]
        if width > 0:
            s = rng.randint(0, max(0, len(para) - width))
            e = s + width
            piece = para[snap_start(para, s, e):snap_end(para, e, s)].strip()
            if piece:
                pieces[i] = piece
    whole, parts, prev = set(chosen), [], None
    for i in sorted(pieces):   # neighbours keep the text between them (an answer may span paragraphs)
        if prev is not None:
            own = prev == i - 1 and i in whole and prev in whole   # not beside the window of one left out
            parts.append(context[blocks[prev][1]:blocks[i][0]] if own else "\n\n")
        parts.append(pieces[i])
        prev = i
    text = "".join(parts)
    if len(text) <= max_chars:
        return text
    # the answer's own paragraph(s) are longer than the budget: a window with the answer at a random offset
    assert answer != NONE and chosen == keep, "a cut over budget without an answer too long for it"
    a = text.find(answer)
    b = a + len(answer)
    room = max(0, max_chars - len(answer))
    lo, hi = max(0, room - (len(text) - b)), min(a, room)   # chars kept left of the answer
    left = rng.randint(lo, hi) if hi >= lo else min(a, room)
    s = a - left
    e = min(len(text), b + room - left)
    s, e = snap_start(text, s, a), snap_end(text, e, b)
    return text[s:e].strip()


# ---- windows over a long text -----------------------------------------------------------------------------
def make_windows(text: str, count_tokens, max_tokens: int, overlap: float = 0.25) -> list[tuple[int, int]]:
    """Cover text with [start, end) windows of at most max_tokens tokens each (count_tokens(str) -> int),
    consecutive windows sharing about `overlap` of their length, cut at whitespace where possible. A clause
    shorter than the overlap is therefore whole in at least one window."""
    assert 0 <= overlap < 0.9 and max_tokens > 0
    n_tok = count_tokens(text)
    if n_tok <= max_tokens:
        return [(0, len(text))]
    chars = max(32, int(max_tokens * len(text) / n_tok * 0.95))  # chars per window from the average token size
    windows, start = [], 0
    while True:
        end = min(len(text), start + chars)
        while True:
            if end < len(text):  # end after the last space / newline of the window's second half
                half = start + (end - start) // 2
                cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end))
                end = cut + 1 if cut > start else end
            if count_tokens(text[start:end]) <= max_tokens or end - start <= 8:
                break
            end = start + int((end - start) * 0.9)
        windows.append((start, end))
        if end >= len(text):
            return windows
        nxt = max(start + 1, end - int((end - start) * overlap))
        m = _WS.search(text, nxt, end)  # start the next window at a word
        start = m.end() if m and m.end() < end else nxt
