"""cut_context keeps every paragraph that still fits and fills a mostly empty budget with a window of one left
out; encode_example gives the target what the cut context leaves. Before, a context was often the answer alone
(a fifth of ACORD's train clauses at seq_len 1024) and a NONE context could be a page number."""
import dataclasses

from data import NONE, Example, render_prompt
from data.batch import IGNORE, encode_example
from data.text import cut_context


def _words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _chars(tag: str, n: int) -> str:
    """n characters of words, the last one possibly cut (a paragraph of exactly that length)."""
    return _words(tag, n)[:n - 1] + "x"


def test_a_small_paragraph_that_fits_is_kept_whatever_was_dropped_first():
    """CUAD's NONE window of paragraphs [2617, 2, 1364] chars at a 2000-char budget was '39' for some ids: the
    page number stayed, the 1364-char paragraph was dropped although it fitted."""
    big, page, mid = _chars("b", 2617), "39", _chars("m", 1364)
    ctx = "\n\n".join([big, page, mid])
    for key in range(40):
        cut = cut_context(ctx, NONE, 2000, key=str(key))
        assert cut == page + "\n\n" + mid, (key, cut[:80])   # all that fits; over half the budget: no window
    # with an answer: a short paragraph beside it fits, whatever order the long ones were dropped in
    answer, short, long = _words("a", 80), _words("s", 15), _words("l", 140)
    ctx = "\n\n".join([long, answer, short, _words("k", 150)])
    for key in range(40):
        cut = cut_context(ctx, answer, len(answer) + len(short) + 300, key=str(key))
        assert answer in cut and short in cut.split("\n\n"), key


def test_a_budget_left_empty_is_filled_with_a_window_of_a_paragraph_left_out():
    """Every other paragraph longer than the room beside the answer: the context was the answer alone."""
    paras = [_words(f"p{p}x", 60 if p == 2 else 150) for p in range(6)]   # the clause: ~300 chars, the others ~1k
    ctx = "\n\n".join(paras)
    budget = len(paras[2]) + 500
    places = set()
    for key in range(40):
        cut = cut_context(ctx, paras[2], budget, key=str(key))
        assert len(cut) <= budget and paras[2] in cut and cut == cut.strip()
        assert len(cut) - len(paras[2]) >= 250, (key, len(cut))   # not the answer alone: over half the room used
        pieces = cut.split("\n\n")
        assert len(pieces) == 2 and paras[2] in pieces
        other = next(p for p in pieces if p != paras[2])
        src = next(p for p in paras if p.startswith(other.split()[0] + " ") or f" {other.split()[0]} " in p)
        assert f" {other} " in f" {src} "   # a run of whole words of one paragraph
        assert pieces.index(paras[2]) == (paras.index(src) < 2)   # in the contract's order
        places.add(pieces.index(paras[2]))
    assert places == {0, 1}   # the clause is first or last: the window comes from either side


def test_a_long_answer_s_own_paragraph_still_gets_a_window_around_it():
    ctx = " ".join(f"w{i}" for i in range(300))   # one paragraph: nothing to fill from
    for key in range(10):
        cut = cut_context(ctx, "w150 w151", 60, key=str(key))
        assert "w150 w151" in cut and len(cut) <= 60


def test_acord_rows_keep_other_clauses_beside_the_answer_and_full_rows(chatml_tok, shared_datasets, monkeypatch):
    """ACORD's train split at the CPU recipe's seq_len with SmolLM2's tokenizer: clause rows whose whole context
    is the answer were 24.0% (238 of 992), now under 1% (measured 1); NONE contexts keep at least half their
    character budget; a target cut short fills its row (118 of 427 fitted whole beside the cut context)."""
    import data.batch as B
    from data.validate import load_validated

    examples, _ = load_validated(f"acord:{shared_datasets / 'acord'}", "train")
    cuts = {}
    real = B.cut_context
    monkeypatch.setattr(B, "cut_context", lambda c, a, m, k="": cuts.__setitem__(k, (m, real(c, a, m, k))) or
                        cuts[k][1])
    seq_len = 1024
    encoded, stats = B.encode_examples(chatml_tok, examples, seq_len)
    by_id = {e.id: e for e in examples}
    alone = clauses = thin = 0
    for enc in encoded:
        ex = by_id[enc.id]
        clauses += ex.answer != NONE
        if not enc.truncated:
            continue
        budget, ctx = cuts[enc.id]
        if ex.answer == NONE:
            thin += len(ctx) < budget / 2
        else:
            alone += ctx.strip() == ex.answer.strip()
        if enc.target_cut:
            assert len(enc) == seq_len, enc.id   # the target took all the room the context left
    assert stats.target_cut == sum(e.target_cut for e in encoded) > 0
    assert clauses > 900 and alone / clauses < 0.01, (alone, clauses)
    assert thin == 0


def test_the_target_takes_the_room_a_cut_context_leaves(llama3_tok):
    """The context's budget leaves the target half the free room beside the clause's copy; what the cut context
    does not use goes to the target too, so a clause is cut short only when the row cannot hold it whole."""
    tok = llama3_tok
    paras = [_words("big", 500), _words("c", 40), _words("small", 20), _words("huge", 500)]
    ex = Example("y", "jsonl", "c", "Indemnity", "\n\n".join(paras), paras[1], "train")
    whole = tok.encode(tok.chat_answer(ex.answer))
    overhead = len(tok.encode(tok.chat_prompt(render_prompt(dataclasses.replace(ex, context="")))))
    saved = 0
    for seq_len in range(overhead + len(whole) + 40, overhead + 3 * len(whole), 4):
        enc = encode_example(tok, ex, seq_len)
        n = len(enc) - sum(y != IGNORE for y in enc.labels)
        assert enc.truncated and ex.answer in tok.decode(enc.input_ids[:n])
        assert enc.target_cut == (seq_len - n < len(whole)), seq_len   # cut only when the row cannot hold it
        assert enc.input_ids[n:] == whole[:seq_len - n]
        free = seq_len - overhead - len(tok.encode(ex.answer)) - 2
        saved += not enc.target_cut and (free + 1) // 2 < len(whole)   # the half alone would have cut it
    assert saved >= 3
