"""engine.evaluate end to end on a tiny random Llama with a byte-level ChatML tokenizer built here."""
import json
import re
from pathlib import Path

import pytest

from tests.conftest import save_tiny_hf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(model_dir: Path) -> Path:
    """A 259-token byte-level BPE (no merges: one token per byte) with ChatML specials 256-258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tk.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return model_dir


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """HF-format tiny Llama (vocab 320 > 259 tokenizer ids) + the byte tokenizer: loads via load_model(path)."""
    save_tiny_hf(path, seed=seed, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    return write_byte_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _examples():
    from data.example import NONE, Example

    rows = []
    for i in range(6):
        cat = ["Governing Law", "Term", "Audit Rights"][i % 3]
        clause = f"Clause {i}: the party shall do thing {i}."
        ctx = f"Preamble {i}. " + (clause if i % 2 == 0 else "Nothing relevant here.") + " Signatures."
        rows.append(Example(id=f"t{i}", source="jsonl", category=cat, query=cat, context=ctx,
                            answer=clause if i % 2 == 0 else NONE, split="test"))
    return rows


def test_eval_subset_is_deterministic_and_covers_categories():
    from data.example import Example
    from engine.evaluate import eval_subset

    exs = [Example(id=f"e{i}", source="s", category="A" if i < 20 else ("B" if i < 22 else "C"), query="q",
                   context="c", answer="a", split="test") for i in range(25)]
    sub = eval_subset(exs, 6)
    assert sub == eval_subset(list(exs), 6)  # same every time
    assert {e.category for e in sub} == {"A", "B", "C"}  # not the first six (all "A")
    assert sum(e.category == "B" for e in sub) == 2 and sum(e.category == "C" for e in sub) == 2
    assert [e.id for e in sub] == sorted((e.id for e in sub), key=lambda s: int(s[1:]))  # input order kept
    assert eval_subset(exs, None) == exs and eval_subset(exs, 99) == exs


def test_evaluate_examples_rows_and_training_numbers(tiny_model_dir):
    from data.example import render_prompt
    from engine.evaluate import evaluate_examples, evaluate_for_training, eval_subset
    from model import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    model.train()
    exs = _examples()
    res = evaluate_examples(model, tok, exs, max_new_tokens=4, seq_len=512)
    assert model.training  # restored for the trainer
    assert len(res["rows"]) == 6 and set(res["by_category"]) == {"clause", "none"}  # the two kinds apart here too
    assert set(res["by_category"]["clause"]) | set(res["by_category"]["none"]) == {"Governing Law", "Term",
                                                                                    "Audit Rights"}
    assert res["clause"]["n"] == 3 and res["none"]["n"] == 3  # the two kinds apart
    for r, ex in zip(res["rows"], exs):
        assert set(r) >= {"id", "category", "source", "prediction", "answer", "scores", "start", "end", "windows"}
        assert set(r["scores"]) == {"similarity", "exact_match", "f1", "abstention", "verbatim", "right_start"}
        # constrained decoding (the default): NONE or an exact slice of the context, with its offsets
        assert r["prediction"] == "NONE" or ex.context[r["start"]:r["end"]] == r["prediction"]
        assert r["windows"] == 1
        assert r["prompt_tokens"] == len(tok.encode(tok.chat_prompt(render_prompt(ex))))
    assert res["overall"]["verbatim"] in (None, 100.0)
    flat = evaluate_for_training(model, tok, eval_subset(exs, 3), max_new_tokens=2, seq_len=512)
    assert flat["eval_n"] == 3 and 0 <= flat["eval_avg_similarity"] <= 100 and flat["eval_seconds"] > 0
    assert "eval_clause_avg_similarity" in flat and "eval_none_predicted_none" in flat


def _long_example(answer=None):
    from data.example import Example

    clause = "The Supplier shall indemnify the Buyer against all third-party claims."
    ctx = " ".join(f"Filler sentence number {i}." for i in range(60)) + " " + clause + " " + \
        " ".join(f"More filler {i}." for i in range(60))
    return Example(id="long", source="jsonl", category="Indemnity", query="Indemnity", context=ctx,
                   answer=clause if answer is None else answer, split="test")


def test_long_context_is_read_in_windows_that_never_depend_on_the_answer(tiny_model_dir):
    from data.example import NONE, render_prompt
    from engine.evaluate import evaluate_examples, prompt_windows
    from model import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))  # one token per byte
    ex = _long_example()
    windows = prompt_windows(tok, ex, 600)
    assert len(windows) > 2 and windows[0][0] == 0 and windows[-1][1] == len(ex.context)
    assert all(windows[i][0] < windows[i + 1][0] < windows[i][1] for i in range(len(windows) - 1))  # overlapping
    for a, b in windows:
        prompt = render_prompt(ex.__class__(**{**ex.__dict__, "context": ex.context[a:b]}))
        assert len(tok.encode(tok.chat_prompt(prompt))) <= 600
    # the gold answer plays no part: a NONE answer or another clause gives the very same windows
    assert prompt_windows(tok, _long_example(NONE), 600) == windows
    assert prompt_windows(tok, _long_example("More filler 3."), 600) == windows
    assert prompt_windows(tok, ex, 100_000) == [(0, len(ex.context))]
    model = load_model(str(tiny_model_dir))
    row = evaluate_examples(model, tok, [ex], max_new_tokens=8, seq_len=608)["rows"][0]
    assert row["windows"] == len(windows)
    assert row["prediction"] == "NONE" or ex.context[row["start"]:row["end"]] == row["prediction"]


def _write_jsonl(path: Path) -> str:
    """A tiny dataset in the jsonl: source format (one Example's fields per line)."""
    import dataclasses

    path.write_text("".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in _examples()))
    return f"jsonl:{path}"


