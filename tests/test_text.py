"""data.text: normalising with an offset map, locating a quote (validator and extraction profiles), snapping cuts
to words and lines, paragraphs, cutting a context to a budget."""
from data import NONE
from data.text import Match, cut_context, locate, normalize, paragraphs, snap_end, snap_start

CONTRACT = ("1. Term. This Agreement begins on the Effective Date.\n2. Governing Law. This Agreement shall be "
            "governed by the laws of the State of New York, without regard to conflicts of law.\n3. Notices.")


# ---- normalize ------------------------------------------------------------------------------------------------
def test_normalize_collapses_whitespace_and_folds_quotes_with_an_offset_map():
    text = "  The \u201cSupplier\u201d\n\t shall\u00a0deliver \u2013 now "
    norm, index = normalize(text)
    assert norm == ' The "Supplier" shall deliver - now '
    assert len(index) == len(norm)
    folded = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2013", "-")
    # every character comes from its own place in the text; a collapsed run from its first whitespace character
    assert all(folded[i] == ch or ch == " " and folded[i].isspace() for ch, i in zip(norm, index))
    assert index[0] == 0 and index[-1] == len(text) - 1
    assert normalize(text, fold=False)[0] == " The \u201cSupplier\u201d shall deliver \u2013 now "


# ---- locate ---------------------------------------------------------------------------------------------------
def test_locate_exact_normalized_and_fuzzy():
    clause = "This Agreement shall be governed by the laws of the State of New York"
    m = locate(clause, CONTRACT)
    assert m.how == "exact" and CONTRACT[m.start:m.end] == clause
    m = locate("This  Agreement shall be\n governed by the laws of the State of New York", CONTRACT)
    assert m.how == "normalized" and CONTRACT[m.start:m.end] == clause
    m = locate("This Agreement shall be governed by the law of the State of New York", CONTRACT)  # one letter off
    assert m.how == "fuzzy" and m.score >= 95
    assert "governed by the laws of the State of New York" in CONTRACT[m.start:m.end]
    assert locate("Each party shall indemnify the other against all claims.", CONTRACT) is None


def test_locate_folds_curly_quotes_only_when_asked():
    hay = 'The "Supplier" shall deliver.'
    m = locate("The \u201cSupplier\u201d shall deliver.", hay)
    assert m.how == "normalized" and hay[m.start:m.end] == hay and not m.verbatim
    assert locate("The \u201cSupplier\u201d shall deliver.", hay, 0.0, fold=False, words=True).how == "fuzzy"


def test_locate_with_a_precomputed_normalised_haystack_finds_the_same():
    needle = "This Agreement  shall be governed"
    assert locate(needle, CONTRACT, norm_hay=normalize(CONTRACT)) == locate(needle, CONTRACT)


def test_locate_widens_to_word_boundaries():
    window = "Preamble. The Supplier shall deliver the Goods within thirty days. Other terms follow."
    m = locate("Supplier shall deliver Goods within thirty days", window, 0.0, fold=False, words=True)
    assert window[m.start:m.end] == "Supplier shall deliver the Goods within thirty days." and not m.verbatim
    assert locate("   ", window, 0.0, fold=False, words=True) is None


def test_locate_words_profile_drops_spans_below_min_score():
    window = "Preamble. The Supplier shall deliver the Goods within thirty days. Other terms follow."
    made_up = "Buyer may not compete in Ohio for five years."
    assert locate(made_up, window, 0.0, fold=False, words=True).how == "fuzzy"
    assert locate(made_up, window, 90.0, fold=False, words=True) is None


def test_match_is_verbatim_only_when_exact():
    assert Match(0, 3, "exact", 100.0).verbatim
    assert not Match(0, 3, "normalized", 100.0).verbatim and not Match(0, 3, "fuzzy", 97.0).verbatim


