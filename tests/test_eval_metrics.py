"""engine.metrics on hand-made predictions; every expected number is worked out by hand in the comments."""
import pytest

from engine.metrics import aggregate, is_none, score, summarize


def test_identical_up_to_whitespace_is_perfect():
    s = score("The Licensee  shall\nindemnify.", "  The Licensee shall indemnify. ")
    assert s == {"similarity": 100.0, "exact_match": 1.0, "f1": 1.0, "abstention": "tn", "verbatim": None,
                 "right_start": None}


def test_near_miss_missing_period():
    # "Payment is due in 30 days" (25 chars) vs the same + "." (26): 25 chars in common -> 100 * 2*25 / 51.
    s = score("Payment is due in 30 days", "Payment is due in 30 days.")
    assert s["similarity"] == pytest.approx(100 * 50 / 51)
    assert s["exact_match"] == 0.0
    assert s["f1"] == 1.0  # punctuation is dropped before the token comparison
    assert s["abstention"] == "tn"


def test_near_miss_dropped_words():
    # prediction (22 chars) is a subsequence of the answer (30 chars) -> 100 * 2*22 / 52.
    # tokens: answer [seller shall pay all taxes] ("the" dropped), prediction [seller shall pay taxes]:
    # 4 in common, precision 4/4, recall 4/5 -> F1 = 2 * 1 * 0.8 / 1.8 = 8/9.
    s = score("seller shall pay taxes", "the seller shall pay all taxes")
    assert s["similarity"] == pytest.approx(100 * 44 / 52)
    assert s["f1"] == pytest.approx(8 / 9)
    assert s["exact_match"] == 0.0


def test_similarity_is_case_sensitive_but_f1_is_not():
    # "ABC" vs "abc": no character in common -> 0; the lowercased tokens agree -> F1 1.
    s = score("ABC", "abc")
    assert s["similarity"] == 0.0 and s["f1"] == 1.0 and s["exact_match"] == 0.0


def test_empty_prediction_scores_zero():
    assert score("", "Net 30.") == {"similarity": 0.0, "exact_match": 0.0, "f1": 0.0, "abstention": "tn",
                                    "verbatim": None, "right_start": None}
    assert score("   ", "")["similarity"] == 100.0  # nothing expected, nothing said


def test_none_both_ways():
    assert score("NONE", "NONE") == {"similarity": 100.0, "exact_match": 1.0, "f1": 1.0, "abstention": "tp",
                                     "verbatim": None, "right_start": None}
    assert score("None.", "NONE")["abstention"] == "tp"
    assert score("NONE", "The term is two years.")["abstention"] == "fp"  # abstained although the clause exists
    assert score("The term is two years.", "NONE")["abstention"] == "fn"  # quoted something that is not there
    assert is_none(' "none" ') and not is_none("NONE of the parties")


def test_aggregate_by_hand():
    pairs = [("Term", "acord", "x", "x"),                                            # sim 100, tn
             ("Term", "acord", "seller shall pay taxes", "the seller shall pay all taxes"),  # 84.6, tn
             ("Law", "cuad", "NONE", "NONE"),                                       # 100, tp
             ("Law", "cuad", "NONE", "Delaware."),                                  # 0, fp
             ("Law", "cuad", "Delaware.", "NONE")]                                  # ratio("Delaware.","NONE")=0, fn
    rows = [{"category": c, "source": s, "answer": a, "scores": score(p, a)} for c, s, p, a in pairs]
    sims = [100.0, 100 * 44 / 52, 100.0, 0.0, 0.0]
    assert [r["scores"]["similarity"] for r in rows] == pytest.approx(sims)
    agg = aggregate([r["scores"] for r in rows])
    assert agg["n"] == 5
    assert agg["avg_similarity"] == pytest.approx(sum(sims) / 5)
    assert agg["excellent"] == pytest.approx(40.0)   # 2 of 5 above 90
    assert agg["good"] == pytest.approx(60.0)        # 3 of 5 above 70
    assert agg["exact_match"] == pytest.approx(40.0)  # "x" and NONE/NONE
    assert agg["f1"] == pytest.approx(100 * (1 + 8 / 9 + 1 + 0 + 0) / 5)
    assert agg["abstention_precision"] == pytest.approx(50.0)  # tp 1, fp 1
    assert agg["abstention_recall"] == pytest.approx(50.0)     # tp 1, fn 1

    assert agg["predicted_none"] == pytest.approx(40.0)        # NONE/NONE and NONE/Delaware
    assert agg["verbatim"] is None                             # no context given: nothing to check

    summary = summarize(rows)
    assert summary["overall"] == agg
    # clause examples (gold is a clause) and NONE examples apart: the NONE on "Delaware." is a miss of a clause
    clause, none = summary["clause"], summary["none"]
    assert clause["n"] == 3 and clause["predicted_none"] == pytest.approx(100 / 3)
    assert clause["avg_similarity"] == pytest.approx((100 + 100 * 44 / 52 + 0) / 3)
    assert none["n"] == 2 and none["predicted_none"] == pytest.approx(50.0) and none["abstention_recall"] == 50.0
    # per category and per source, the two kinds apart too
    cats, sources = summary["by_category"], summary["by_source"]
    assert set(cats["clause"]) == {"Term", "Law"} and set(cats["none"]) == {"Law"}
    assert set(sources["clause"]) == {"acord", "cuad"} and set(sources["none"]) == {"cuad"}
    term = cats["clause"]["Term"]
    assert term["n"] == 2 and term["avg_similarity"] == pytest.approx((100 + 100 * 44 / 52) / 2)
    # no NONE anywhere in "Term": precision and recall are undefined, not 0 or 100
    assert term["abstention_precision"] is None and term["abstention_recall"] is None
    assert sources["clause"]["cuad"]["exact_match"] == 0.0 and sources["none"]["cuad"]["exact_match"] == 50.0


