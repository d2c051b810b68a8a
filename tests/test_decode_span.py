"""Span decoding: constrained answers are exact slices of their context (decided on text, not token ids), and
copy-ahead (prompt-lookup) decoding gives exactly what one token per pass gives."""
import pytest
import torch

from model import Llama, LlamaConfig
from model.generate import SpanTracker, candidate_starts, decode_span, generate
from tests.conftest import tiny_config_dict

CONTEXTS = [
    "1. Term. This Agreement lasts two (2) years.\n\n2. Governing Law. This Agreement is governed by the laws of "
    "the State of New York.\n\n3. Notices. All notices shall be in writing.",
    "Section 9 — “Assignment”: neither party may assign this Agreement without the other’s consent; "
    "any assignment in breach is void. Größe, café, naïve: ünïcode throughout.",
]


def _prompt(context, query="Governing Law"):
    return f"Copy the exact clause from this contract that matches: {query}\nIf the contract has no such clause, " \
           f"answer NONE.\n\nContract:\n{context}"


@pytest.fixture(scope="module")
def random_chatml(chatml_tok):
    """A tiny random Llama over SmolLM2's real vocabulary: it wants to write anything at all."""
    torch.manual_seed(0)
    cfg = LlamaConfig.from_hf_dict(tiny_config_dict(vocab_size=chatml_tok.vocab_size))
    return Llama(cfg).eval(), chatml_tok


@pytest.mark.parametrize("max_new_tokens,rank", [(3, False), (40, False), (3, True), (40, True)])
def test_constrained_answers_of_a_random_model_are_exact_slices(random_chatml, max_new_tokens, rank):
    model, tok = random_chatml
    for ctx in CONTEXTS:
        for query in ("Governing Law", "Assignment", "Notices"):
            ans = decode_span(model, tok, _prompt(ctx, query), ctx, max_new_tokens=max_new_tokens, rank=rank)
            assert ans.text == "NONE" or (ans.start is not None and ctx[ans.start:ans.end] == ans.text)
            assert ans.text == ans.text.strip() and ans.tokens <= max_new_tokens
    free = decode_span(model, tok, _prompt(CONTEXTS[0]), CONTEXTS[0], max_new_tokens=20, constrained=False)
    assert free.text not in CONTEXTS[0] and free.start is None  # unconstrained, the random model writes anything


def test_tracker_decides_on_text_not_on_token_ids(chatml_tok):
    tok, ctx = chatml_tok, CONTEXTS[0]
    clause = "Governing Law. This Agreement is governed by the laws of the State of New York."
    alone = tok.encode(clause)  # the clause tokenised on its own: its first token has no leading space
    in_ctx = tok.encode(ctx)
    assert not any(in_ctx[i:i + len(alone)] == alone for i in range(len(in_ctx)))  # not a run of context ids
    tr = SpanTracker(ctx, tok.token_bytes, tok.stop_ids, constrained=True)
    assert not tr.allowed(tok.eot_id)  # nothing copied yet: no stop
    for t in alone:
        assert tr.allowed(t)
        tr.advance(t)
    assert tr.allowed(tok.eot_id)
    assert not tr.allowed(tok.encode(" Delaware")[0])  # does not continue the text
    text, start, end = tr.answer()
    assert text == clause and ctx[start:end] == clause
    none = SpanTracker(ctx, tok.token_bytes, tok.stop_ids, constrained=True)
    for t in tok.encode("NONE"):
        assert none.allowed(t)
        none.advance(t)
    assert none.allowed(tok.eot_id) and none.answer() == ("NONE", None, None)


@pytest.mark.parametrize("constrained", [True, False])
def test_copy_ahead_gives_what_one_token_per_pass_gives(smollm, constrained):
    model, tok = smollm
    for ctx in CONTEXTS:
        one = decode_span(model, tok, _prompt(ctx), ctx, max_new_tokens=60, constrained=constrained, lookahead=0)
        ahead = decode_span(model, tok, _prompt(ctx), ctx, max_new_tokens=60, constrained=constrained)
        assert (ahead.text, ahead.start, ahead.end, ahead.tokens) == (one.text, one.start, one.end, one.tokens)
        assert abs(ahead.logprob - one.logprob) < 1e-3
        assert ahead.steps <= one.steps
    copy = decode_span(model, tok, _prompt(CONTEXTS[0]), CONTEXTS[0], max_new_tokens=60)
    assert copy.steps * 3 < copy.tokens  # a copy of the context takes several tokens per forward pass