# ---- snapping -------------------------------------------------------------------------------------------------
def test_snap_start_skips_the_cut_word_and_keeps_a_clean_start():
    text = "alpha beta gamma"
    assert snap_start(text, 8, len(text)) == 11  # inside "beta": past it, to "gamma"
    assert snap_start(text, 6, len(text)) == 6   # already at a word
    assert snap_start(text, -3, len(text)) == 0
    assert snap_start(text, 12, 14) == 12        # no break before limit: left where it was


def test_snap_start_prefers_a_near_line_start_and_optionally_any_whitespace():
    text = "abc def\nghi jkl"
    assert snap_start(text, 1, len(text)) == 4
    assert snap_start(text, 1, len(text), line_reach=400) == 8
    assert snap_start(text, 1, len(text), line_reach=3) == 4  # the newline is beyond reach
    tabbed = "abc\tdef ghi"
    assert snap_start(tabbed, 1, len(tabbed)) == 8  # only a space or newline ends a word by default
    assert snap_start(tabbed, 1, len(tabbed), any_space=True) == 4


def test_snap_end_drops_the_cut_word_and_prefers_a_near_line_end():
    text = "alpha beta gamma"
    assert snap_end(text, 8, 0) == 5
    assert snap_end(text, 5, 0) == 5 and snap_end(text, 99, 0) == len(text)
    assert snap_end(text, 8, 7) == 8  # no break after limit: left where it was
    lines = "abc def\nghi jkl"
    assert snap_end(lines, 13, 0) == 11
    assert snap_end(lines, 13, 0, line_reach=400) == 7
    assert snap_end(lines, 13, 9, line_reach=400) == 11  # not below limit


# ---- paragraphs and cutting ----------------------------------------------------------------------------------
def test_paragraphs_split_at_blank_lines_only():
    text = "one\ntwo\n\n  three\n \n\nfour\n"
    assert [text[s:e] for s, e in paragraphs(text)] == ["one\ntwo", "three", "four\n"]
    assert paragraphs("") == []


def _paragraphs(n=6, words=30):
    return [f"Clause {i}: " + " ".join(f"w{i}_{j}" for j in range(words)) for i in range(n)]


def test_cut_context_drops_whole_paragraphs_and_leaves_the_answer_anywhere():
    paras = _paragraphs()
    ctx = "\n\n".join(paras)
    where = []
    for key in range(60):
        cut = cut_context(ctx, paras[3], 600, key=str(key))
        kept = cut.split("\n\n")
        assert len(cut) <= 600 and paras[3] in kept
        assert all(p in paras for p in kept) and kept == sorted(kept, key=paras.index)  # whole, in order
        where.append(kept.index(paras[3]))
    # not centred, not fixed: the clause is first, in the middle and last among what is kept
    assert {0, 1, 2} <= set(where)
    assert cut_context(ctx, paras[3], 600, key="a") == cut_context(ctx, paras[3], 600, key="a")  # deterministic


def test_cut_context_window_puts_a_long_answer_at_a_random_offset():
    ctx = " ".join(f"w{i}" for i in range(300))
    offsets = set()
    for key in range(40):
        cut = cut_context(ctx, "w150 w151", 60, key=str(key))
        assert "w150 w151" in cut and len(cut) <= 60 and cut == cut.strip()
        assert all(w in ctx.split() for w in cut.split())  # cut at word boundaries
        offsets.add(cut.index("w150") // 10)
    assert len(offsets) >= 4  # the answer's place in the window varies (centring it told the model where to look)
    starts = {cut_context(ctx, NONE, 60, key=str(k)).split()[0] for k in range(20)}
    assert len(starts) > 5  # NONE windows come from anywhere, not only the beginning


def test_paragraphs_split_at_windows_blank_lines_too():
    text = "one\r\ntwo\r\n\r\n  three\r\n \t\r\n\r\nfour\r\n"
    assert [text[s:e] for s, e in paragraphs(text)] == ["one\r\ntwo", "three", "four\r\n"]
    lf = text.replace("\r\n", "\n")
    assert [text[s:e].replace("\r\n", "\n") for s, e in paragraphs(text)] == [lf[s:e] for s, e in paragraphs(lf)]
