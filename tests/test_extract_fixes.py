"""engine.extract's channel units on real contracts, calibrate's threshold and inputs, model.generate's vocabulary
error: what a review of extract found, pinned."""
import io
import json
import math

import numpy as np
import pytest

from tests.test_calibrate import _eval_json, _feature_rows
from tests.test_evaluate import make_tiny_model_dir, write_byte_tokenizer

GOVERNING = "This Agreement shall be governed by the laws of the State of New York."


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-extract-fixes") / "model")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))  # one token per byte


def _scorer(monkeypatch, seen: list, marker: str = "governed"):
    """model.channel.channel_scores without a model: a unit scores 1 when what its prompt reads of it (its first
    max_clause_tokens tokens, as channel_prompt_ids cuts it) holds marker, else 0, as does CHANNEL_NULL; under
    the default rule a unit is quoted only if the marker is read in it. seen receives every unit scored."""
    import model.channel

    def scores(model, tok, texts, query, max_clause_tokens=model.channel.MAX_CLAUSE_TOKENS):
        seen.extend(texts[:-1])
        read = [tok.decode(tok.encode(t)[:max_clause_tokens]) for t in texts[:-1]]
        return [float(marker in r) for r in read] + [0.0]
    monkeypatch.setattr(model.channel, "channel_scores", scores)


def _find(text, tok, unit="paragraph", budget=8000):
    from engine.extract import find_clause, window_answerer

    answer_fn = window_answerer(None, tok, decode="channel", query="Governing Law", unit=unit)
    return find_clause(text, "Governing Law", answer_fn, lambda s: len(tok.encode(s)), budget)


def test_no_window_edge_starts_or_ends_a_channel_unit(tok, monkeypatch):
    """A contract read in many windows: every unit scored is a whole paragraph of the contract (a window is
    widened to the paragraphs its edges cut), and the clause is quoted whole."""
    paras = [f"{i}. Section {i}. " + " ".join(f"The parties agree to item {i}.{k}." for k in range(3 + i % 7))
             for i in range(40)]
    paras[23] = "24. Governing Law. " + GOVERNING + " Each party submits to the courts of New York."
    text = "\n\n".join(paras)
    seen = []
    _scorer(monkeypatch, seen)
    found, windows = _find(text, tok, budget=600)
    assert windows > 5
    assert set(seen) <= set(paras), [s[:40] for s in set(seen) - set(paras)][:3]
    assert [text[q.start:q.end] for q in found] == [paras[23]]


def _whole(text, windows, unit):
    """What channel_windows must give when no window holds a single unit, computed here from units() alone: each
    window widened to the units it touches, and those units relative to it."""
    from model.channel import units

    out = []
    for a, b in windows:
        inside = [(s, e) for s, e in units(text, unit) if s < b and e > a]
        a, b = min([a] + [s for s, _ in inside]), max([b] + [e for _, e in inside])
        out.append(((a, b), [(s - a, e - a) for s, e in inside]))
    return out


@pytest.mark.parametrize("unit", ["paragraph", "sentence"])
def test_channel_windows_read_exactly_the_units_evaluate_measured(tok, unit):
    """engine.evaluate's figures describe units(): extract's channel windows hold exactly those units, none split
    (a paragraph longer than MAX_CLAUSE_TOKENS stays whole) or joined (a "2." sentence stays one), only the
    windows widened to them."""
    from data.text import make_windows
    from engine.extract import channel_windows
    from model.channel import MAX_CLAUSE_TOKENS, units

    paras = [f"{i}. Section {i}. " + " ".join(f"The parties agree to item {i}.{k}." for k in range(3 + i % 7))
             for i in range(30)]
    paras[12] = " ".join(f"Item {k}: the supplier shall deliver the goods of schedule {k}." for k in range(20))
    text = "\n\n".join(paras)
    assert len(tok.encode(paras[12])) > MAX_CLAUSE_TOKENS
    count = lambda s: len(tok.encode(s))  # noqa: E731
    windows = make_windows(text, count, 1200, 0.25)
    got, spans = channel_windows(text, windows, unit)
    expected = _whole(text, windows, unit)
    assert len(windows) > 3 and all(len(s) > 1 for _, s in expected)  # no window holds a single unit
    assert list(zip(got, spans)) == expected
    assert (text.index(paras[12]), text.index(paras[12]) + len(paras[12])) in units(text) if unit == "paragraph" \
        else "0." in [text[a:b] for a, b in units(text, unit)]


