"""Batched decoding with a KV cache: left padding + attention mask, greedy or sampled, stops at end-of-turn.

    python -m model.generate [--model SRC] [--adapter DIR] --prompt "Copy the exact ... clause ..."
"""
from __future__ import annotations

import argparse
import sys

import torch

from .llama import KVCache


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


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids, pad_id: int,
                 temperature=0.0, top_p=1.0, generator=None, use_cache=True) -> list[list[int]]:
    """Token-level decoding of one batch. Returns the new ids of each prompt, without the stop token."""
    assert prompts and all(prompts), "every prompt needs at least one token"
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
    return out


def generate(model, tokenizer, prompts: list[str], max_new_tokens=256, temperature=0.0, top_p=1.0,
             batch_size=8, seed=None) -> list[str]:
    """User messages -> assistant answers (chat format of the tokenizer, no system prompt)."""
    encoded = [tokenizer.encode(tokenizer.chat_prompt(p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=model.lm_head.weight.device)
        gen.manual_seed(0 if seed is None else seed)
    answers = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        new = generate_ids(model, [encoded[i] for i in chunk], max_new_tokens=max_new_tokens,
                           stop_ids=set(tokenizer.stop_ids), pad_id=tokenizer.pad_id,
                           temperature=temperature, top_p=top_p, generator=gen)
        for i, ids in zip(chunk, new):
            answers[i] = tokenizer.decode(ids).strip()
    return answers


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir, hub id, .gguf or smollm2-135m (default)")
    ap.add_argument("--adapter", default=None, help="a PEFT-layout LoRA adapter directory")
    ap.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    from . import load_model, load_tokenizer

    try:
        model, tok = load_model(args.model), load_tokenizer(args.model)
        if args.adapter:
            from .lora import load_adapter

            load_adapter(model, args.adapter)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for answer in generate(model, tok, args.prompt, args.max_new_tokens, args.temperature):
        print(answer)


if __name__ == "__main__":
    main()