def test_evaluate_cli_writes_eval_json_report_and_compare(tiny_model_dir, tmp_path, capsys):
    from engine.evaluate import main
    from engine.metrics import AGGREGATE_KEYS

    spec = _write_jsonl(tmp_path / "tiny.jsonl")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 4)))
    common = ["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--max-new-tokens", "3",
              "--seq-len", "512", "--batch-size", "4", "--quiet"]
    assert main(common + ["--limit", "4", "--precision", "fp32", "--out", str(tmp_path / "before")]) == 0
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "after"), "--metrics", str(metrics),
                          "--compare", str(tmp_path / "before" / "eval.json")]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert "| examples | metric | before | after | change |" in out and "| all | examples | 4 | 6 |" in out
    # 4 examples against 6: said before the model loads, and in the report
    assert "the baseline scored 4 examples and this run 6, 4 of them the same" in printed.err
    assert "clause examples (3)" in out and "NONE examples (3)" in out  # the headline, two kinds apart
    assert "similarity on clause examples, before and after" in out and "similarity  before" in out  # histogram

    ev = json.loads((tmp_path / "after" / "eval.json").read_text())
    for key in ("model", "adapter", "data", "split", "limit", "seconds", "created", "definitions",
                "overall", "clause", "none", "by_category", "by_source", "rows"):
        assert key in ev, key
    assert set(ev["overall"]) == set(AGGREGATE_KEYS) and ev["overall"]["n"] == 6
    assert set(ev["by_source"]["clause"]) == set(ev["by_source"]["none"]) == {"jsonl"}
    before = json.loads((tmp_path / "before" / "eval.json").read_text())
    assert before["overall"]["n"] == 4 and before["dtype"] == "float32"  # --precision fp32 honoured and recorded
    assert "answering in float32" in (tmp_path / "before" / "report.md").read_text()

    md = (tmp_path / "after" / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "loss.png" in images and "similarity_hist.png" in images
    assert all((tmp_path / "after" / name).is_file() for name in images)
    assert "## Before / after" in md and "**Not like for like**" in md

    # python -m engine.report: the same lines from the stored files, no model loaded
    from engine.report import main as report

    assert report([str(tmp_path / "after" / "eval.json"), "--compare", str(tmp_path / "before" / "eval.json")]) == 0
    again = capsys.readouterr()
    assert again.out.splitlines()[1:] == out.splitlines()[1:-1]  # all but evaluate's timing and "wrote" lines
    assert "4 of them the same" in again.err
    assert report([str(tmp_path / "after" / "eval.json"), "--compare", str(tmp_path / "after" / "eval.json"),
                   "--out", str(tmp_path / "re"), "--metrics", str(metrics)]) == 0
    again = capsys.readouterr()
    assert again.err == "" and "| all | examples | 6 | 6 |" in again.out
    md = (tmp_path / "re" / "report.md").read_text()
    assert "## Before / after" in md and "Not like for like" not in md and "loss.png" in md
    assert not (tmp_path / "re" / "eval.json").exists()  # the report only; the eval.json stays where it was
    (tmp_path / "plain.json").write_text('{"overall": {"n": 1}, "rows": []}')
    partial = json.loads((tmp_path / "after" / "eval.json").read_text())
    del partial["none"]["avg_similarity"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    for bad, named in ((tmp_path / "nope.json", "run eval.json not found (engine.evaluate --out DIR writes"),
                       (tmp_path / "plain.json", "'clause'"), (tmp_path / "partial.json", "complete 'none'"),
                       (tmp_path / "after" / "report.md", "malformed JSON")):
        assert report([str(bad), "--out", str(tmp_path / "bad")]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and str(bad) in err and named in err, err
    assert not (tmp_path / "bad").exists()
    assert report([str(tmp_path / "after" / "eval.json"), "--metrics", str(metrics)]) != 0  # nowhere to draw it
    assert "pass --out" in capsys.readouterr().err
    other = json.loads((tmp_path / "after" / "eval.json").read_text()) | {"split": "valid"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert report([str(tmp_path / "after" / "eval.json"), "--compare", str(tmp_path / "other.json")]) == 0
    assert "the baseline ran on split 'valid' and this run on 'test'" in capsys.readouterr().err


def test_evaluate_cli_errors_are_one_line(tmp_path, capsys):
    from engine.evaluate import main

    assert main(["--data", "jsonl:" + str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "missing.jsonl" in err
    assert main(["--data", "synthetic", "--compare", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "nope.json" in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def _cut_after(n: int):
    """A decode_span that copies its window's first n characters and says it stopped at max_new_tokens (answers
    to odd-numbered examples end properly instead)."""
    from model.generate import Answer

    def decode_span(model, tok, prompt, ctx, max_new_tokens=1024, **kw):
        cut = "Preamble 1." not in ctx and "Preamble 3." not in ctx and "Preamble 5." not in ctx
        return Answer(ctx[:n], 0, n, -0.5, max_new_tokens, 1, truncated=cut)
    return decode_span


def test_answers_cut_at_max_new_tokens_are_counted_in_rows_summary_and_report(tiny_model_dir, tmp_path, capsys,
                                                                             monkeypatch):
    import engine.evaluate
    from engine.evaluate import main
    from model.generate import Answer

    monkeypatch.setattr(engine.evaluate, "decode_span", _cut_after(8))
    spec = _write_jsonl(tmp_path / "tiny.jsonl")
    assert main(["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--max-new-tokens", "3",
                 "--seq-len", "512", "--quiet", "--out", str(tmp_path / "o")]) == 0
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert [r["truncated"] for r in ev["rows"]] == [True, False, True, False, True, False]
    assert ev["truncated"] == 3
    assert "3 answers cut at --max-new-tokens" in (tmp_path / "o" / "report.md").read_text()
    assert "3 answer(s) cut at --max-new-tokens 3" in capsys.readouterr().err
    monkeypatch.setattr(engine.evaluate, "decode_span", lambda *a, **k: Answer("NONE", None, None, -0.1, 1, 1))
    assert main(["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--quiet", "--out",
                 str(tmp_path / "none")]) == 0
    assert json.loads((tmp_path / "none" / "eval.json").read_text())["truncated"] == 0
    assert "cut at --max-new-tokens" not in (tmp_path / "none" / "report.md").read_text()
    assert "cut at" not in capsys.readouterr().err


def test_a_focus_copy_cut_at_max_new_tokens_marks_the_channel_answer(tiny_model_dir, monkeypatch):
    """--decode channel quotes a unit whole, never cut; with a focus stage, the trim is a copy that can reach
    max_new_tokens, and then the row says so."""
    import engine.evaluate
    from engine.evaluate import evaluate_examples
    from model import load_model, load_tokenizer
    from model.channel import ChannelRule

    def focuser(model, tok, bank, ex, max_new_tokens):
        def focus(text):
            focus.truncated = ex.id == "t0"  # the first example's copy ran out of tokens
            return 0, 4
        focus.truncated = False
        return focus
    monkeypatch.setattr(engine.evaluate, "focuser", focuser)
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    quote = ChannelRule(weights={"gain": 0.0}, bias=1.0)  # always quotes: the focus stage always runs
    res = evaluate_examples(model, tok, _examples()[:3], max_new_tokens=4, seq_len=512, decode="channel",
                            rule=quote, focus=object())
    assert [r["truncated"] for r in res["rows"]] == [True, False, False] and res["truncated"] == 1
    assert all(r["end"] - r["start"] == 4 for r in res["rows"])  # the trims' quotes
    res = evaluate_examples(model, tok, _examples()[:3], max_new_tokens=4, seq_len=512, decode="channel",
                            rule=ChannelRule(weights={"gain": 0.0}, bias=-1.0), focus=object())
    assert res["truncated"] == 0  # NONE everywhere: no trim, nothing cut


def test_channel_windows_keep_no_room_for_an_answer_it_never_generates(tiny_model_dir, tmp_path):
    """--decode channel generates nothing after a window's prompt: --max-new-tokens does not shrink its windows
    (engine.extract.answer_budget) and a --seq-len below it is no error; other decoders still need the room."""
    from engine.evaluate import evaluate_examples, main
    from model import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    ex = _long_example()
    wide = evaluate_examples(model, tok, [ex], max_new_tokens=400, seq_len=608, decode="channel")["rows"][0]
    assert wide["windows"] == evaluate_examples(model, tok, [ex], max_new_tokens=1, seq_len=608,
                                                decode="channel")["rows"][0]["windows"]
    spec = _write_jsonl(tmp_path / "tiny.jsonl")
    common = ["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--limit", "2", "--quiet",
              "--seq-len", "400", "--max-new-tokens", "384"]
    assert main([*common, "--decode", "channel", "--out", str(tmp_path / "ch")]) == 0
    assert main([*common, "--decode", "constrained", "--out", str(tmp_path / "co")]) == 1
    assert not (tmp_path / "co").exists()


def test_channel_windows_keep_room_for_a_focus_stage_only():
    """Channel decoding generates nothing after a window, but a --focus-adapter copies from the unit it chose
    (up to a whole window) in a prompt of its own, which needs --max-new-tokens of room as other decoders do."""
    from engine.evaluate import answer_budget

    assert answer_budget("channel", 300) == 0
    assert answer_budget("channel", 300, focus=True) == answer_budget("constrained", 300) == 300



def test_a_wrong_focus_adapter_is_one_line_naming_it_before_the_data_loads(tmp_path, capsys):
    from engine.evaluate import main

    assert main(["--data", "jsonl:" + str(tmp_path / "missing.jsonl"), "--decode", "channel", "--focus-adapter",
                 str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert "--focus-adapter must be a PEFT adapter directory" in err and str(tmp_path / "nope") in err
    assert "missing.jsonl" not in err and not (tmp_path / "o").exists()  # the data was not read yet


def test_evaluate_says_and_records_when_the_adapter_trained_on_the_split_it_scores(tiny_model_dir, tmp_path, capsys):
    """An adapter whose run (its config.json) trained on the data and a split holding the one scored: a warning
    line (not a refusal: hard-negative mining scores the training split on purpose), eval.json's not_held_out and
    adapter_trained_on, and a line in report.md. The data spelled two ways is one data."""
    import dataclasses

    from engine.evaluate import main
    from model import apply_lora, load_model, save_adapter

    rows = [dataclasses.asdict(e) for e in _examples()]
    rows += [{**r, "id": "r" + r["id"], "split": "train"} for r in rows]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "x").mkdir()
    adapter = save_adapter(apply_lora(load_model(str(tiny_model_dir)), r=2), tmp_path / "run" / "adapter",
                           base_model=str(tiny_model_dir))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": f"jsonl:{tmp_path}/x/../d.jsonl",
                                                              "train_split": "train"}))
    common = ["--adapter", str(adapter), "--data", f"jsonl:{data}", "--max-new-tokens", "3", "--seq-len", "512",
              "--quiet"]
    assert main(common + ["--split", "calib", "--out", str(tmp_path / "calib")]) == 0  # calib is part of train
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if "not held out" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert f"--adapter {adapter} trained on split 'train'" in warnings[0] and "'calib' split" in warnings[0]
    ev = json.loads((tmp_path / "calib" / "eval.json").read_text())
    assert ev["adapter_trained_on"] == {"config": str(tmp_path / "run" / "config.json"),
                                        "data": f"jsonl:{tmp_path}/x/../d.jsonl", "split": "train"}
    assert len(ev["not_held_out"]) == 1 and ev["not_held_out"][0] in warnings[0]
    assert f"- **not held out**: {ev['not_held_out'][0]}" in (tmp_path / "calib" / "report.md").read_text()

    assert main(common + ["--split", "test", "--out", str(tmp_path / "test")]) == 0  # held out: nothing said
    assert "not held out" not in capsys.readouterr().err
    ev = json.loads((tmp_path / "test" / "eval.json").read_text())
    assert ev["not_held_out"] == [] and ev["adapter_trained_on"]["split"] == "train"
    assert "not held out" not in (tmp_path / "test" / "report.md").read_text()


def test_a_full_disk_at_the_end_still_shows_the_results(tiny_model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The files could not be written after the whole evaluation (hours for a 3B): the figures are printed before
    the one-line error instead of being lost with them."""
    import engine.evaluate
    from engine.evaluate import main
    from tests.test_bad_input import _eval_args, enospc

    monkeypatch.setattr(engine.evaluate, "write_report", enospc)
    assert main(_eval_args(tiny_model_dir, tmp_path)) != 0
    cap = capsys.readouterr()
    assert "clause examples" in cap.out and cap.err.startswith("error:") and "No space left on device" in cap.err
    assert not (tmp_path / "o").exists()