def test_a_window_inside_one_long_unit_reads_only_the_lines_it_touches(tok):
    """A contract with no blank line is one paragraph: each window that falls inside it reads that paragraph's
    lines it touches (widened to whole lines), not the whole file's lines in every window."""
    from data.text import make_windows
    from engine.extract import channel_windows

    lines = [f"{i}. Section {i}. The parties agree to item {i} as set out in the schedule." for i in range(120)]
    text = "\n".join(lines)
    windows = make_windows(text, lambda s: len(tok.encode(s)), 1000, 0.25)
    got, spans = channel_windows(text, windows, "paragraph")
    assert len(windows) > 5
    longest = max(len(ln) for ln in lines)
    for (a, b), (wa, wb), ss in zip(windows, got, spans):
        assert a - longest <= wa <= a and b <= wb <= b + longest  # widened by at most a line each end
        assert [text[wa + s:wa + e] for s, e in ss] == [ln for ln in lines if ln in text[wa:wb]]
    assert {text[wa + s:wa + e] for (wa, _), ss in zip(got, spans) for s, e in ss} == set(lines)


def test_a_contract_without_blank_lines_is_quoted_line_by_line(tok, monkeypatch):
    """Sections on single lines, no blank line between: one paragraph, the whole file, was "the clause". A
    window holding a single unit has it split at its lines."""
    lines = ["MASTER SERVICES AGREEMENT", "1. Term. This Agreement begins on the Effective Date.",
             "2. Governing Law. " + GOVERNING, "3. Assignment. Neither party may assign this Agreement."]
    text = "\n".join(lines) + "\n"
    seen = []
    _scorer(monkeypatch, seen)
    found, windows = _find(text, tok)
    assert windows == 1 and len(seen) == 4
    assert [text[q.start:q.end] for q in found] == [lines[2]]


