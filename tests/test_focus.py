"""The focus stage of channel decoding: data.focus's training examples, the AdapterBank that holds two adapters on
one model, and engine.evaluate / engine.extract --focus-adapter against the focus adapter run on its own."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tests.test_evaluate import tiny_model_dir  # noqa: F401  (the module-scoped fixture)
from tests.test_lora import randomize_adapters


def _ex(answer, context, id="x", split="train"):
    from data.example import Example

    return Example(id=id, source="jsonl", category="Agreement Date", query="Agreement Date", context=context,
                   answer=answer, split=split)


CTX = ("This Agreement is made as of March 21, 2005 by and between Acme and Beta. It binds both.\n\n"
       "Governing law is Delaware. Venue is Wilmington.")


def test_focus_example_is_the_sentence_the_answer_begins_in_with_the_answer_clipped_to_it():
    from data.focus import focus_example

    ex, kind, _ = focus_example(_ex("March 21, 2005", CTX))
    assert (ex.context, ex.answer, kind) == ("This Agreement is made as of March 21, 2005 by and between Acme and "
                                             "Beta.", "March 21, 2005", "inside")
    assert ex.id == "x" and ex.query == "Agreement Date"  # same id: the same prompt template as the full example
    ex, kind, _ = focus_example(_ex("Governing law is Delaware.", CTX))
    assert (ex.context, ex.answer, kind) == ("Governing law is Delaware.", "Governing law is Delaware.", "whole")
    ex, kind, _ = focus_example(_ex("Delaware. Venue is", CTX))  # runs into the next sentence: clipped at its end
    assert (ex.context, ex.answer, kind) == ("Governing law is Delaware.", "Delaware.", "clipped")
    ex, kind, _ = focus_example(_ex("Delaware. Venue is", CTX), "paragraph")  # a paragraph holds it whole
    assert (ex.context, ex.answer, kind) == ("Governing law is Delaware. Venue is Wilmington.", "Delaware. Venue is",
                                             "inside")
    assert focus_example(_ex("NONE", CTX)) is None


def test_data_focus_writes_loadable_jsonl_train_and_valid_and_refuses_bad_input(tmp_path):
    """python -m data.focus: fit -> train, calib -> valid, NONE left out; the file loads as jsonl:FILE and every
    answer validates against its (one-sentence) context; a bad spec is one line, exit 1, nothing written."""
    from data import load_source
    from data.example import holdout
    from data.validate import validate

    rows = [{"id": f"e{i}", "query": "Agreement Date", "context": CTX,
             "answer": "March 21, 2005" if i % 3 else "NONE"} for i in range(24)]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "focus.jsonl"
    r = subprocess.run([sys.executable, "-m", "data.focus", f"jsonl:{src}", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    examples, _ = load_source(f"jsonl:{src}", "train")
    fit, calib = holdout(examples, "fit"), holdout(examples, "calib")
    got = [json.loads(x) for x in out.read_text().splitlines()]
    want_train = [e.id for e in fit if e.answer != "NONE"]
    want_valid = [e.id for e in calib if e.answer != "NONE"]
    assert want_train and want_valid
    assert [g["id"] for g in got if g["split"] == "train"] == want_train
    assert [g["id"] for g in got if g["split"] == "valid"] == want_valid
    for split in ("train", "valid"):
        loaded, notes = load_source(f"jsonl:{out}", split)
        ok, rep = validate(loaded, f"jsonl:{out}", notes)
        assert len(ok) == len(loaded) and rep.rejected == 0
        assert all(e.answer == "March 21, 2005" and e.context.endswith("Beta.") for e in ok)
    assert "fit -> train" in r.stderr and "NONE" in r.stderr

    bad = subprocess.run([sys.executable, "-m", "data.focus", f"jsonl:{tmp_path / 'missing.jsonl'}", "--out",
                          str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "missing.jsonl" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_data_focus_refuses_splits_that_share_examples(tmp_path, capsys):
    """train is fit and calib together: asked for both, every example would be written twice (and the jsonl
    loader then refuses the file). One line naming the two, exit 1, nothing written."""
    from data.focus import main

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"e{i}", "query": "Agreement Date", "context": CTX,
                                       "answer": "March 21, 2005"}) + "\n" for i in range(8)))
    out = tmp_path / "focus.jsonl"
    for a, b in (("train", "calib"), ("fit", "train")):
        assert main([f"jsonl:{src}", "--split", a, "--split", b, "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--split {a} and --split {b} share examples" in err and "pass one" in err
        assert not out.exists()
    assert main([f"jsonl:{src}", "--split", "fit", "--split", "calib", "--split", "fit", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 8  # disjoint splits (a repeated one read once): each example once


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Two random adapters (r 4) for the tiny model, saved in PEFT's layout, and one of another rank."""
    from model import apply_lora, load_model, save_adapter

    root = tmp_path_factory.mktemp("adapters")
    for name, seed, r in (("main", 1, 4), ("focus", 2, 4), ("r8", 3, 8)):
        torch.manual_seed(seed)
        m = apply_lora(load_model(str(tiny_model_dir)), r=r, alpha=2 * r if name != "focus" else 3 * r)
        randomize_adapters(m)
        save_adapter(m, root / name, base_model=str(tiny_model_dir))
    return root


