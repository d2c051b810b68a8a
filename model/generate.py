"""Batched decoding with a KV cache: left padding + attention mask, greedy or sampled, stops at end-of-turn.

    python -m model.generate [--model SRC] [--adapter DIR] --prompt "Copy the exact ... clause ..."
"""
from __future__ import annotations

import argparse
import bisect
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

from .adapter import check_adapter, load_adapter
from .llama import KVCache
from .load import load_model, load_tokenizer


def _pick(logits, temperature, top_p, generator):
    """logits (B, V) -> next ids (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_vocab(model, rows) -> None:
    """A one-line error, not an IndexError deep in the embedding, for a token id the model has no row for: the
    tokenizer is another model's (Llama 3.2 Vision's tokenizer.json holds <|image|> = 128256, one past the 3B text
    model's 128256 rows). rows: lists of ids."""
    n = model.config.vocab_size
    top = max((max(r) for r in rows if len(r)), default=-1)
    if top >= n:
        src = getattr(model, "source", None) or "the model"
        raise ValueError(f"token id {top} is outside {src}'s vocabulary (vocab_size {n} in its config): the "
                         "tokenizer belongs to another model; load the tokenizer from the model's own source")


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids, pad_id: int,
                 temperature=0.0, top_p=1.0, generator=None, use_cache=True, stopped: list | None = None
                 ) -> list[list[int]]:
    """Token-level decoding of one batch. Returns the new ids of each prompt, without the stop token. stopped,
    when a list, receives for each prompt whether a stop token ended it (False: cut at max_new_tokens)."""
    assert prompts and all(prompts), "every prompt needs at least one token"
    check_vocab(model, prompts)
    device = model.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L + max_new_tokens), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits at column L-1
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        mask[i, L - len(p):L] = 1
    stop = torch.tensor(sorted(stop_ids), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    cache = KVCache(model.config, B, L + max_new_tokens, model.model.embed_tokens.weight.dtype, device) \
        if use_cache else None
    seq, step_ids, n = ids, ids, L
    for _ in range(max_new_tokens):
        pos = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)
        if use_cache:
            h = model.hidden(step_ids, position_ids=pos[:, n - step_ids.shape[1]:], attention_mask=mask[:, :n],
                             cache=cache)
        else:  # the reference path: recompute the whole sequence every step
            h = model.hidden(seq, position_ids=pos, attention_mask=mask[:, :n])
        # lm_head on the last position only: prefill logits for every prompt token would be (B, L, vocab)
        # fp32, e.g. 8 x 2048 x 128256 x 4 B = 8.4 GB for Llama 3.
        logits = model.lm_head(h[:, -1]).float()  # (B, vocab)
        nxt = _pick(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for i in (~done).nonzero().flatten().tolist():
            if nxt[i].item() not in stop_ids:
                out[i].append(nxt[i].item())
        done |= torch.isin(nxt, stop)
        if bool(done.all()):
            break
        mask[:, n] = 1  # finished rows keep decoding pads; their output is ignored
        n += 1
        step_ids = nxt[:, None]
        seq = torch.cat([seq, step_ids], dim=1)
    if stopped is not None:
        stopped.extend(done.tolist())
    return out


# ---- one answer, copied from its context --------------------------------------------------------------------
NONE_BYTES = b"NONE"


@dataclass
class Answer:
    """One decoded answer. start/end: character offsets of `text` in the context when it is a verbatim slice of
    it (always, in constrained mode, unless the answer is NONE), else None."""
    text: str
    start: int | None
    end: int | None
    logprob: float | None  # mean log-probability of the chosen tokens, the stop token included; None: not measured
    tokens: int         # tokens generated, the stop token excluded
    steps: int          # forward passes after the prompt (copy-ahead verifies several tokens per pass)
    prompt_tokens: int = 0  # the prompt's length in tokens, chat template included
    detail: dict | None = None  # what a decoder measured on the way (channel: every paragraph's score)
    truncated: bool = False  # the answer reached max_new_tokens with no stop token: it may be cut short


class SpanTracker:
    """Where the bytes generated so far occur in the context, decided on text (bytes), not on token ids.

    A clause tokenises differently alone than inside the contract (a leading space, a merge across its first
    character), so the constraint is on the decoded bytes: a token is allowed when the bytes generated so far plus
    the token's bytes still occur somewhere in the context, or are still a prefix of NONE. Stopping is allowed
    once the generation is non-blank and ends on a character boundary, or is exactly NONE.
    constrained=False tracks the same positions (for copy-ahead drafts and offsets) but allows every token.
    """

    def __init__(self, context: str, token_bytes: list, stop_ids, constrained: bool):
        self.text, self.ctx = context, context.encode("utf-8")
        self.tb, self.stop_ids, self.constrained = token_bytes, set(stop_ids), constrained
        # byte offset -> character offset, -1 inside a multi-byte character
        self.char_at = [-1] * (len(self.ctx) + 1)
        b = 0
        for c, ch in enumerate(context):
            self.char_at[b] = c
            b += len(ch.encode("utf-8"))
        self.char_at[len(self.ctx)] = len(context)
        self.gen = b""
        self.pos: list[int] | None = None   # byte offsets where gen occurs; None = nothing generated yet
        self.none_alive = True

    def _starts(self, b: bytes, first: bool = False) -> list[int]:
        """Byte offsets where b occurs in the context at the start of a character (first: the first one only).
        A token's bytes also occur inside a multi-byte character (the byte A9 ends "é" in UTF-8): a copy that
        starts there is not a slice of the text."""
        out, i = [], self.ctx.find(b) if b else -1
        while i >= 0:
            if self.char_at[i] >= 0:
                out.append(i)
                if first:
                    break
            i = self.ctx.find(b, i + 1)
        return out

    def _continues(self, b: bytes) -> bool:
        if self.pos is None:
            return bool(self._starts(b, first=True))
        n = len(self.gen)
        return any(self.ctx.startswith(b, p + n) for p in self.pos)

    def can_stop(self) -> bool:
        if self.none_alive and self.gen == NONE_BYTES:
            return True
        return bool(self.pos) and bool(self.gen.strip()) and self.char_at[self.pos[0] + len(self.gen)] >= 0

    def allowed(self, tid: int) -> bool:
        if not self.constrained:
            return True
        if tid in self.stop_ids:
            return self.can_stop()
        b = self.tb[tid] if tid < len(self.tb) else None
        if not b:
            return False
        if self.none_alive and NONE_BYTES.startswith(self.gen + b):
            return True
        return self._continues(b)

    def choose(self, logits: torch.Tensor) -> int:
        """The highest-scoring allowed token of a (V,) logits row."""
        if not self.constrained:
            return int(logits.argmax())
        k = min(64, logits.shape[0])
        for tid in torch.topk(logits, k).indices.tolist():
            if self.allowed(tid):
                return tid
        for tid in torch.argsort(logits, descending=True)[k:].tolist():  # rare: the model wants to leave the text
            if self.allowed(tid):
                return tid
        raise AssertionError("no allowed token: a stop token is always allowed after a copied piece")

    def advance(self, tid: int) -> None:
        b = self.tb[tid] if tid < len(self.tb) and self.tb[tid] is not None else b""
        self.none_alive = self.none_alive and NONE_BYTES.startswith(self.gen + b)
        if self.pos is None:
            self.pos = self._starts(b)
        else:
            n = len(self.gen)
            self.pos = [p for p in self.pos if self.ctx.startswith(b, p + n)]
        self.gen += b

    def next_char(self) -> int | None:
        """Character offset in the context right after the generation's first occurrence, if on a boundary."""
        if not self.pos:
            return None
        c = self.char_at[self.pos[0] + len(self.gen)]
        return c if c >= 0 else None

    def answer(self) -> tuple[str, int | None, int | None]:
        """(text, start, end): NONE, a stripped slice of the context with its offsets, or free text."""
        if self.none_alive and self.gen == NONE_BYTES:
            return "NONE", None, None
        if self.pos:
            s, e = self.pos[0], self.pos[0] + len(self.gen)
            while self.char_at[e] < 0:   # stopped mid-character (max_new_tokens): drop the partial character
                e -= 1
            cs, ce = self.char_at[s], self.char_at[e]
            piece = self.text[cs:ce]
            lead = len(piece) - len(piece.lstrip())
            cs, ce = cs + lead, cs + len(piece.rstrip())
            if ce > cs:
                return self.text[cs:ce], cs, ce
        return self.gen.decode("utf-8", errors="replace").strip(), None, None


def _draft(tracker: SpanTracker, ctx_tokens, tokenizer, n: int) -> list[int]:
    """Up to n tokens that would continue the copy: the context's own tokens when the copy sits on one of their
    boundaries (the way the model saw the text), else a fresh tokenisation of what follows."""
    c = tracker.next_char()
    if c is None or n <= 0:
        return []
    ids, starts = ctx_tokens
    k = bisect.bisect_left(starts, c)
    if k < len(starts) and starts[k] == c:
        return ids[k:k + n]
    return tokenizer.encode(tracker.text[c:c + 8 * n])[:n]


# A blank line and the whitespace around it; a "blank" line may hold any whitespace but a newline, \r included, so
# "\r\n\r\n" breaks too. (data/text.py's PARAGRAPH_BREAK is the same pattern: model/ cannot import data/.)
_PARAGRAPH_BREAK = re.compile(r"\r?\n[^\S\n]*\n\s*")


def candidate_starts(context: str) -> list[int]:
    """Character offsets where an answer may start when ranking: the start of every paragraph (text after a blank
    line; ACORD's clauses, a contract's sections)."""
    starts = [0] + [m.end() for m in _PARAGRAPH_BREAK.finditer(context)]
    starts = [s + (len(context[s:]) - len(context[s:].lstrip())) for s in starts]
    return sorted({s for s in starts if s < len(context)})


def _rank_start(model, tokenizer, cache: KVCache, logits: torch.Tensor, context: str, n_tokens: int,
                chunk: int = 8) -> tuple[list[int], list[float]]:
    """Where the answer starts, given the prompt in `cache`: (token ids to force, their log-probabilities).

    Two decisions, as the model itself would weigh them. NONE or a quote: the probability of NONE's first token
    against the total probability of the first tokens that start a paragraph. Which paragraph: the one whose
    first n_tokens tokens (running on into the next paragraph if it is shorter) have the highest mean
    log-probability; greedy decoding would commit to the first token alone, and many clauses begin alike ("1.",
    "The", "Section"). The prompt's keys/values are shared by all candidates: one forward pass over
    candidates x n_tokens tokens."""
    none = tokenizer.encode(tokenizer.chat_answer("NONE"))
    cands = set()
    for s in candidate_starts(context):
        ids = tokenizer.encode(context[s:s + 12 * n_tokens])[:n_tokens]
        if ids:
            cands.add(tuple(ids))
    cands = sorted(cands)
    lp0 = torch.log_softmax(logits, -1)  # the first token of every candidate follows the prompt
    firsts = sorted({c[0] for c in cands} - {none[0]})
    quote_mass = float(torch.logsumexp(lp0[firsts], 0)) if firsts else -math.inf
    if float(lp0[none[0]]) > quote_mass:
        return none, [float(lp0[none[0]])]  # (the log-probability of the decision; NONE's end is forced)
    best = None
    device, pos = logits.device, cache.pos
    for c0 in range(0, len(cands), chunk):
        group = cands[c0:c0 + chunk]
        n, L = len(group), max(len(c) for c in group)
        shared = KVCache(model.config, n, pos + L, cache.k[0].dtype, device)
        for layer in range(len(cache.k)):  # (1, n_kv, pos, hd) -> (n, n_kv, pos, hd)
            shared.k[layer][:, :, :pos] = cache.k[layer][:, :, :pos]
            shared.v[layer][:, :, :pos] = cache.v[layer][:, :, :pos]
        shared.pos = pos
        ids = torch.full((n, L), tokenizer.pad_id, dtype=torch.long, device=device)
        for i, c in enumerate(group):  # right padding: the pads come after every scored position
            ids[i, :len(c)] = torch.tensor(c, device=device)
        lp = torch.log_softmax(model.lm_head(model.hidden(ids, cache=shared)).float(), -1)  # (n, L, V)
        for i, c in enumerate(group):
            per = [float(lp0[c[0]])] + [float(lp[i, j - 1, c[j]]) for j in range(1, len(c))]
            # the mean, not the sum: a candidate that the context's end cuts short (a paragraph a window edge cut
            # off) would otherwise win by the log-probabilities it lacks, each <= 0. Candidates of n_tokens tokens
            # (all but those) rank as by the sum. The mean weighs a short candidate's first tokens, where the start
            # is decided, more than a long one's: a heading of a few tokens at the very end rarely wins, nor should
            if best is None or sum(per) / len(per) > sum(best[1]) / len(best[1]):
                best = (list(c), per)
        del shared, lp
    return best


@torch.no_grad()
def decode_span(model, tokenizer, prompt: str, context: str, *, max_new_tokens: int = 1024,
                constrained: bool = True, lookahead: int = 16, rank: bool = False, rank_tokens: int = 16) -> Answer:
    """Greedy answer to one chat prompt whose answer should be a verbatim piece of `context` (or NONE).

    constrained=True: every token must keep the answer a substring of the context, decided on the text (see
    SpanTracker), so the result is always an exact slice with its offsets, or NONE. constrained=False: plain
    greedy decoding. Both copy ahead: when the answer so far sits in the context, the next `lookahead` context
    tokens are fed in one forward pass and kept as long as they are what greedy decoding picks anyway
    (prompt-lookup decoding: several times fewer passes while copying; in fp32 the same output as one token per
    pass, in bf16 or fp16 the same up to rounding: a pass over several tokens rounds differently, and a near tie
    between two tokens may then go the other way).
    rank=True (constrained too): the start is not a greedy first token but the best of every paragraph's first
    `rank_tokens` tokens and NONE, by mean log-probability (_rank_start); decoding goes on from there.
    An answer that reaches max_new_tokens before a stop token is marked truncated: it may end mid-clause.
    """
    return decode_spans(model, tokenizer, [prompt], context, max_new_tokens=max_new_tokens, constrained=constrained,
                        lookahead=lookahead, rank=rank, rank_tokens=rank_tokens)[0]


@torch.no_grad()
def decode_spans(model, tokenizer, prompts: list[str], context: str, *, max_new_tokens: int = 1024,
                 constrained: bool = True, lookahead: int = 16, rank: bool = False, rank_tokens: int = 16,
                 progress=None) -> list[Answer]:
    """decode_span for several prompts over one context (e.g. every clause type for one contract window): the
    keys/values of the prompts' common token prefix (the chat header and the contract, when the template puts
    the contract first) are computed once and shared; each prompt then costs only its own tokens and its answer.
    progress(i) is called after each answer."""
    device = model.lm_head.weight.device
    ids = [tokenizer.encode(tokenizer.chat_prompt(p)) for p in prompts]
    shared = min(len(x) for x in ids) - 1  # every prompt keeps at least one token of its own (for its logits)
    for x in ids[1:]:
        shared = next((i for i in range(shared) if x[i] != ids[0][i]), shared)
    ctx_tokens = tokenizer.encode_offsets(context)  # copy-ahead drafts: the context's own tokens, as text
    check_vocab(model, ids + [ctx_tokens[0]])
    cache = KVCache(model.config, 1, max(len(x) for x in ids) + max_new_tokens + max(lookahead, rank_tokens) + 1,
                    model.model.embed_tokens.weight.dtype, device)
    if shared:
        model.hidden(torch.tensor([ids[0][:shared]], device=device), cache=cache)
    answers = []
    for i, x in enumerate(ids):
        cache.pos = shared  # what the previous prompt wrote after the shared prefix is overwritten
        h = model.hidden(torch.tensor([x[shared:]], device=device), cache=cache)
        logits = model.lm_head(h[0, -1]).float()  # (V,)
        tracker = SpanTracker(context, tokenizer.token_bytes, tokenizer.stop_ids, constrained or rank)
        answers.append(_answer(model, tokenizer, cache, logits, tracker, ctx_tokens, context,
                               max_new_tokens=max_new_tokens, lookahead=lookahead, rank=rank, rank_tokens=rank_tokens))
        answers[-1].prompt_tokens = len(x)
        if progress is not None:
            progress(i + 1)
    return answers


def _answer(model, tokenizer, cache, logits, tracker, ctx_tokens, context, *, max_new_tokens, lookahead, rank,
            rank_tokens) -> Answer:
    """Decode one answer from the next-token logits of a prompt already in `cache`."""
    device = logits.device
    logps, n_out, steps, stopped = [], 0, 0, False
    if rank:  # start where the ranking says, then decode on from there
        forced, forced_lp = _rank_start(model, tokenizer, cache, logits, context, rank_tokens)
        steps += 1
        logps += forced_lp
        if forced[-1] in tracker.stop_ids:  # NONE won
            for t in forced[:-1]:
                tracker.advance(t)
            return Answer(*tracker.answer(), sum(logps) / len(logps), len(forced) - 1, steps)
        forced = forced[:max_new_tokens]
        for t in forced:
            tracker.advance(t)
        n_out = len(forced)
        h = model.hidden(torch.tensor([forced], device=device), cache=cache)
        steps += 1
        logits = model.lm_head(h[0, -1]).float()
    while n_out < max_new_tokens:
        tid = tracker.choose(logits)
        logps.append(float(torch.log_softmax(logits, -1)[tid]))
        if tid in tracker.stop_ids:
            stopped = True
            break
        tracker.advance(tid)
        n_out += 1
        if n_out >= max_new_tokens:
            break
        draft = _draft(tracker, ctx_tokens, tokenizer, min(lookahead, max_new_tokens - n_out))
        feed = [tid] + draft
        pos0 = cache.pos
        h = model.hidden(torch.tensor([feed], device=device), cache=cache)
        steps += 1
        lg = model.lm_head(h[0]).float()  # (len(feed), V): lg[i] follows feed[i]
        accepted = 0
        for i, d in enumerate(draft):
            if tracker.choose(lg[i]) != d:
                break
            logps.append(float(torch.log_softmax(lg[i], -1)[d]))
            tracker.advance(d)
            accepted += 1
        n_out += accepted
        cache.pos = pos0 + 1 + accepted  # keys/values of rejected draft tokens are overwritten next pass
        logits = lg[accepted]
        if n_out >= max_new_tokens:
            break
    text, start, end = tracker.answer()
    return Answer(text, start, end, sum(logps) / len(logps), n_out, steps, truncated=not stopped)


def generate(model, tokenizer, prompts: list[str], max_new_tokens=256, temperature=0.0, top_p=1.0,
             batch_size=8, seed=None, stopped: list | None = None) -> list[str]:
    """User messages -> assistant answers (chat format of the tokenizer, no system prompt). stopped, when a list,
    receives for each prompt whether its answer ended at a stop token (False: cut at max_new_tokens)."""
    encoded = [tokenizer.encode(tokenizer.chat_prompt(p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=model.lm_head.weight.device)
        gen.manual_seed(0 if seed is None else seed)
    answers, ended = [""] * len(prompts), [False] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk, done = order[s:s + batch_size], []
        new = generate_ids(model, [encoded[i] for i in chunk], max_new_tokens=max_new_tokens,
                           stop_ids=set(tokenizer.stop_ids), pad_id=tokenizer.pad_id,
                           temperature=temperature, top_p=top_p, generator=gen, stopped=done)
        for i, ids, d in zip(chunk, new, done):
            answers[i], ended[i] = tokenizer.decode(ids).strip(), d
    if stopped is not None:
        stopped.extend(ended)
    return answers


def cpu_threads(requested: int | None = None) -> int:
    """Set torch's CPU threads: the requested number, else the cores this process may use minus the machine's
    1-minute load average (at least 1). OpenMP threads that wait for a busy core stall each other: on a shared
    2-core machine a decode step ran ~100x slower with 2 threads than with 1, so the default leaves busy cores
    alone. Returns the number set."""
    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        requested = max(1, min(cores, cores - busy))
    torch.set_num_threads(requested)
    return requested


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every command's usage error (data.cli.CliParser; model/ cannot import it)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    ap = _Parser(prog="python -m model.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir, hub id, .gguf or smollm2-135m (default: the adapter's "
                                                  "base, else smollm2-135m)")
    ap.add_argument("--adapter", default=None, help="a PEFT-layout LoRA adapter directory")
    ap.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per answer (default: 128)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: the cores this process may use minus the 1-minute load average)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.threads is not None and args.threads < 1):
        ap.error("--max-new-tokens and --threads must be positive, --temperature >= 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA device(s); use --device cpu"
                 + (" or cuda:0" if torch.cuda.device_count() else ""))
    cpu_threads(args.threads)
    try:
        source = args.model
        if args.adapter and source is None:  # the base the adapter was trained on, as engine.evaluate/extract do
            source = check_adapter(args.adapter).get("base_model_name_or_path")
        model, tok = load_model(source, device=args.device), load_tokenizer(source)
        if args.adapter:
            load_adapter(model, args.adapter)
        # inside the try: a tokenizer of another model is refused here (check_vocab), in one line
        answers = generate(model, tok, args.prompt, args.max_new_tokens, args.temperature)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    for answer in answers:
        print(answer)


if __name__ == "__main__":
    main()