def test_channel_json_names_the_gain(tiny_model_dir, tmp_path, capsys):
    """--json's confidence of a channel quote is its unit's gain per query token, "gain" (it was reported as
    "logprob")."""
    from engine.extract import main

    contract = tmp_path / "c.txt"
    contract.write_text("AGREEMENT\n\n2. Governing Law. " + GOVERNING + "\n\nSigned.\n")
    always = tmp_path / "always.json"
    always.write_text(json.dumps({"weights": {"gain": 0.0}, "bias": 1.0}))
    assert main(["--model", str(tiny_model_dir), "--contract", str(contract), "--clause", "Governing Law",
                 "--quiet", "--json", "--decode", "channel", "--channel-rule", str(always)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["found"] and res["logprob"] is None and isinstance(res["gain"], float)
    assert all(m["logprob"] is None and isinstance(m["gain"], float) for m in res["matches"])


LONG = " ".join(f"Item {k}: the supplier shall deliver the goods listed in schedule {k}." for k in range(40))


@pytest.mark.parametrize("clause", ["Governing Law", "all"])
def test_a_channel_quote_longer_than_its_prompt_read_is_warned(tiny_model_dir, tok, tmp_path, capsys, monkeypatch,
                                                              clause):
    """A channel quote of more than MAX_CLAUSE_TOKENS tokens was chosen on its opening alone: one warning line
    says so with its length in tokens. A shorter one is not warned about, nor a long quote of another decoder
    (the 2,000-character warning fired on 104 of ACORD's 401 correct answers)."""
    import engine.extract
    import model.channel
    from engine.extract import main
    from model.channel import MAX_CLAUSE_TOKENS

    def matrix(model, tok, texts, queries, max_clause_tokens=MAX_CLAUSE_TOKENS):  # --clause all's scorer
        return [[float("governed" in tok.decode(tok.encode(t)[:max_clause_tokens]))] * len(queries)
                for t in texts[:-1]] + [[0.0] * len(queries)]
    _scorer(monkeypatch, [])
    monkeypatch.setattr(model.channel, "channel_score_matrix", matrix)
    contract = tmp_path / "c.txt"
    argv = ["--model", str(tiny_model_dir), "--contract", str(contract), "--clause", clause, "--quiet", "--json",
            "--seq-len", "8192"]
    for chosen, warned in ((LONG.replace("goods", "goods governed", 1), True), (GOVERNING, False)):
        contract.write_text("AGREEMENT\n\n" + chosen + "\n\nSigned.\n")
        assert main(argv + ["--decode", "channel"]) == 0
        out, err = capsys.readouterr()
        res = json.loads(out)
        quoted = res["text"] if clause != "all" else res["clauses"]["Governing Law"]["text"]
        assert quoted == chosen
        lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
        assert len(lines) == warned, err
        if warned:
            n = len(tok.encode(chosen))
            assert n > MAX_CLAUSE_TOKENS and (f"{n:,} tokens" in lines[0] or clause == "all")
            assert f"first {MAX_CLAUSE_TOKENS}" in lines[0] and "--channel-unit sentence" in lines[0]

    def generate(model, tok, prompts, max_new_tokens=256, temperature=0.0, batch_size=8, stopped=None, **kw):
        stopped.extend([True] * len(prompts))
        return [LONG] * len(prompts)
    monkeypatch.setattr(engine.extract, "generate", generate)
    if clause != "all":
        contract.write_text("AGREEMENT\n\n" + LONG + "\n")
        assert main(argv + ["--decode", "free", "--max-new-tokens", "8"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["text"] == LONG and "gain" not in json.loads(out)
        assert not [ln for ln in err.splitlines() if ln.startswith("warning:")], err


def test_contract_dash_reads_standard_input(tiny_model_dir, capsys, monkeypatch):
    from engine.extract import build_parser, main

    text = "AGREEMENT\n\n2. Governing Law. " + GOVERNING + "\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    assert main(["--model", str(tiny_model_dir), "--contract", "-", "--clause", "Governing Law", "--quiet",
                 "--json", "--decode", "constrained", "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["contract"] == "-" and all(text[m["start"]:m["end"]] == m["text"] for m in res["matches"])
    assert '"-" for standard input' in " ".join(build_parser().format_help().split())


def test_an_adapter_read_with_another_unit_than_it_learned_is_warned(tiny_model_dir, tmp_path, capsys):
    from engine.extract import main
    from model import apply_lora, load_model, save_adapter

    adapter = save_adapter(apply_lora(load_model(str(tiny_model_dir)), r=2), tmp_path / "run" / "adapter",
                           base_model=str(tiny_model_dir))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": "synthetic", "split": "fit",
                                                              "groups_per_step": 4, "unit": "paragraph"}))
    contract = tmp_path / "c.txt"
    contract.write_text("AGREEMENT\n\n2. Governing Law. " + GOVERNING + "\n")
    argv = ["--adapter", str(adapter), "--contract", str(contract), "--clause", "Governing Law", "--quiet", "--json"]
    for unit, warned in ((["--channel-unit", "sentence"], True), ([], False), (["--channel-unit", "paragraph"], False)):
        assert main(argv + unit) == 0
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
        assert len(err) == warned and (not warned or "trained to choose paragraphs" in err[0])


# ---- engine.calibrate -------------------------------------------------------------------------------------------
def test_a_zero_bound_rule_keeps_its_clause_rows_on_the_unrounded_features():
    """eval.json holds features rounded to FEATURE_DECIMALS; a decoder applies the rule to the unrounded ones. At
    --max-wrongly-none 0 the threshold sat 1e-6 under the lowest clause row's stored value, and that row, its
    unrounded gain 4e-5 lower, was answered NONE at decode time although calibrate reported it kept."""
    from engine.calibrate import fit_rule
    from model.channel import FEATURE_DECIMALS

    rng = np.random.default_rng(0)
    gains = [0.29996] + list(rng.normal(1.0, 0.3, 30)) + list(rng.normal(0.3, 0.3, 10))
    rows = [{"id": f"r{i}", "answer": "a clause" if i <= 30 else "NONE",
             "channel": {"features": {"gain": round(float(g), FEATURE_DECIMALS)}}} for i, g in enumerate(gains)]
    rule, fit = fit_rule(rows, ("gain",), 0.0)
    assert fit["wrongly_none"] == 0.0
    assert all(rule.value({"gain": float(g)}) > 0 for g in gains[:31])  # what the decoder decides: all quoted
    # midway to the next row value below: NONE rows just under the lowest clause row stay NONE under rounding too
    below = max(r["channel"]["features"]["gain"] for r in rows if r["channel"]["features"]["gain"] < 0.3)
    assert -rule.bias / rule.weights["gain"] == pytest.approx((below + 0.3) / 2)


@pytest.mark.parametrize("doc, key", [('{"weights": {"gain": NaN}, "bias": 0}', "weights.gain"),
                                      ('{"weights": {"gain": 1.0}, "bias": Infinity}', "bias")])
def test_a_rule_with_a_non_finite_number_is_refused_naming_the_key(tmp_path, doc, key):
    from model.channel import ChannelRule

    path = tmp_path / "rule.json"
    path.write_text(doc)
    with pytest.raises(ValueError) as e:
        ChannelRule.from_file(path)
    assert str(e.value).startswith(f"{path}: {key} is ") and "\n" not in str(e.value)


def test_rows_with_a_non_finite_feature_are_refused_naming_the_row(tmp_path, capsys):
    """A NaN feature made the fitted bias NaN and calibrate report 0.0% / 0.0%, exit 0."""
    from engine.calibrate import main as calibrate

    rows = _feature_rows()
    rows[3]["channel"]["features"]["gain"] = math.nan
    ev = tmp_path / "eval.json"
    _eval_json(ev, rows)
    assert calibrate(["--rows", str(ev), "--out", str(tmp_path / "rule.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ev}: rows[3] (id 'r3') channel feature 'gain' is nan") and "\n" not in err
    assert not (tmp_path / "rule.json").exists()


def test_a_fit_that_does_not_converge_is_an_error_not_a_nan_rule(monkeypatch):
    import engine.calibrate

    monkeypatch.setattr(engine.calibrate, "fit_logistic", lambda X, y: (np.array([math.nan]), 0.0))
    with pytest.raises(ValueError, match="did not converge"):
        engine.calibrate.fit_rule(_feature_rows(), ("gain",), 10.0)


def test_missing_rows_say_how_to_make_them(tmp_path, capsys):
    """--rows that do not exist: the error says which engine.evaluate run writes them (it said to run evaluate
    without the adapter, --compare's advice)."""
    from engine.calibrate import main as calibrate

    assert calibrate(["--rows", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert "calibration eval.json not found" in err and "--split calib --decode channel --out DIR" in err
    assert "without the adapter" not in err and "\n" not in err
    good = _eval_json(tmp_path / "good.json", _feature_rows())
    assert calibrate(["--rows", str(good), "--check", str(tmp_path / "nope.json"), "--out",
                      str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--check eval.json not found" in err and "--decode channel" in err
    assert not (tmp_path / "r.json").exists()


# ---- model.generate ---------------------------------------------------------------------------------------------
def test_generate_with_another_models_tokenizer_is_one_line(tmp_path):
    """A tokenizer whose ids pass the model's vocabulary (here its chat tokens 256-258 against 200 rows) was a
    19-line traceback from the command; it is the one-line error."""
    from model.generate import main
    from tests.conftest import save_tiny_hf

    path = save_tiny_hf(tmp_path / "m", vocab_size=200)
    write_byte_tokenizer(path)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(path), "--prompt", "hello", "--max-new-tokens", "2"])
    msg = str(e.value.code)
    assert msg.startswith("error: token id ") and "vocabulary" in msg and "\n" not in msg