def test_free_span_decoding_equals_plain_greedy_generation(smollm):
    model, tok = smollm
    ctx = CONTEXTS[0]
    ans = decode_span(model, tok, _prompt(ctx), ctx, max_new_tokens=48, constrained=False)
    assert ans.text == generate(model, tok, [_prompt(ctx)], max_new_tokens=48)[0]


def test_rank_candidates_are_paragraph_starts():
    ctx = CONTEXTS[0]
    assert [ctx[s:s + 3] for s in candidate_starts(ctx)] == ["1. ", "2. ", "3. "]
    assert candidate_starts("  lead\n \n\n  next") == [2, 12]
    crlf = ctx.replace("\n", "\r\n")  # a blank line of Windows line endings breaks paragraphs too
    assert [crlf[s:s + 3] for s in candidate_starts(crlf)] == ["1. ", "2. ", "3. "]
    assert candidate_starts("a\r\n\t\r\nb\rc\nd") == [0, 6]


def test_tracker_never_starts_a_copy_inside_a_multibyte_character(chatml_tok):
    """The byte A9 is a token and occurs in the context (the second byte of "é"), but a copy that starts there is
    no slice of the text: not allowed first, allowed once "caf" and the first byte of "é" are copied."""
    tok, ctx = chatml_tok, "Le café est noir."
    a9, est = tok.token_bytes.index(b"\xa9"), tok.token_bytes.index(b" est")
    tr = SpanTracker(ctx, tok.token_bytes, tok.stop_ids, constrained=True)
    assert not tr.allowed(a9) and tr.allowed(est)
    for t in tok.encode("caf") + [tok.token_bytes.index(b"\xc3")]:
        assert tr.allowed(t)
        tr.advance(t)
    assert tr.allowed(a9)
    tr.advance(a9)
    assert tr.answer() == ("café", 3, 7)
    free = SpanTracker(ctx, tok.token_bytes, tok.stop_ids, constrained=False)  # free text: no offsets from there
    free.advance(a9)
    free.advance(est)
    assert free.answer()[1:] == (None, None)


def test_answers_cut_at_max_new_tokens_are_marked_truncated(smollm):
    model, tok = smollm
    ctx = CONTEXTS[0]
    for rank in (False, True):
        whole = decode_span(model, tok, _prompt(ctx), ctx, max_new_tokens=60, rank=rank)
        assert whole.tokens < 60 and not whole.truncated  # ended by the model: a stop token
        cut = decode_span(model, tok, _prompt(ctx), ctx, max_new_tokens=5, rank=rank)
        assert cut.tokens == 5 and cut.truncated and whole.text.startswith(cut.text)
    free = decode_span(model, tok, _prompt(ctx), ctx, max_new_tokens=3, constrained=False)
    assert free.truncated
    stopped = []
    assert generate(model, tok, [_prompt(ctx)] * 2, max_new_tokens=3, stopped=stopped) == [free.text] * 2
    assert stopped == [False, False]


def test_rank_starts_where_the_model_finds_a_paragraph_likeliest(smollm):
    """SmolLM2 asked for a clause: greedy commits to a first token, ranking weighs each paragraph's first 16
    tokens. Reference, computed apart: one plain forward pass (no cache, no shared prefix) of the prompt and each
    paragraph's first 16 tokens; NONE when its first token outweighs all paragraph starts together, else the
    answer starts at the paragraph with the highest mean log-probability."""
    model, tok = smollm
    ctx, quoted = CONTEXTS[0], 0
    for query in ("Governing Law", "Notices", "Term"):
        ans = decode_span(model, tok, _prompt(ctx, query), ctx, max_new_tokens=40, rank=True)
        prompt = tok.encode(tok.chat_prompt(_prompt(ctx, query)))
        none_first = tok.encode(tok.chat_answer("NONE"))[0]
        scores = {}
        for start in candidate_starts(ctx):
            cand = tok.encode(ctx[start:start + 12 * 16])[:16]
            lp = torch.log_softmax(model(torch.tensor([prompt + cand]))[0].float(), -1)
            scores[start] = (cand[0], float(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(cand))) / len(cand))
        lp0 = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
        quote_mass = float(torch.logsumexp(lp0[sorted({c for c, _ in scores.values()} - {none_first})], 0))
        if float(lp0[none_first]) > quote_mass:
            assert ans.text == "NONE"
        else:
            best = max(scores, key=lambda s: scores[s][1])
            assert ans.start == best and ctx[ans.start:ans.end] == ans.text, (query, ans, scores)
            quoted += 1
    assert quoted  # the ranking itself was checked, not only NONE decisions


