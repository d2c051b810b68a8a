"""Choosing a clause by the noisy channel: which paragraph makes the attorney's query likeliest? No generation;
the answer is a whole paragraph of the context, with its offsets, or NONE (engine.evaluate --decode channel)."""
from __future__ import annotations

import torch

from model.generate import Answer, candidate_starts

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


@torch.no_grad()
def channel_scores(model, tokenizer, texts: list[str], query: str, max_clause_tokens: int = 768) -> list[float]:
    """log p(query | CHANNEL_PROMPT with each text as the clause), summed over the query's tokens: one batched
    forward pass, right-padded (causal attention: pads after a row's tokens change nothing before them). A text
    longer than max_clause_tokens is cut to its first tokens (what a clause is about shows early)."""
    device = model.lm_head.weight.device
    q = tokenizer.encode(query)
    rows = []
    for t in texts:
        body = tokenizer.decode(tokenizer.encode(t)[:max_clause_tokens])
        rows.append(tokenizer.encode(tokenizer.chat_prompt(CHANNEL_PROMPT.format(clause=body))))
    L = max(len(r) for r in rows) + len(q)
    ids = torch.full((len(rows), L), tokenizer.pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r) + len(q)] = torch.tensor(r + q, device=device)
    h = model.hidden(ids)  # (n, L, H)
    out = []
    for i, r in enumerate(rows):  # the logits that predict the query's tokens: positions len(r)-1 ... len(r)+len(q)-2
        lp = torch.log_softmax(model.lm_head(h[i, len(r) - 1:len(r) + len(q) - 1]).float(), -1)  # (len(q), V)
        out.append(float(lp.gather(1, torch.tensor(q, device=device)[:, None]).sum()))
    return out


def channel_answer(model, tokenizer, query: str, context: str, margin: float = 0.0) -> Answer:
    """The paragraph of `context` that makes `query` likeliest (channel_scores), quoted whole with its offsets;
    NONE when even the best one raises the query's log-probability by no more than `margin` over CHANNEL_NULL.
    logprob is that gain per query token (the answer's confidence, comparable across windows)."""
    spans = paragraphs(context)
    if not spans:
        return Answer("NONE", None, None, 0.0, 0, 1)
    scores = channel_scores(model, tokenizer, [context[a:b] for a, b in spans] + [CHANNEL_NULL], query)
    null, scores = scores[-1], scores[:-1]
    best = max(range(len(spans)), key=lambda i: scores[i])
    gain = (scores[best] - null) / max(1, len(tokenizer.encode(query)))
    if scores[best] - null <= margin:
        return Answer("NONE", None, None, gain, 0, 1)
    a, b = spans[best]
    return Answer(context[a:b], a, b, gain, 0, 1)