def test_by_category_keeps_clause_and_none_examples_apart():
    """A category's NONE examples answered NONE (similarity 100) must not lift its clause examples' similarity, nor
    its clause examples' quotes lower its NONE examples' answered-NONE rate."""
    pairs = [("Law", "Delaware.", "New York law governs."),  # a clause example quoted wrong: similarity low
             ("Law", "NONE", "NONE"), ("Law", "NONE", "NONE"), ("Law", "NONE", "NONE")]  # NONE examples, right
    rows = [{"category": c, "source": "acord", "answer": a, "scores": score(p, a)} for c, p, a in pairs]
    summary = summarize(rows)
    for key in ("by_category", "by_source"):
        clause, none = (summary[key][k][next(iter(summary[key][k]))] for k in ("clause", "none"))
        assert clause["n"] == 1 and clause["avg_similarity"] == score(*pairs[0][1:])["similarity"] < 50
        assert none["n"] == 3 and none["predicted_none"] == 100.0


def test_aggregate_of_nothing():
    agg = aggregate([])
    assert agg["n"] == 0 and agg["avg_similarity"] is None


def test_verbatim_is_checked_against_the_context_for_quotes_only():
    ctx = "1. Term. The term is two years.\n\n2. Law. Delaware law governs."
    assert score("The term is two years.", "x", ctx)["verbatim"] is True
    assert score("The term is 2 years.", "x", ctx)["verbatim"] is False
    assert score("NONE", "x", ctx)["verbatim"] is None
    agg = aggregate([score("Delaware law governs.", "x", ctx), score("Delaware governs.", "x", ctx),
                     score("NONE", "x", ctx)])
    assert agg["verbatim"] == pytest.approx(50.0)  # of the two quotes, one is an exact substring


def test_right_start_separates_the_choice_from_the_stop():
    ctx = "1. Term. The term is two years.\n\n2. Law. Delaware law governs this Agreement."
    gold = "2. Law. Delaware law governs this Agreement."
    assert score("2. Law. Delaware law", gold, ctx)["right_start"] is True        # right clause, stopped early
    assert score(ctx, gold, ctx)["right_start"] is False                          # started at the wrong clause
    assert score("NONE", gold, ctx)["right_start"] is False                       # a clause example answered NONE
    assert score("NONE", "NONE", ctx)["right_start"] is None                      # nothing to start on
    assert score("Law.", gold, ctx, start=ctx.index("2. Law") + 3)["right_start"] is False  # offset from decoder
    agg = aggregate([score("2. Law.", gold, ctx), score(ctx, gold, ctx), score("NONE", "NONE", ctx)])
    assert agg["right_start"] == pytest.approx(50.0)


def test_right_start_forgives_a_list_number_the_lawyer_left_out():
    """The channel and rank decoders quote a whole paragraph ("2. The liability ...") where the lawyer marked the
    clause without its number ("The liability ..."): the right clause, so a right start; a heading or another
    clause before the gold start is not."""
    ctx = ("1. Term. The term is two years.\n\n2. The liability of either party is capped at the fees paid.\n\n"
           "(a) Notices go to the addresses above.\n\n12.3 iv. Disputes go to arbitration.")
    liability = "The liability of either party is capped at the fees paid."
    para = "2. The liability of either party is capped at the fees paid."
    assert score(para, liability, ctx)["right_start"] is True
    assert score(para, liability, ctx, start=ctx.index(para))["right_start"] is True  # offset from the decoder
    assert score(para, liability, ctx)["similarity"] > 90
    notices = "Notices go to the addresses above."
    assert score("(a) Notices go to", notices, ctx)["right_start"] is True  # right clause, stopped early
    assert score("12.3 iv. Disputes go to arbitration.", "Disputes go to arbitration.", ctx)["right_start"] is True
    assert score("1. Term. The term is two years.", "The term is two years.", ctx)["right_start"] is False  # heading
    assert score(ctx, notices, ctx)["right_start"] is False                       # began at another clause
    assert score("2.", liability, ctx)["right_start"] is False                    # the number alone
    assert score("he liability of", liability, ctx)["right_start"] is False       # began after it


def test_a_none_prediction_in_any_spelling_scores_as_none():
    """Free decoding may answer "None." or "none": an abstention (is_none) for every score, not a 22-point miss."""
    ctx = "1. Term. The term is two years."
    for said in ("None.", "none", ' "NONE" '):
        assert score(said, "NONE", ctx) == {"similarity": 100.0, "exact_match": 1.0, "f1": 1.0, "abstention": "tp",
                                            "verbatim": None, "right_start": None}
    assert score("None.", "The term is two years.", ctx) == score("NONE", "The term is two years.", ctx)