def test_rank_choice_does_not_flip_when_a_short_paragraph_follows(smollm):
    """A paragraph of a few tokens at the context's end (a heading a window edge cut off) must not win by the
    log-probabilities it lacks: appending one leaves the chosen start where it was."""
    model, tok = smollm
    ctx = CONTEXTS[0]
    for query in ("Governing Law", "Notices", "Term"):
        before = decode_span(model, tok, _prompt(ctx, query), ctx, max_new_tokens=8, rank=True)
        longer = ctx + "\n\n4. Notices"
        after = decode_span(model, tok, _prompt(longer, query), longer, max_new_tokens=8, rank=True)
        assert before.text != "NONE" and (after.start, after.text) == (before.start, before.text), query


@pytest.mark.parametrize("rank", [False, True])
def test_shared_prefix_decoding_gives_what_each_prompt_alone_gives(random_chatml, rank):
    from data.example import TEMPLATES
    from model.generate import decode_spans

    model, tok = random_chatml
    ctx = CONTEXTS[1]
    prompts = [TEMPLATES[1].format(query=q, context=ctx) for q in ("Assignment", "Governing Law", "Audit Rights")]
    together = decode_spans(model, tok, prompts, ctx, max_new_tokens=12, rank=rank)
    alone = [decode_span(model, tok, p, ctx, max_new_tokens=12, rank=rank) for p in prompts]
    assert [(a.text, a.start, a.end) for a in together] == [(a.text, a.start, a.end) for a in alone]
    assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(together, alone))


def test_channel_scores_batched_equal_one_at_a_time(random_chatml):
    """Packing every clause into one row changes nothing: each clause's score equals scoring it alone, which is
    the summed log-softmax of the query's tokens after CHANNEL_PROMPT."""
    from model.channel import CHANNEL_PROMPT, channel_scores

    model, tok = random_chatml
    texts = ["1. Term. This Agreement lasts two (2) years.", "2. Governing Law. New York law governs.", "x"]
    batched = channel_scores(model, tok, texts, "Governing Law")
    for t, b in zip(texts, batched):
        p = tok.encode(tok.chat_prompt(CHANNEL_PROMPT.format(clause=t)))
        q = tok.encode("Governing Law")
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + q]))[0].float(), -1)
        by_hand = sum(float(lp[len(p) - 1 + j, q[j]]) for j in range(len(q)))
        assert b == pytest.approx(by_hand, abs=1e-4)


def test_channel_answer_quotes_a_whole_paragraph_with_offsets_or_none(random_chatml):
    from model.channel import ChannelRule, channel_answer, paragraphs

    model, tok = random_chatml
    ctx = CONTEXTS[0]
    spans = paragraphs(ctx)
    assert [ctx[a:b] for a, b in spans] == [p.strip() for p in ctx.split("\n\n")]
    ans = channel_answer(model, tok, "Governing Law", ctx, ChannelRule(bias=1e9))  # any paragraph passes
    assert (ans.start, ans.end) in spans and ctx[ans.start:ans.end] == ans.text
    assert channel_answer(model, tok, "Governing Law", ctx, ChannelRule(bias=-1e9)).text == "NONE"  # none can
    assert channel_answer(model, tok, "Governing Law", "   \n\n  ").text == "NONE"


