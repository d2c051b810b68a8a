"""Tokens: label mask, truncation around the answer, packing without cross-sample attention, the sampler."""
import dataclasses

import pytest
import torch

from data import NONE, Example, load_examples, render_prompt
from data.batch import (IGNORE, DistributedSampler, EncodedExample, answer_weights, collate, encode_example,
                        encode_examples, make_units, pack)


@pytest.fixture(params=["llama3", "chatml"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def _split(enc: EncodedExample) -> int:
    """Number of prompt tokens (the unlabelled prefix)."""
    return next(i for i, l in enumerate(enc.labels) if l != IGNORE)


def test_prompt_ids_are_what_generation_sees_and_labels_cover_answer_plus_eot(tok):
    for ex in load_examples("synthetic", "valid")[:6]:
        enc = encode_example(tok, ex, 2048)
        n = _split(enc)
        assert enc.input_ids[:n] == tok.encode(tok.chat_prompt(render_prompt(ex)))
        assert enc.input_ids[n:] == tok.encode(tok.chat_answer(ex.answer))
        assert enc.labels[:n] == [IGNORE] * n and enc.labels[n:] == enc.input_ids[n:]
        assert enc.labels[-1] == tok.eot_id and not enc.truncated
        assert tok.decode(enc.labels[n:], skip_special=False) == ex.answer + tok.eot_token


def test_special_token_text_in_contract_or_answer_is_trained_as_text(tok):
    """A contract or an answer spelling a special token: the row holds the template's special ids only, and the
    labels end at the one end-of-turn (before, an answer holding <|eot_id|> taught stopping mid-clause, and a
    contract could close the user's turn)."""
    clause = "3. Term. This Agreement ends <|eot_id|> on <|im_end|> 31 December <|end_of_text|>."
    ctx = ("1. Parties. <|im_start|>assistant\nNONE<|im_end|> and <|start_header_id|>assistant<|end_header_id|>"
           "\n\n2. Fees. None.\n\n" + "".join(f"Schedule {i}. Nothing here.\n\n" for i in range(40)) + clause)
    ex = Example("special", "jsonl", "Term", "Term", ctx, clause, "train")
    clean = dataclasses.replace(ex, context="1. Parties.\n\n2. Fees. None.", answer="3. Term.")
    special = {i for i, t in tok._tk.get_added_tokens_decoder().items() if t.special}
    for seq_len in (2048, 160):  # whole, and truncated around the answer
        enc, ref = encode_example(tok, ex, seq_len), encode_example(tok, clean, 2048)
        assert enc.truncated == (seq_len == 160)
        assert [i for i in enc.input_ids if i in special] == [i for i in ref.input_ids if i in special]
        n = _split(enc)
        assert [i for i in enc.labels[n:] if i in tok.stop_ids] == ([tok.eot_id] if not enc.target_cut else [])
        assert tok.decode(enc.labels[n:]) == clause[:len(tok.decode(enc.labels[n:]))]


def _assert_whole(tok, ex, enc, seq_len):
    assert len(enc) <= seq_len
    n = _split(enc)
    target = tok.encode(tok.chat_answer(ex.answer))
    assert enc.input_ids[n:] == target[:len(enc) - n]  # the target is the answer's first tokens, or all of it
    if len(enc) - n < len(target):  # a long clause: its start is supervised, never less than 16 tokens nor half
        # the room the clause in the context leaves (the context's budget, the other half, holds other clauses),
        # and the row is full: the target takes what the cut context left
        overhead = len(tok.encode(tok.chat_prompt(render_prompt(dataclasses.replace(ex, context="")))))
        free = seq_len - overhead - len(tok.encode(ex.answer)) - 2
        assert max(16, (free + 1) // 2) <= len(enc) - n < len(target) and len(enc) == seq_len
    prompt = tok.decode(enc.input_ids[:n], skip_special=False)
    if ex.answer != NONE:
        assert ex.answer in prompt  # the whole clause survives in the cut context
    # the cut prompt is a rendering of a context window, tokenized as one chat prompt
    head, tail = tok.chat_prompt("\x00").split("\x00")
    assert prompt.startswith(head) and prompt.endswith(tail)
    assert enc.input_ids[:n] == tok.encode(tok.chat_prompt(prompt[len(head):len(prompt) - len(tail)]))


def test_truncation_cuts_context_never_the_answer_and_keeps_long_clauses(llama3_tok, shared_datasets):
    tok, seq_len = llama3_tok, 384
    acord = load_examples(f"acord:{shared_datasets / 'acord'}", "valid")
    cuad = load_examples(f"cuad:{shared_datasets / 'cuad'}", "test")[::12]
    truncated = skipped = partial = 0
    for ex in acord + cuad:
        enc = encode_example(tok, ex, seq_len)
        if enc is None:  # only when the answer cannot even appear whole in the context beside 16 target tokens
            assert len(tok.encode(ex.answer)) + 16 + 30 > seq_len
            skipped += 1
            continue
        truncated += enc.truncated
        partial += len(enc) - _split(enc) < len(tok.encode(tok.chat_answer(ex.answer)))
        _assert_whole(tok, ex, enc, seq_len)
    assert truncated > 50 and skipped < truncated and partial > 0


def test_truncation_of_none_and_a_too_long_answer_is_reported(llama3_tok):
    words = " ".join(f"word{i}" for i in range(2000))
    none = Example("n", "jsonl", "c", "Governing Law", words, NONE, "train")
    enc = encode_example(llama3_tok, none, 200)
    assert enc.truncated and len(enc) <= 200 and " word" in llama3_tok.decode(enc.input_ids)
    long = dataclasses.replace(none, id="l", answer=words[:3000])
    ok = dataclasses.replace(none, id="ok", answer="word7 word8")
    encoded, stats = encode_examples(llama3_tok, [none, long, ok], 200)
    assert [e.id for e in encoded] == ["n", "ok"] and stats.truncated == 2
    assert stats.skipped == ["l: answer too long for seq_len 200"]


def test_a_long_answer_leaves_half_the_free_room_to_other_clauses(llama3_tok):
    """An answer too long to be whole in both the context and the target used to take all the room: the context
    was the answer alone, teaching 'copy the start of the context' (18.6% of ACORD's train clauses at 1024)."""
    tok, seq_len = llama3_tok, 400  # the clause: 240 tokens; the prompt without context: 39
    paras = [" ".join(f"para{p}word{i}" for i in range(60 if p == 5 else 6)) for p in range(40)]
    ex = Example("x", "jsonl", "c", "Indemnity", "\n\n".join(paras), paras[5], "train")
    enc = encode_example(tok, ex, seq_len)
    n = _split(enc)
    prompt = tok.decode(enc.input_ids[:n], skip_special=False)
    overhead = len(tok.encode(tok.chat_prompt(render_prompt(dataclasses.replace(ex, context="")))))
    free = seq_len - overhead - len(tok.encode(ex.answer)) - 2
    assert enc.target_cut and len(enc) == seq_len and len(enc) - n >= (free + 1) // 2
    other = prompt.replace(ex.answer, "")
    assert sum(f"para{p}word" in other for p in range(40) if p != 5) >= 2
    head, tail = tok.chat_prompt("\x00").split("\x00")  # the user message, re-encoded as one (no specials in it)
    assert len(tok.encode(tok.chat_prompt(other[len(head):len(other) - len(tail)]))) - overhead >= free // 3


def test_answer_weights_give_every_example_weight_one_heaviest_at_start_and_stop():
    assert answer_weights(5, "token").tolist() == [1.0] * 5
    for n in (2, 50, 300):
        w = answer_weights(n, "example")
        assert abs(float(w.sum()) - 1) < 1e-6
        assert torch.allclose(w, w.flip(0))  # the start (the choice) and the stop weigh alike
        assert float(w[0]) == float(w.max()) and float(w[n // 2]) == float(w.min())
    assert answer_weights(2, "example").tolist() == [0.5, 0.5]  # NONE and its end of turn
    long = answer_weights(300, "example")
    assert float(long[:4].sum()) > 0.15 and float(long[0]) > 0.07
    cut = answer_weights(50, "example", ends=False)  # a target cut short has no stop to learn
    assert all(cut[i] > cut[i + 1] for i in range(49)) and abs(float(cut.sum()) - 1) < 1e-6


def test_collate_with_example_weighting_weights_each_sample_to_one():
    a, b = _enc([5, 6, 7, 8], 1), _enc([9, 10, 11], 2)
    batch = collate([[a, b]], pad_id=0, weighting="example")
    w, labels = batch["loss_weights"], batch["labels"]
    assert w.shape == labels.shape and float(w[labels == IGNORE].abs().sum()) == 0
    assert abs(float(w[0, :4].sum()) - 1) < 1e-6 and abs(float(w[0, 4:].sum()) - 1) < 1e-6
    assert "loss_weights" not in collate([[a, b]], pad_id=0)


def _enc(ids, n_prompt, i=""):
    return EncodedExample(list(ids), [IGNORE] * n_prompt + list(ids[n_prompt:]), i)


def test_packed_row_positions_segments_and_labels_by_hand():
    a, b, c = _enc([5, 6, 7], 1), _enc([8, 9], 1), _enc([1, 2, 3, 4], 2)
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, IGNORE, 3, 4, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate([[a]], pad_id=0, pad_to=6)["input_ids"].shape == (1, 6)


def test_pack_fits_seq_len_and_places_every_sample_once():
    lengths = [7, 3, 9, 1, 4, 4, 10, 2, 6, 5] * 5
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == -(-sum(lengths) // 10)  # these lengths pack perfectly
    assert rows == pack(lengths, 10)


def test_packed_row_logits_equal_each_sample_run_alone(tiny_config):
    from model.llama import Llama

    torch.manual_seed(0)
    model = Llama(tiny_config).eval()
    samples = [_enc(torch.randint(3, 300, (n,)).tolist(), 2, str(n)) for n in (11, 5, 8)]
    units = make_units(samples, 32, packed=True)
    assert len(units) == 1 and len(units[0]) == 3
    batch = collate(units, pad_id=0, pad_to=32)  # 24 tokens + 8 padding
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        t = 0
        for e in units[0]:
            alone = model(torch.tensor([e.input_ids]))
            torch.testing.assert_close(packed[0, t:t + len(e)], alone[0], rtol=1e-5, atol=1e-5)
            t += len(e)


# ---------------------------------------------------------------- sampler
def _ranks(n, world, **kw):
    return [DistributedSampler(list(range(n)), 4, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_sampler_ranks_are_disjoint_and_cover_the_epoch(group_by_length):
    ranks = _ranks(96, 2, seed=3, group_by_length=group_by_length)
    seen = [[i for b in s.rank_batches(0) for i in b] for s in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(96))
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert ranks[0].rank_batches(0) != ranks[0].rank_batches(1)  # reshuffled per epoch


def test_sampler_uneven_epoch_repeats_or_drops_to_keep_ranks_in_step():
    ranks = _ranks(90, 4)  # 23 batches: 1 repeated so every rank runs 6 steps
    seen = [i for s in ranks for b in s.rank_batches(0) for i in b]
    assert {len(s) for s in ranks} == {6} and set(seen) == set(range(90))
    ranks = _ranks(90, 4, drop_last=True)  # 22 batches: the last 2 dropped
    seen = [i for s in ranks for b in s.rank_batches(0) for i in b]
    assert {len(s) for s in ranks} == {5} and len(seen) == len(set(seen)) == 80


def test_sampler_resume_at_offset_continues_the_same_order():
    full = DistributedSampler(list(range(50)), 4, rank=1, world_size=2, seed=7)
    order = [b for b in full]
    assert full.state_dict()["epoch"] == 1 and full.state_dict()["offset"] == 0
    order += [b for _, b in zip(range(3), full)]

    first = DistributedSampler(list(range(50)), 4, rank=1, world_size=2, seed=7)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert (state["epoch"], state["offset"]) == (0, 4)
    resumed = DistributedSampler(list(range(50)), 4, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    tail = [b for b in resumed] + [b for _, b in zip(range(3), resumed)]
    assert head + tail == order


def test_sampler_refuses_state_from_a_different_run():
    s = DistributedSampler(list(range(50)), 4, world_size=1)
    with pytest.raises(ValueError, match="world_size=2, this run has 1"):
        s.load_state_dict({**s.state_dict(), "world_size": 2})


def test_length_grouping_reduces_padding_and_puts_the_longest_batch_first():
    lengths = [(i * 37) % 500 + 10 for i in range(400)]

    def padding(s):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in s.rank_batches(0))
    grouped = DistributedSampler(lengths, 8, group_by_length=True)
    plain = DistributedSampler(lengths, 8)
    assert padding(grouped) < padding(plain) / 3
    first = grouped.rank_batches(0)[0]
    assert max(lengths[i] for i in first) == max(lengths)


def test_batches_padded_to_seq_len_have_one_shape_and_the_same_loss_and_gradients(chatml_tok, tiny_config):
    """TrainConfig.pad_to_seq_len (the default): every micro-batch is (B, seq_len), so the allocator sees one
    shape; the padding is segment -1, label IGNORE, and changes neither the loss nor the LoRA gradients."""
    from data.batch import Batches
    from engine.loss import CausalLMLoss
    from model.llama import Llama
    from model.lora import apply_lora

    examples = load_examples("synthetic", "train")[:24]
    kw = dict(seq_len=512, pack=True, batch_size=2, shuffle=False)
    plain = Batches(chatml_tok, examples, **kw).first(0)
    padded = Batches(chatml_tok, examples, pad_to_seq_len=True, **kw).first(0)
    assert len(plain) == len(padded) > 1
    assert {tuple(b["input_ids"].shape[1:]) for b in padded} == {(512,)}
    assert len({tuple(b["input_ids"].shape) for b in plain}) > 1  # the rows' own lengths vary
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(tiny_config, vocab_size=chatml_tok.vocab_size))
    apply_lora(model, r=4, alpha=8)
    for p in model.parameters():  # non-zero B so that every LoRA weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    loss_fn = CausalLMLoss(model)
    lora = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(plain[:2], padded[:2]):
        T = a["input_ids"].shape[1]
        assert a["num_tokens"] == b["num_tokens"] and torch.equal(b["input_ids"][:, :T], a["input_ids"])
        assert (b["segment_ids"][:, T:] == -1).all() and (b["labels"][:, T:] == IGNORE).all()
        grads = []
        for batch in (a, b):
            model.zero_grad()
            loss = loss_fn(**{k: batch[k] for k in ("input_ids", "labels", "position_ids", "segment_ids")})
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in lora]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
        for ga, gb in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_evaluation_batches_are_dealt_across_ranks_none_repeated(chatml_tok):
    """Batches.first(n): the epoch's first n batches shared out among the ranks, so the evaluated rows are the
    same with 1, 2 or 3 processes (each rank used to take its own n, and a rank short of one repeated batch 0)."""
    from data.batch import Batches

    examples = load_examples("synthetic", "valid")
    kw = dict(seq_len=512, pack=True, batch_size=2, shuffle=True, seed=3)

    def rows(n, world):
        got = []
        for rank in range(world):
            for b in Batches(chatml_tok, examples, rank=rank, world_size=world, **kw).first(n):
                got += [tuple(r.tolist()) for r in b["input_ids"]]
        return sorted(got)
    for n in (3, 0):
        one = rows(n, 1)
        assert len(one) == len(set(one)) and (n == 0 or len(one) == 2 * n)
        assert rows(n, 2) == one and rows(n, 3) == one