def _logits(model):
    x = torch.tensor([[1, 5, 9, 33, 70, 101, 7]])
    with torch.no_grad():
        return model(x).float()


def test_adapter_bank_switches_to_exactly_each_adapter_loaded_alone(tiny_model_dir, two_adapters):  # noqa: F811
    from model import load_adapter, load_model
    from model.adapter import AdapterBank

    alone = {n: _logits(load_adapter(load_model(str(tiny_model_dir)), two_adapters / n)) for n in ("main", "focus")}
    alone["base"] = _logits(load_model(str(tiny_model_dir)))
    assert (alone["main"] - alone["focus"]).abs().max() > 1e-2  # the two adapters differ (alpha too)

    model = load_adapter(load_model(str(tiny_model_dir)), two_adapters / "main")
    bank = AdapterBank(model).add("focus", two_adapters / "focus")
    assert bank.active == "main"
    torch.testing.assert_close(_logits(model), alone["main"], rtol=0, atol=0)
    with bank.using("focus"):
        torch.testing.assert_close(_logits(model), alone["focus"], rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), alone["main"], rtol=0, atol=0)  # restored after the block

    bare = load_model(str(tiny_model_dir))  # no adapter of its own: "base" is the model as it was
    bank = AdapterBank(bare).add("focus", two_adapters / "focus")
    assert bank.active == "base"
    torch.testing.assert_close(_logits(bare), alone["base"], rtol=0, atol=0)
    bank.use("focus")
    torch.testing.assert_close(_logits(bare), alone["focus"], rtol=0, atol=0)
    with pytest.raises(KeyError, match="main"):
        bank.use("main")

    other = load_adapter(load_model(str(tiny_model_dir)), two_adapters / "main")
    with pytest.raises(ValueError, match=r"r=8 .* r=4"):
        AdapterBank(other).add("focus", two_adapters / "r8")


def test_channel_answer_focus_quotes_the_part_it_returns_or_the_whole_unit(monkeypatch):
    """The focus callable sees the chosen unit's text; its span becomes the answer, None keeps the unit whole."""
    import model.channel as ch

    ctx = "Alpha one. The date is May 1, 2020 here.\n\nOther text."
    # scores for the three sentences, then CHANNEL_NULL: the second sentence wins
    monkeypatch.setattr(ch, "channel_scores", lambda model, tok, texts, query: [0.0, 5.0, 1.0, -9.0])

    class Tok:
        def encode(self, s):
            return [1, 2]

    seen = []

    def focus(text):
        seen.append(text)
        i = text.index("May")
        return i, i + len("May 1, 2020")

    ans = ch.channel_answer(None, Tok(), "Date", ctx, unit="sentence", focus=focus)
    assert seen == ["The date is May 1, 2020 here."]
    assert ans.text == "May 1, 2020" == ctx[ans.start:ans.end]
    assert ans.detail["focus"] == [ans.start, ans.end] and ans.detail["best"] == [11, 40]
    whole = ch.channel_answer(None, Tok(), "Date", ctx, unit="sentence", focus=lambda t: None)
    assert whole.text == "The date is May 1, 2020 here." and whole.detail["focus"] is None
    with pytest.raises(AssertionError, match="outside its unit"):
        ch.channel_answer(None, Tok(), "Date", ctx, unit="sentence", focus=lambda t: (0, len(t) + 1))