def test_sentence_units_cut_paragraphs_at_sentence_ends_and_the_channel_quotes_one(random_chatml):
    """unit "sentence" (CUAD's spans are sentence fragments): each paragraph cut where "." or ";" is followed by
    whitespace and a capital, bracket or quote; the units are slices of the text, in order, whitespace between
    them left out, never across a paragraph; channel_answer then quotes one of them."""
    from model.channel import ChannelRule, channel_answer, sentences, units

    ctx = ("SECTION 12. Termination.  Either party may terminate this Agreement on 30 days' notice; Notice\n"
           "shall be in writing; the notice goes by mail. Sec. 2 applies to 1.5 days and to the U.S. Government.\n\n"
           "Governing Law. This Agreement is governed by the laws of Ohio (\"Ohio Law\"). ABC Holdings, Inc. "
           "(\"Licensor\") and XYZ Corp. (\"Licensee\") agree. See Art. II.")
    got = [ctx[a:b] for a, b in sentences(ctx)]
    assert got == ["SECTION 12.", "Termination.", "Either party may terminate this Agreement on 30 days' notice;",
                   "Notice\nshall be in writing; the notice goes by mail.",
                   "Sec. 2 applies to 1.5 days and to the U.S. Government.", "Governing Law.",
                   'This Agreement is governed by the laws of Ohio ("Ohio Law").',
                   'ABC Holdings, Inc. ("Licensor") and XYZ Corp. ("Licensee") agree.', "See Art. II."]
    assert units(ctx, "sentence") == sentences(ctx) and units(ctx) == units(ctx, "paragraph") != sentences(ctx)
    with pytest.raises(ValueError, match="channel unit 'clause'"):
        units(ctx, "clause")
    model, tok = random_chatml
    ans = channel_answer(model, tok, "Governing Law", ctx, ChannelRule(bias=1e9), unit="sentence")
    assert (ans.start, ans.end) in sentences(ctx) and ctx[ans.start:ans.end] == ans.text
    assert len(ans.detail["scores"]) == len(got)


def test_segments_after_a_cached_prefix_see_the_prefix_and_their_own_earlier_tokens():
    """build_mask with past > 0 and segment ids: row i, column j (j < past: the prefix; else token j - past of
    this call) is True exactly when j is in the prefix, or the same segment and not after i."""
    from model.llama import build_mask

    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    past = 3
    mask = build_mask(6, seg, past=past)
    assert mask.shape == (1, 1, 6, past + 6)
    for i in range(6):
        for j in range(past + 6):
            want = j < past or (int(seg[0, j - past]) == int(seg[0, i]) and j - past <= i)
            assert bool(mask[0, 0, i, j]) == want, (i, j)
    assert torch.equal(build_mask(6, seg), mask[..., past:])  # no prefix: the packed rows' mask as before


def test_channel_score_matrix_equals_channel_scores_query_by_query(random_chatml):
    """Reading each clause's prompt once into a KV cache and scoring every query after it, packed in one row,
    gives each query's channel_scores: queries of one token and of several, a clause cut at max_clause_tokens."""
    from model.channel import CHANNEL_NULL, channel_score_matrix, channel_scores

    model, tok = random_chatml
    texts = ["1. Term. This Agreement lasts two (2) years.", "2. Governing Law. New York law governs. " * 5, "x",
             CHANNEL_NULL]
    queries = ["Governing Law", "Term", "Anti-Assignment", "Post-Termination Services"]
    lengths = [len(tok.encode(q)) for q in queries]
    assert min(lengths) == 1 and max(lengths) > 3  # the first-token and the in-query predictions both checked
    for max_clause_tokens in (768, 12):  # 12 cuts the second text
        matrix = channel_score_matrix(model, tok, texts, queries, max_clause_tokens)
        assert len(matrix) == len(texts) and all(len(r) == len(queries) for r in matrix)
        for j, q in enumerate(queries):
            alone = channel_scores(model, tok, texts, q, max_clause_tokens)
            assert [r[j] for r in matrix] == pytest.approx(alone, abs=1e-4)


def test_channel_answers_equal_channel_answer_for_each_query(random_chatml):
    from model.channel import ChannelRule, channel_answer, channel_answers

    model, tok = random_chatml
    ctx = CONTEXTS[0]
    queries = ["Governing Law", "Term", "Notices"]
    for rule in (None, ChannelRule(weights={"gap": 1.0}, bias=-0.05)):
        together = channel_answers(model, tok, queries, ctx, rule, focus=[None, lambda t: (0, 3), None])
        alone = [channel_answer(model, tok, q, ctx, rule, focus=f)
                 for q, f in zip(queries, [None, lambda t: (0, 3), None])]
        assert [(a.text, a.start, a.end) for a in together] == [(a.text, a.start, a.end) for a in alone]
        for a, b in zip(together, alone):
            assert a.detail["scores"] == pytest.approx(b.detail["scores"], abs=1e-3)
            assert a.detail["null"] == pytest.approx(b.detail["null"], abs=1e-3)
            assert a.detail.get("focus") == b.detail.get("focus")
    assert [a.text for a in channel_answers(model, tok, queries, "  \n\n ")] == ["NONE"] * 3
