"""Choosing a clause by the noisy channel: which paragraph makes the attorney's query likeliest? No generation;
the answer is a whole paragraph of the context, with its offsets, or NONE (engine.evaluate --decode channel).
With unit "sentence" the candidates are the paragraphs' sentences instead: CUAD annotates sentence fragments
(its answers median 1.0 sentence long against 2.5 paragraphs' worth; 65% begin where a sentence does)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.generate import Answer, candidate_starts, check_vocab
from model.llama import KVCache

# The noisy-channel question: not "which clause answers this query?" but "how likely is this query, given the
# clause?" (Min et al., 2022, "Noisy Channel Language Model Prompting for Few-Shot Text Classification": the
# channel direction is far less sensitive to which candidate is easy to write, the failure of small models).
CHANNEL_PROMPT = "Contract clause:\n{clause}\n\nWhat kind of clause is this? Answer: "
CHANNEL_NULL = "(none)"  # the clause that explains nothing: p(query | no clause) is the bar a real one must clear


def paragraphs(context: str) -> list[tuple[int, int]]:
    """[start, end) of every paragraph of context (candidate_starts; the end before the trailing whitespace)."""
    starts = candidate_starts(context)
    ends = starts[1:] + [len(context)]
    return [(a, a + len(context[a:b].rstrip())) for a, b in zip(starts, ends) if context[a:b].strip()]


# A sentence ends at "." or ";" followed by whitespace and a capital, an opening bracket or a quote: "Sec. 2" and
# "1.5 days" stay whole (a heuristic, measured on CUAD's training split above), and so do the abbreviations
# contracts put before a capital or a bracket: 'ABC Holdings, Inc. ("Licensor")', "the U.S. Government", "Art. II"
# (38 of CUAD's 1,445 answers of several sentences were cut at one of these).
ABBREVIATIONS = ("Inc", "Corp", "Co", "Ltd", "U.S", "No", "Nos", "Mr", "Mrs", "Ms", "Dr", "Jr", "Sr", "St", "Art")
SENTENCE_END = re.compile("".join(rf"(?<!\b{re.escape(a)}\.)" for a in ABBREVIATIONS)
                          + r"(?<=[.;])\s+(?=[A-Z(\"\u201c])")


def sentences(context: str) -> list[tuple[int, int]]:
    """[start, end) of every sentence of every paragraph of context, without the whitespace between them."""
    return [s for a, b in paragraphs(context) for s in _sentences_in(context, a, b)]


def _sentences_in(context: str, a: int, b: int) -> list[tuple[int, int]]:
    """The sentences of context[a:b], a stripped span."""
    out, i = [], a
    for m in SENTENCE_END.finditer(context, a, b):
        out.append((i, m.start()))
        i = m.end()
    out.append((i, b))
    return out


UNITS = {"paragraph": paragraphs, "sentence": sentences}  # what the channel decoder may quote


def units(context: str, unit: str = "paragraph") -> list[tuple[int, int]]:
    """The candidate quotes of context: its paragraphs or its sentences, as [start, end) offsets. What the channel
    adapters were trained on and every published figure measured with (engine.channel_train, engine.evaluate), and
    what engine.extract quotes (a window holding a single unit aside: finer)."""
    if unit not in UNITS:
        raise ValueError(f"channel unit {unit!r}: choose {' or '.join(UNITS)}")
    return UNITS[unit](context)


# ---- a window that holds a single unit (engine.extract) -----------------------------------------------------
# A contract is not a benchmark context: its "paragraph" may be the whole file (sections on single lines, no blank
# line between). engine.extract reads it in windows of units(), each widened to the units its edges cut; a window
# left holding a single unit would leave the decoder no choice but that unit or NONE, so finer splits it. Every
# other window's units are units()' own: engine.evaluate measured the published figures with them.
# A part of fewer words than this is joined with the next, as data.focus joins units; here a number is no word,
# so that a heading ("2.", "2. Governing Law.", "- 17 -") joins the clause it heads rather than stand as the part
# that names the query best
MIN_UNIT_WORDS = 3
_WORDS = re.compile(r"[^\W\d_]+")  # a run of letters
_LINE = re.compile(r"\S(?:[^\n]*\S)?")  # one line of text, without its surrounding whitespace


def _lines(context: str, a: int, b: int) -> list[tuple[int, int]]:
    return [m.span() for m in _LINE.finditer(context, a, b)]


def join_short(context: str, spans: list) -> list[tuple[int, int]]:
    """spans with each one of fewer than MIN_UNIT_WORDS words joined with those after it until it has that many
    (the text between comes along: the result is still a slice of context)."""
    out, i = [], 0
    while i < len(spans):
        (a, b), j = spans[i], i
        while len(_WORDS.findall(context, a, b)) < MIN_UNIT_WORDS and j + 1 < len(spans):
            j += 1
            b = spans[j][1]
        out.append((a, b))
        i = j + 1
    return out


def finer(context: str, a: int, b: int) -> list[tuple[int, int]]:
    """One unit as several: its lines, else its sentences (fragments joined); itself when it has neither. For a
    window that holds a single unit, where the decoder would have no choice but the whole unit or NONE."""
    for cut in (_lines, _sentences_in):
        parts = join_short(context, cut(context, a, b))
        if len(parts) > 1:
            return parts
    return [(a, b)]


IGNORE = -100  # labels that are not the query's tokens (engine.loss's convention)
MAX_CLAUSE_TOKENS = 768  # what a unit's prompt reads of it: what a clause is about shows early


def channel_batch(tokenizer, texts: list[str], query: str, max_clause_tokens: int = MAX_CLAUSE_TOKENS,
                  device=None) -> dict[str, torch.Tensor]:
    """One packed row (1, T) holding, for each text, CHANNEL_PROMPT around it followed by the query's tokens:
    input_ids; position_ids restarting at 0 for each text; segment_ids (the text's index: attention stays within
    each, as for the trainer's packed rows, so no compute is spent on padding); labels, the query's tokens where
    they stand and IGNORE elsewhere. A text longer than max_clause_tokens is cut to its first tokens (what a
    clause is about shows early)."""
    q = tokenizer.encode(query)
    assert q, "an empty query has no likelihood"
    ids, pos, seg, labels = [], [], [], []
    for i, t in enumerate(texts):
        r = channel_prompt_ids(tokenizer, t, max_clause_tokens)
        ids += r + q
        pos += list(range(len(r) + len(q)))
        seg += [i] * (len(r) + len(q))
        labels += [IGNORE] * len(r) + q
    row = lambda x: torch.tensor([x], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": row(ids), "position_ids": row(pos), "segment_ids": row(seg), "labels": row(labels)}


def channel_prompt_ids(tokenizer, text: str, max_clause_tokens: int = MAX_CLAUSE_TOKENS) -> list[int]:
    """Token ids of CHANNEL_PROMPT around text (cut to its first max_clause_tokens tokens), in the chat format:
    what precedes the query's tokens in each segment of a channel_batch row."""
    body = tokenizer.decode(tokenizer.encode(text)[:max_clause_tokens])
    return tokenizer.encode(tokenizer.chat_prompt(CHANNEL_PROMPT.format(clause=body)))


def longest_channel_row(tokenizer, context: str, query: str, unit: str = "paragraph", max_candidates: int = 8,
                        max_clause_tokens: int = MAX_CLAUSE_TOKENS, cache: dict | None = None) -> tuple[int, int]:
    """(tokens, query tokens) of the longest row engine.channel_train can build for this example: its
    max_candidates longest units (the gold one is always among the candidates, the others are drawn; at most
    this many) and CHANNEL_NULL, each followed by the query. An upper bound on what a training step holds per
    micro-batch, for the memory ledger (python -m data.check --channel). cache: prompt lengths by text, shared
    across calls (contracts repeat across queries)."""
    cache = {} if cache is None else cache

    def length(text: str) -> int:
        if text not in cache:
            cache[text] = len(channel_prompt_ids(tokenizer, text, max_clause_tokens))
        return cache[text]

    q = len(tokenizer.encode(query))
    longest = sorted((length(context[a:b]) for a, b in units(context, unit)), reverse=True)[:max_candidates]
    n = len(longest) + 1  # and CHANNEL_NULL
    return sum(longest) + length(CHANNEL_NULL) + n * q, n * q


def query_logprobs(model, input_ids, labels, position_ids, segment_ids) -> torch.Tensor:
    """(n,) for a channel_batch row of n texts: log p(labelled tokens | what precedes them in their segment),
    summed per text; differentiable (engine.channel_train). lm_head runs only where a label is predicted (the
    query's few tokens), not over every position."""
    h = model.hidden(input_ids, position_ids=position_ids, segment_ids=segment_ids)  # (1, T, H)
    target = labels[:, 1:]
    where = target != IGNORE
    lp = torch.log_softmax(model.lm_head(h[:, :-1][where]).float(), -1)  # (N, V): N labelled positions
    tok_lp = lp.gather(1, target[where][:, None]).squeeze(1)
    rows = segment_ids[:, 1:][where]
    n = int(segment_ids.max()) + 1
    return torch.zeros(n, dtype=tok_lp.dtype, device=tok_lp.device).index_add(0, rows, tok_lp)


@torch.no_grad()
def channel_scores(model, tokenizer, texts: list[str], query: str,
                   max_clause_tokens: int = MAX_CLAUSE_TOKENS) -> list[float]:
    """log p(query | CHANNEL_PROMPT with each text as the clause), summed over the query's tokens, for every text
    in one packed forward pass (channel_batch, query_logprobs)."""
    b = channel_batch(tokenizer, texts, query, max_clause_tokens, model.lm_head.weight.device)
    check_vocab(model, [[int(b["input_ids"].max())]])
    return query_logprobs(model, **b).tolist()


@torch.no_grad()
def channel_score_matrix(model, tokenizer, texts: list[str], queries: list[str],
                         max_clause_tokens: int = MAX_CLAUSE_TOKENS) -> list[list[float]]:
    """channel_scores for many queries over the same texts: [text][query] log p(query | CHANNEL_PROMPT with the
    text as the clause). Each text's prompt is read once into a KV cache; all queries then follow it packed in one
    row (each sees the whole prompt and its own earlier tokens: model.llama.build_mask with segments after a
    cached prefix) and are scored in one more forward pass. The prompt's tokens are computed once instead of once
    per query: extract --clause all asks 40 short queries of the same paragraphs. Equal to channel_scores query
    by query up to rounding (tests/test_decode_span.py)."""
    qs = [tokenizer.encode(q) for q in queries]
    assert qs and all(qs), "an empty query has no likelihood"
    device = model.lm_head.weight.device
    seg = [i for i, q in enumerate(qs) for _ in q]
    row = lambda x: torch.tensor([x], dtype=torch.long, device=device)  # noqa: E731
    ids, seg_ids = row([t for q in qs for t in q]), row(seg)
    offsets = row([j for q in qs for j in range(len(q))])  # each query token's place after the prompt
    # the query row's positions whose next token belongs to the same query predict that token; the prompt's
    # last position predicts every query's first token
    inner = torch.tensor([k for k in range(len(seg) - 1) if seg[k + 1] == seg[k]], dtype=torch.long, device=device)
    targets, owners = ids[0, inner + 1], seg_ids[0, inner]
    firsts = torch.tensor([q[0] for q in qs], dtype=torch.long, device=device)
    prompts = [channel_prompt_ids(tokenizer, t, max_clause_tokens) for t in texts]
    check_vocab(model, prompts + qs)
    cache = KVCache(model.config, 1, max(map(len, prompts)) + len(seg), model.model.embed_tokens.weight.dtype,
                    device)
    out = []
    for p in prompts:
        cache.pos = 0  # the previous text's keys and values are overwritten
        last = model.hidden(row(p), cache=cache)[0, -1]  # (H,)
        first = torch.log_softmax(model.lm_head(last).float(), -1)[firsts]  # (Q,)
        h = model.hidden(ids, position_ids=offsets + len(p), segment_ids=seg_ids, cache=cache)[0]  # (Tq, H)
        lp = torch.log_softmax(model.lm_head(h[inner]).float(), -1).gather(1, targets[:, None]).squeeze(1)
        out.append(first.index_add(0, owners, lp).tolist())
    return out


FEATURES = ("gain", "gap", "lead")  # what a ChannelRule may weigh, each per query token (see channel_features)
FEATURE_DECIMALS = 4  # an answer's detail (eval.json's rows) holds its features rounded to this many decimals


def channel_features(scores: list[float], null: float, query_tokens: int) -> dict[str, float]:
    """What the NONE decision can see, per query token so that long and short queries compare:
    gain: how much the best paragraph raises log p(query) over CHANNEL_NULL;
    gap: how far the best paragraph is ahead of the runner-up (a relevant clause stands out among distractors;
         among distractors only, the best is one of many alike); 0 with one paragraph;
    lead: how far the best is ahead of the mean of the others."""
    assert scores and query_tokens > 0
    s = sorted(scores, reverse=True)
    rest = s[1:] or s[:1]
    return {"gain": (s[0] - null) / query_tokens, "gap": (s[0] - (s[1] if len(s) > 1 else s[0])) / query_tokens,
            "lead": (s[0] - sum(rest) / len(rest)) / query_tokens}


@dataclass(frozen=True)
class ChannelRule:
    """Quote the best paragraph when bias + sum(weights[f] * feature f) > 0, else answer NONE. The default,
    gain > 0, quotes whenever the best paragraph explains the query better than no clause. A fitted rule
    (engine.calibrate, on training-split queries) is read from JSON with from_file."""
    weights: dict = field(default_factory=lambda: {"gain": 1.0})
    bias: float = 0.0

    def __post_init__(self):
        bad = [f for f in self.weights if f not in FEATURES]
        if bad:
            raise ValueError(f"channel rule: unknown feature(s) {bad}; known: {', '.join(FEATURES)}")

    def value(self, features: dict[str, float]) -> float:
        return self.bias + sum(w * features[f] for f, w in self.weights.items())

    @classmethod
    def from_file(cls, path) -> "ChannelRule":
        """The rule engine.calibrate wrote (JSON: {"weights": {...}, "bias": b, ...provenance})."""
        try:
            d = json.loads(Path(path).read_text())
            rule = cls(weights={str(k): float(v) for k, v in d["weights"].items()}, bias=float(d["bias"]))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: channel rule not found; python -m engine.calibrate writes one") from None
        except OSError as e:
            raise ValueError(f"{path}: channel rule does not read ({e.strerror or e}); pass the JSON file "
                             "engine.calibrate wrote") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: not a channel rule written by engine.calibrate ({e})") from None
        # json reads NaN and Infinity: such a rule would answer NONE (or quote) everywhere without a word
        for key, v in [*((f"weights.{k}", w) for k, w in rule.weights.items()), ("bias", rule.bias)]:
            if not math.isfinite(v):
                raise ValueError(f"{path}: {key} is {v}, not a finite number; calibrate the rule again "
                                 "(python -m engine.calibrate)")
        return rule

    def to_dict(self) -> dict:
        return {"weights": dict(self.weights), "bias": self.bias}


def channel_answer(model, tokenizer, query: str, context: str, rule: ChannelRule | None = None,
                   unit: str = "paragraph", focus=None, spans: list | None = None) -> Answer:
    """The paragraph (unit "sentence": the sentence) of `context` that makes `query` likeliest (channel_scores),
    quoted whole with its offsets, or NONE when `rule` (default: the best must beat CHANNEL_NULL) says none
    answers the query.
    logprob is the best paragraph's gain per query token (its confidence, comparable across windows); detail
    holds the raw scores, the features (engine.calibrate fits a rule on them) and the best paragraph's [start, end)
    even when the answer is NONE.
    focus, when given, is the second stage: focus(unit text) -> [start, end) of the part to quote, relative to the
    unit, or None to quote it whole (engine.evaluate's focuser: a focus adapter trained on data.focus copies the
    clause out of the sentence). detail then also holds "focus": the quoted [start, end), or None for whole.
    spans: the candidate [start, end) offsets in context when the caller chose them (engine.extract: the window's
    share of units() over the whole contract, engine.extract.channel_windows); default units(context, unit)."""
    spans = units(context, unit) if spans is None else spans
    if not spans:
        return Answer("NONE", None, None, 0.0, 0, 1)
    scores = channel_scores(model, tokenizer, [context[a:b] for a, b in spans] + [CHANNEL_NULL], query)
    return _decide(context, spans, scores, max(1, len(tokenizer.encode(query))), rule or ChannelRule(), focus)


def channel_answers(model, tokenizer, queries: list[str], context: str, rule: ChannelRule | None = None,
                    unit: str = "paragraph", focus: list | None = None, spans: list | None = None) -> list[Answer]:
    """channel_answer for each of `queries` over one context, each unit's prompt read once for all of them
    (channel_score_matrix): what engine.extract --clause all asks of every window. focus: None, or one focus
    function (or None) per query; spans: as for channel_answer."""
    focus = [None] * len(queries) if focus is None else focus
    assert len(focus) == len(queries), (len(focus), len(queries))
    spans = units(context, unit) if spans is None else spans
    if not spans:
        return [Answer("NONE", None, None, 0.0, 0, 1) for _ in queries]
    m = channel_score_matrix(model, tokenizer, [context[a:b] for a, b in spans] + [CHANNEL_NULL], list(queries))
    return [_decide(context, spans, [row[j] for row in m], max(1, len(tokenizer.encode(q))), rule or ChannelRule(),
                    f) for j, (q, f) in enumerate(zip(queries, focus))]


def _decide(context: str, spans: list, scores: list[float], n_q: int, rule: ChannelRule, focus) -> Answer:
    """channel_answer's answer from the units' scores, CHANNEL_NULL's last."""
    null, scores = scores[-1], scores[:-1]
    best = max(range(len(spans)), key=lambda i: scores[i])
    feats = channel_features(scores, null, n_q)
    detail = {"scores": [round(x, 4) for x in scores], "null": round(null, 4), "query_tokens": n_q,
              "features": {k: round(v, FEATURE_DECIMALS) for k, v in feats.items()}, "best": list(spans[best])}
    if rule.value(feats) <= 0:
        return Answer("NONE", None, None, feats["gain"], 0, 1, detail=detail)
    a, b = spans[best]
    if focus is not None:
        part = focus(context[a:b])
        if part is not None:
            assert 0 <= part[0] < part[1] <= b - a, f"focus span {part} outside its unit of {b - a} characters"
            a, b = a + part[0], a + part[1]
        detail["focus"] = None if part is None else [a, b]
    return Answer(context[a:b], a, b, feats["gain"], 0, 1, detail=detail)