def _eval_rows(tmp_path):
    paras = ["The Licensee shall pay royalties. Payment is quarterly.", "This Agreement is governed by Delaware law. "
             "Venue is Wilmington.", "Either party may terminate. Notice is thirty days."]
    rows = [{"id": f"t{i}", "split": "test", "query": q, "context": "\n\n".join(paras[i:] + paras[:i]),
             "answer": a} for i, (q, a) in enumerate([("Governing Law", "Delaware law"), ("Royalty", "royalties"),
                                                      ("Termination", "Either party may terminate.")])]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, data


def test_evaluate_focus_adapter_equals_the_focus_adapter_run_alone_on_the_chosen_sentence(
        tiny_model_dir, two_adapters, tmp_path, capsys):  # noqa: F811
    """engine.evaluate --decode channel --channel-unit sentence --focus-adapter: the channel scores are those of
    the run without it (the channel adapter is back after every focus call), and each quote is what the focus
    adapter, loaded alone, copies out of the chosen sentence with the example's own prompt; eval.json names it."""
    from data import load_source
    from engine.evaluate import main as evaluate
    from data.example import render_prompt
    from model import load_adapter, load_model, load_tokenizer
    from model.generate import decode_span

    rows, data = _eval_rows(tmp_path)
    common = ["--model", str(tiny_model_dir), "--adapter", str(two_adapters / "main"), "--data", f"jsonl:{data}",
              "--split", "test", "--decode", "channel", "--channel-unit", "sentence", "--precision", "fp32",
              "--max-new-tokens", "24", "--quiet"]
    assert evaluate(common + ["--out", str(tmp_path / "plain")]) == 0
    assert evaluate(common + ["--focus-adapter", str(two_adapters / "focus"), "--out", str(tmp_path / "f")]) == 0
    plain, focused = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("plain", "f"))
    assert plain["focus_adapter"] is None and focused["focus_adapter"] == str(two_adapters / "focus")

    alone = load_adapter(load_model(str(tiny_model_dir)), two_adapters / "focus").eval()
    tok = load_tokenizer(str(tiny_model_dir))
    examples = {e.id: e for e in load_source(f"jsonl:{data}", "test")[0]}
    trimmed = 0
    for p, f in zip(plain["rows"], focused["rows"]):
        assert f["channel"]["scores"] == p["channel"]["scores"] and f["channel"]["best"] == p["channel"]["best"]
        if p["prediction"] == "NONE":
            assert f["prediction"] == "NONE"
            continue
        ex = examples[f["id"]]
        a, b = p["channel"]["best"]
        with torch.no_grad():
            want = decode_span(alone, tok, render_prompt(replace(ex, context=ex.context[a:b])), ex.context[a:b],
                               max_new_tokens=24)
        if want.start is None:
            assert f["channel"]["focus"] is None and f["prediction"] == p["prediction"]
        else:
            assert f["channel"]["focus"] == [a + want.start, a + want.end] == [f["start"], f["end"]]
            assert f["prediction"] == ex.context[f["start"]:f["end"]] == want.text
            trimmed += f["prediction"] != p["prediction"]
    assert trimmed, "no quote was trimmed: the test did not exercise the focus stage"

    capsys.readouterr()
    assert evaluate(["--model", str(tiny_model_dir), "--data", f"jsonl:{data}", "--split", "test", "--focus-adapter",
                     str(two_adapters / "focus"), "--out", str(tmp_path / "x"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--decode channel" in err
    assert evaluate(common + ["--focus-adapter", str(two_adapters / "r8"), "--out", str(tmp_path / "y")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "r=8" in err and "--lora-r" in err


def test_extract_focus_adapter_trims_the_channel_quote(tiny_model_dir, two_adapters, tmp_path, capsys):  # noqa: F811
    """engine.extract --decode channel --focus-adapter: the quote is the focus adapter's copy out of the sentence
    the channel decoder chose (computed here with the focus adapter alone), a slice of the file."""
    from engine.extract import main as extract
    from data.example import Example, render_prompt
    from model import load_adapter, load_model, load_tokenizer
    from model.generate import decode_span

    rows, _ = _eval_rows(tmp_path)
    contract = tmp_path / "c.txt"
    contract.write_text(rows[0]["context"])
    common = ["--model", str(tiny_model_dir), "--adapter", str(two_adapters / "main"), "--contract", str(contract),
              "--clause", "Governing Law", "--decode", "channel", "--channel-unit", "sentence", "--precision", "fp32",
              "--max-new-tokens", "24", "--json", "--quiet"]
    assert extract(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert extract(common + ["--focus-adapter", str(two_adapters / "focus")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert plain["found"]
    text = contract.read_text()
    a, b = plain["start"], plain["end"]
    alone = load_adapter(load_model(str(tiny_model_dir)), two_adapters / "focus").eval()
    asked = Example(id="extract:Governing Law", source="extract", category="Governing Law", query="Governing Law",
                    context=text[a:b], answer="", split="test")
    with torch.no_grad():
        want = decode_span(alone, load_tokenizer(str(tiny_model_dir)), render_prompt(asked), text[a:b],
                           max_new_tokens=24)
    assert want.start is not None, "the focus adapter answered NONE: the test did not exercise the focus stage"
    assert (got["start"], got["end"]) == (a + want.start, a + want.end)
    assert got["text"] == text[got["start"]:got["end"]] == want.text


def test_focus_examples_of_real_cuad_are_sentences_holding_their_answers(shared_datasets):
    """On CUAD's validated valid split: each focus example's context is one sentence of the original context
    (model.channel.sentences), or a run of them after one of fewer than MIN_UNIT_WORDS words, it holds its answer,
    the answer is the original one or a prefix of it (clipped), and every example is counted once; most CUAD spans
    are a whole sentence or inside one."""
    import re

    from data import load_source
    from data.focus import MIN_UNIT_WORDS, focus_examples
    from data.validate import validate
    from model.channel import sentences

    spec = f"cuad:{shared_datasets / 'cuad'}"
    loaded, notes = load_source(spec, "valid")
    examples, _ = validate(loaded, spec, notes)
    focus, c = focus_examples(examples)
    assert c.examples == len(examples) == c.none + c.whole + c.inside + c.clipped + c.unplaced
    assert len(focus) == c.whole + c.inside + c.clipped and c.none > 0 and c.unplaced == 0
    assert (c.whole + c.inside) / len(focus) > 0.8
    by_id = {e.id: e for e in examples}
    joined = 0
    for f in focus:
        ex = by_id[f.id]
        spans = sentences(ex.context)
        ends = {b: j for j, (_, b) in enumerate(spans)}
        runs = [(i, ends[a + len(f.context)]) for i, (a, _) in enumerate(spans)
                if ex.context.startswith(f.context, a) and a + len(f.context) in ends]
        assert runs, f.id  # sentences i..j of the original context
        i, j = runs[0]
        start = spans[i][0]  # each sentence joined on was needed: the text before it had too few words
        assert all(len(re.findall(r"\w+", ex.context[start:spans[k][1]])) < MIN_UNIT_WORDS for k in range(i, j))
        joined += j > i
        assert f.answer in f.context and ex.answer.strip().startswith(f.answer)
    assert joined == c.joined


def test_data_focus_names_a_file_in_the_way_of_its_out_directory(tmp_path, capsys):
    """--out under a path whose parent is a file: one line naming it, not '[Errno 17] File exists'."""
    from data.focus import main

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"e{i}", "query": "Agreement Date", "context": CTX,
                                       "answer": "March 21, 2005", "split": "train"}) + "\n" for i in range(4)))
    (tmp_path / "blocker").write_text("x")
    assert main([f"jsonl:{src}", "--split", "train", "--out", str(tmp_path / "blocker" / "f.jsonl")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "blocker" in err and "Errno" not in err, err
