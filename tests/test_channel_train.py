"""engine.channel_train: the listwise channel loss, its groups, and a short run end to end on a tiny model."""
import json
import random

import pytest
import torch

from tests.test_calibrate import _paragraph_data
from tests.test_evaluate import tiny_model_dir  # noqa: F401  (the module-scoped fixture)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):  # noqa: F811
    from model import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _example(answer, context="Alpha clause text.\n\nBeta clause here.\n\nGamma: the last one."):
    from data.example import Example

    return Example(id="x", source="jsonl", category="q", query="Governing Law", context=context, answer=answer,
                   split="train")


def test_choice_of_finds_the_paragraph_holding_the_answer_or_null():
    from engine.channel_train import choice_of
    from model.channel import CHANNEL_NULL

    texts, gold = choice_of(_example("Beta clause here."))
    assert texts == ["Alpha clause text.", "Beta clause here.", "Gamma: the last one.", CHANNEL_NULL] and gold == 1
    assert choice_of(_example("the last one"))[1] == 2  # a span inside a paragraph: that paragraph
    assert choice_of(_example("NONE"))[1] == 3  # NONE: the empty clause, last
    assert choice_of(_example("text.\n\nBeta")) is None  # across two paragraphs: the decoder cannot quote it


def test_choice_of_with_sentence_units_takes_the_sentence_the_answer_begins_in():
    from engine.channel_train import choice_of
    from model.channel import CHANNEL_NULL

    ctx = "Alpha one. Alpha two.\n\nBeta starts here. It goes on. Beta ends.\n\nGamma."
    texts, gold = choice_of(_example("It goes on.", ctx), "sentence")
    assert texts == ["Alpha one.", "Alpha two.", "Beta starts here.", "It goes on.", "Beta ends.", "Gamma.",
                     CHANNEL_NULL] and gold == 3
    assert choice_of(_example("here. It goes on. Beta", ctx), "sentence")[1] == 2  # over three: where it begins
    assert choice_of(_example("NONE", ctx), "sentence")[1] == 6
    assert choice_of(_example("two.\n\nBeta", ctx), "sentence")[1] == 1  # even across paragraphs
    assert choice_of(_example("here. It goes on.", ctx)) == (["Alpha one. Alpha two.",
                                                              "Beta starts here. It goes on. Beta ends.", "Gamma.",
                                                              CHANNEL_NULL], 1)  # paragraphs, as before


def test_channel_loss_is_cross_entropy_over_independent_full_forward_scores(tiny):
    """ChannelLoss on a group equals -log softmax(s)[gold], with each s_i computed row by row from the model's
    full logits (model(ids)), gradients included: lm_head's (its weight gradient in engine.loss's chunked
    LinearCrossEntropy) and the final norm's (through the hidden states' gradient, the path to every adapter),
    with one chunk of rows and with chunks of 3 rows."""
    from engine.channel_train import ChannelLoss, choice_of, make_group

    model, tok = tiny
    texts, gold = choice_of(_example("Beta clause here."))
    g = make_group(tok, _example("Beta clause here."), texts, gold, 8, 64, random.Random(0))
    assert g["labels"].shape == g["input_ids"].shape == (1, g["segment_ids"].shape[1])
    assert int(g["segment_ids"].max()) == 3  # three paragraphs and the null, packed in one row
    assert float(g["loss_weights"].sum()) == pytest.approx(1.0)
    model.requires_grad_(False)
    weights = [model.lm_head.weight, model.model.norm.weight]
    for w in weights:
        w.requires_grad_(True)
    losses, grads = [], []
    for chunk in (1024, 3):
        loss = ChannelLoss(model, chunk)(g["input_ids"], g["labels"], position_ids=g["position_ids"],
                                         segment_ids=g["segment_ids"], loss_weights=g["loss_weights"],
                                         choice=g["choice"])
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, weights))
    scores = []
    for i in range(4):  # each candidate alone, through the model's full logits
        cols = (g["segment_ids"][0] == i).nonzero()[:, 0]
        ids, lab = g["input_ids"][0, cols], g["labels"][0, cols]
        logp = torch.log_softmax(model(ids[None])[0].float(), -1)
        scores.append(sum(logp[p - 1, lab[p]] for p in (lab != -100).nonzero()[:, 0].tolist()))
    ref = -torch.log_softmax(torch.stack(scores), 0)[g["choice"]]
    ref_grads = torch.autograd.grad(ref, weights)
    for w in weights:
        w.requires_grad_(False)
    assert all(float(gb.abs().max()) > 0 for gb in ref_grads)
    for loss, got in zip(losses, grads):
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        for ga, gb in zip(got, ref_grads):
            assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4)


def test_make_group_keeps_gold_caps_candidates_and_puts_null_last(tiny):
    from engine.channel_train import make_group
    from model.channel import CHANNEL_NULL

    _, tok = tiny
    texts = [f"Paragraph number {i}." for i in range(10)] + [CHANNEL_NULL]
    for seed in range(5):
        g = make_group(tok, _example("NONE"), texts, 3, 4, 64, random.Random(seed))
        seg, ids = g["segment_ids"][0], g["input_ids"][0]
        rows = [tok.decode(ids[seg == i].tolist()) for i in range(int(seg.max()) + 1)]
        assert len(rows) == 5 and CHANNEL_NULL in rows[-1]
        assert "Paragraph number 3." in rows[int(g["choice"])]
        g = make_group(tok, _example("NONE"), texts, 10, 4, 64, random.Random(seed))  # NONE: null is the gold
        assert int(g["segment_ids"].max()) == 4 and int(g["choice"]) == 4


def _mean_train_loss(model_dir, adapter, spec):
    """The mean ChannelLoss over every training example's full group (all paragraphs and the null)."""
    from data.validate import load_validated
    from engine.channel_train import ChannelLoss, choice_of, make_group
    from model import load_adapter, load_model, load_tokenizer

    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    if adapter:
        load_adapter(model, adapter)
    loss = ChannelLoss(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in load_validated(spec, "train")[0]:
            texts, gold = choice_of(ex)
            g = make_group(tok, ex, texts, gold, 8, 768, random.Random(0))
            part = loss(g["input_ids"], g["labels"], position_ids=g["position_ids"], segment_ids=g["segment_ids"],
                        choice=g["choice"])
            total, n = total + float(part), n + 1
    return total / n


def test_channel_train_run_writes_adapter_and_learns_the_choice(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """Steps on a small paragraph dataset lower the listwise loss of its examples (measured afresh, before and
    after, with the adapter read back from disk); metrics and checkpoints are written, and engine.evaluate
    --decode channel reads the adapter."""
    from engine.channel_train import main
    from engine.evaluate import main as evaluate

    spec = _paragraph_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--data", spec, "--eval-split", "test", "--out", str(out),
            "--max-steps", "16", "--groups-per-step", "8", "--lr", "3e-3", "--warmup-steps", "1",
            "--quantize", "none", "--eval-every", "16", "--save-every", "8", "--threads", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err  # the ledger at the longest row the data makes (data.check --channel's)
    from data.check import channel_stats
    from data.validate import load_validated
    from model import load_tokenizer

    ch = channel_stats(load_validated(spec, "train")[0], load_tokenizer(str(tiny_model_dir)), "paragraph", 8, 768)
    assert f"memory ledger at this data's longest row, {ch['max']} tokens, with the most query tokens of any row, " \
           f"{ch['max_supervised']} (an upper bound)" in err and "PREDICTED PEAK" in err, err[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert "eval_none_answered_none" in rows[-1] and "eval_none_answered_none" not in rows[0]
    before = _mean_train_loss(tiny_model_dir, None, spec)
    after = _mean_train_loss(tiny_model_dir, out / "adapter", spec)
    assert after < 0.8 * before, (before, after)
    assert (out / "checkpoints" / "step-8" / "adapter" / "adapter_model.safetensors").is_file()
    kept = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "config.json", "adapter/adapter_model.safetensors")}
    capsys.readouterr()
    assert main(argv) != 0 and "--overwrite" in capsys.readouterr().err  # an earlier run is not replaced silently
    assert {f: (out / f).read_bytes() for f in kept} == kept  # ... nor touched
    assert evaluate(["--adapter", str(out / "adapter"), "--data", spec, "--split", "test", "--decode", "channel",
                     "--quiet", "--out", str(tmp_path / "ev")]) == 0
    # --init-adapter continues from a saved adapter: with a vanishing learning rate the weights written are the
    # ones read (a fresh LoRA starts with B = 0 and could not match); a missing adapter is a one-line error that
    # leaves no run directory behind
    from safetensors.torch import load_file

    cont = tmp_path / "cont"
    base = argv[argv.index("--eval-split"):argv.index("--max-steps")]
    common = ["--model", str(tiny_model_dir), "--data", spec, *base, "--max-steps", "1", "--groups-per-step", "2",
              "--lr", "1e-12", "--warmup-steps", "1", "--quantize", "none", "--threads", "1", "--seed", "1"]
    assert main([*common, "--out", str(cont), "--init-adapter", str(out / "adapter")]) == 0
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(cont / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # the run trained B away from zero
    capsys.readouterr()
    missing = tmp_path / "cont2"
    assert main([*common, "--out", str(missing), "--init-adapter", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "adapter_config.json" in err and not missing.exists()
    # a run that fails in its first step (out of GPU memory, most often) leaves no run behind: the same
    # command then runs without --overwrite
    from engine import step as step_mod

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    real = step_mod.TrainStep.__call__
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_mod.TrainStep, "__call__", oom)
        assert main([*common, "--out", str(missing)]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]  # one line: what lowers a channel step's peak
    assert err.startswith("error: out of GPU memory") and "--max-candidates" in err and "data.check" in err, err
    assert not missing.exists()
    assert step_mod.TrainStep.__call__ is real and main([*common, "--out", str(missing)]) == 0
    # that run kept no checkpoint (--save-every 0): a --resume would start over and write over its metrics
    before = (missing / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*common, "--out", str(missing), "--resume", "--max-steps", "2"]) != 0
    assert "no complete checkpoint to continue from" in capsys.readouterr().err
    assert (missing / "metrics.jsonl").read_bytes() == before


def test_two_process_channel_training_matches_one_process(tiny_model_dir, tmp_path):  # noqa: F811
    """Under torchrun (2 gloo processes, as launch.sh runs it) each rank takes every other example of the same
    seeded stream and DDP averages the gradients, so the steps, their losses and the adapter equal a 1-process
    run with the same --groups-per-step up to summation order (measured differences are ~1e-7)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from engine.channel_train import main
    from tests.conftest import REPO

    spec = _paragraph_data(tmp_path / "d.jsonl")
    args = ["--model", str(tiny_model_dir), "--data", spec, "--max-steps", "4", "--groups-per-step", "4",
            "--lr", "3e-3", "--warmup-steps", "1", "--quantize", "none", "--precision", "fp32", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "engine.channel_train", *args, "--out", str(tmp_path / "two")], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 processes)" in r.stderr
    m1, m2 = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two"))
    assert [x["step"] for x in m1] == [x["step"] for x in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        assert a["train_acc"] == b["train_acc"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) + 1e-7, (a, b)
    w1, w2 = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    # the loss curves above agree to ~1e-6; AdamW divides by sqrt(v) + eps, so a lora_A entry whose gradient is
    # ~0 moves by a rounding-sized step: measured worst 1.9e-4 on lora_A, 2e-6 on lora_B (which moved ~1e-2)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1 if "lora_B" in k) < 1e-5
    assert any(float(w1[k].abs().max()) > 1e-3 for k in w1 if "lora_B" in k)  # the adapters really trained
    assert main([*args, "--groups-per-step", "3", "--out", str(tmp_path / "three")]) == 0  # one process: any count


def test_evaluate_with_sentence_units_quotes_one_sentence_and_records_the_unit(tiny_model_dir, tmp_path,  # noqa: F811
                                                                               capsys):
    """engine.evaluate --decode channel --channel-unit sentence: every quote is one sentence of its context (the
    same command with paragraph units quotes whole paragraphs), eval.json says which unit; the flag without
    --decode channel is refused in one line."""
    from engine.evaluate import main as evaluate
    from model.channel import sentences

    paras = ["The Licensee shall pay royalties. Payment is quarterly.", "This Agreement is governed by Delaware law. "
             "Venue is Wilmington.", "Either party may terminate. Notice is thirty days."]
    rows = [{"id": f"t{i}", "split": "test", "query": "Governing Law", "context": "\n\n".join(paras[i:] + paras[:i]),
             "answer": "This Agreement is governed by Delaware law."} for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(tiny_model_dir), "--data", f"jsonl:{data}", "--split", "test", "--decode", "channel",
              "--precision", "fp32", "--quiet"]
    for unit in ("sentence", "paragraph"):
        assert evaluate(common + ["--channel-unit", unit, "--out", str(tmp_path / unit)]) == 0
        ev = json.loads((tmp_path / unit / "eval.json").read_text())
        assert ev["channel_unit"] == unit
        for r, row in zip(ev["rows"], rows):
            ctx = row["context"]
            quotable = [ctx[a:b] for a, b in sentences(ctx)] if unit == "sentence" else ctx.split("\n\n")
            assert r["prediction"] == "NONE" or r["prediction"] in quotable
            assert len(r["channel"]["scores"]) == len(quotable)
    capsys.readouterr()
    assert evaluate(common[:-5] + ["--channel-unit", "sentence", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--decode channel" in err


def test_candidate_order_takes_half_its_negatives_from_the_hardest():
    from engine.channel_train import candidate_order

    hard = [3, 7, 1, 9, 0, 2, 4, 5, 6, 8]  # likeliest first; 3 is the gold one below
    for seed in range(5):
        order = candidate_order(11, 3, 5, random.Random(seed), hard)
        assert order[-1] == 10 and len(order) == 6 and len(set(order)) == 6
        assert {3, 7, 1} <= set(order)  # the gold one and the two likeliest wrong ones (half of 4, rounded up)
        order = candidate_order(11, 10, 5, random.Random(seed), hard)  # NONE: the null is the gold one
        assert order[-1] == 10 and len(order) == 6 and {3, 7, 1} <= set(order)
        assert set(candidate_order(11, 3, 20, random.Random(seed), hard)[:-1]) == set(range(10))  # fewer: all
    plain = [candidate_order(11, 3, 5, random.Random(s)) for s in range(20)]
    assert not all({7, 1} <= set(o) for o in plain)  # sampled alone, the hardest ones are not always there
    for seed in range(5):  # --hard-share: 0 is the sampled control (the same draw), 1 takes the likeliest only
        assert candidate_order(11, 3, 5, random.Random(seed), hard, 0.0) == plain[seed]
        assert set(candidate_order(11, 3, 5, random.Random(seed), hard, 1.0)) == {3, 7, 1, 9, 0, 10}
        assert {3, 7, 1, 9} <= set(candidate_order(11, 3, 5, random.Random(seed), hard, 0.6))  # 2.4 -> 3 hardest
    many = list(range(30))  # 25 others x 0.28 is 7 in exact arithmetic (7.000000000000001 in floats)
    orders = [candidate_order(31, 29, 26, random.Random(s), many, 0.28) for s in range(50)]
    assert all(len(o) == 27 and set(o) >= set(range(7)) for o in orders)
    assert not all(7 in o for o in orders)  # the 8th likeliest is sampled like the rest, not taken as hard


def test_hard_share_out_of_range_is_one_line(tmp_path, capsys):
    from engine.channel_train import main

    for bad in ("1.5", "-0.1", "nan"):
        assert main(["--data", "synthetic", "--out", str(tmp_path / "o"), "--hard-negatives", "x.json",
                     "--hard-share", bad]) != 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--hard-share must be between 0 and 1" in err, err
        assert not (tmp_path / "o").exists()
    assert main(["--data", "synthetic", "--out", str(tmp_path / "o"), "--hard-share", "0"]) != 0  # nothing to rank
    assert "--hard-share needs --hard-negatives" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hard_negatives_from_an_eval_json_and_in_the_groups(tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                             monkeypatch):
    from data.validate import load_validated
    from engine.channel_train import _groups, build_parser, hard_negatives, main
    from engine.evaluate import main as evaluate
    from model import load_tokenizer
    from model.channel import units

    spec = _paragraph_data(tmp_path / "d.jsonl")
    common = ["--model", str(tiny_model_dir), "--data", spec, "--decode", "channel", "--precision", "fp32", "--quiet"]
    assert evaluate(common + ["--split", "train", "--out", str(tmp_path / "mine")]) == 0
    assert evaluate(common + ["--split", "test", "--out", str(tmp_path / "other")]) == 0
    mined = tmp_path / "mine" / "eval.json"
    examples = load_validated(spec, "train")[0]
    hard = hard_negatives(mined, examples, "paragraph")
    rows = {r["id"]: r["channel"]["scores"] for r in json.loads(mined.read_text())["rows"]}
    assert set(hard) == {ex.id for ex in examples}
    for ex in examples:
        scores = rows[ex.id]
        assert sorted(hard[ex.id]) == list(range(len(units(ex.context)))) == list(range(len(scores)))
        assert [scores[i] for i in hard[ex.id]] == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="--channel-unit sentence"):
        hard_negatives(mined, examples, "sentence")
    with pytest.raises(ValueError, match="no row matches"):
        hard_negatives(tmp_path / "other" / "eval.json", examples, "paragraph")
    with pytest.raises(FileNotFoundError, match="hard negatives eval.json not found .*--decode channel"):
        hard_negatives(tmp_path / "missing" / "eval.json", examples, "paragraph")  # not the baseline's advice

    # with two candidates per clause example, the other one is always its likeliest wrong paragraph
    import engine.channel_train

    seen = []
    monkeypatch.setattr(engine.channel_train, "_group", lambda tok, ex, texts, gold, order, n: seen.append(
        (ex.id, gold, order)))
    args = build_parser().parse_args(["--data", spec, "--out", str(tmp_path / "x"), "--max-candidates", "2",
                                      "--hard-negatives", str(mined)])
    stream = _groups(load_tokenizer(str(tiny_model_dir)), examples, args)
    for _ in range(2 * len(examples)):
        next(stream)
    monkeypatch.undo()
    clause = 0
    for ex_id, gold, order in seen:
        null = len(hard[ex_id])
        if gold != null:
            clause += 1
            assert order == [*order[:2], null] and set(order[:2]) == {gold, next(i for i in hard[ex_id] if i != gold)}
    assert clause == 2 * 5

    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--data", spec, "--out", str(out), "--max-steps", "2",
                 "--groups-per-step", "2", "--quantize", "none", "--threads", "1", "--hard-negatives", str(mined)]) == 0
    assert json.loads((out / "config.json").read_text())["hard_negatives"] == str(mined)
    assert "channel training on 8 of 8 train examples" in capsys.readouterr().err
    # only the examples the file holds are trained on
    rows = json.loads(mined.read_text())
    rows["rows"] = [r for r in rows["rows"] if r["id"] in ("train1", "train3")]
    (tmp_path / "two.json").write_text(json.dumps(rows))
    args = build_parser().parse_args(["--data", spec, "--out", str(tmp_path / "x"), "--hard-negatives",
                                      str(tmp_path / "two.json")])
    seen.clear()
    monkeypatch.setattr(engine.channel_train, "_group", lambda tok, ex, texts, gold, order, n: seen.append(ex.id))
    stream = _groups(load_tokenizer(str(tiny_model_dir)), examples, args)
    for _ in range(6):
        next(stream)
    assert sorted(set(seen)) == ["train1", "train3"]


def test_a_wrong_hard_negatives_file_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                                        monkeypatch):
    import engine.channel_train
    from engine.channel_train import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the bad file was noticed")

    monkeypatch.setattr(engine.channel_train, "load_model", no_model)
    spec = _paragraph_data(tmp_path / "d.jsonl")
    free = tmp_path / "free.json"
    free.write_text(json.dumps({"decode": "constrained", "overall": {}, "rows": []}))
    assert main(["--model", str(tiny_model_dir), "--data", spec, "--out", str(tmp_path / "o"),
                 "--hard-negatives", str(free)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--decode channel" in err, err
    assert not (tmp_path / "o").exists()


def test_an_earlier_run_is_refused_and_left_as_it_was(tmp_path, capsys):
    """An --out holding a run needs --resume or --overwrite; the refusal says so and touches nothing there."""
    from engine.channel_train import main

    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert main(["--data", "synthetic", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "holds an earlier run" in err and "--overwrite" in err and "--resume" in err, err
    assert {p.name for p in out.iterdir()} - {".lock"} == {"metrics.jsonl"}  # the run's lock file stays, by design


def test_an_adapter_trained_on_the_choice_is_read_with_channel_decoding_by_default(tiny_model_dir, tmp_path,  # noqa: F811
                                                                                  capsys):
    """engine.evaluate and engine.extract without --decode: an adapter from engine.channel_train (its run's
    config.json beside it) is read with --decode channel and the --unit it was trained with, and a note says so;
    --decode given wins; an engine.train adapter, or one without a run config, keeps constrained decoding;
    extract --clause all reads every category with channel decoding too."""
    import shutil

    from engine.channel_train import main as channel_train
    from engine.evaluate import main as evaluate
    from engine.extract import main as extract

    spec = _paragraph_data(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    assert channel_train(["--model", str(tiny_model_dir), "--data", spec, "--out", str(run), "--max-steps", "1",
                          "--groups-per-step", "2", "--unit", "sentence", "--quantize", "none", "--threads",
                          "1", "--save-every", "1"]) == 0
    token_run = tmp_path / "token_run"  # the same weights under an engine.train run's config
    shutil.copytree(run / "adapter", token_run / "adapter")
    (token_run / "config.json").write_text(json.dumps({"data": spec, "train_split": "train", "max_steps": 1}))
    common = ["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--limit", "2", "--precision",
              "fp32", "--max-new-tokens", "8", "--quiet"]
    bare = tmp_path / "bare" / "adapter"  # the same weights with no run config beside them (copied, downloaded)
    shutil.copytree(run / "adapter", bare)
    ckpt = run / "checkpoints" / "step-1" / "adapter"  # a checkpoint's adapter: the run config is 3 levels up
    assert ckpt.is_dir()
    cases = [(run / "adapter", [], "channel", "sentence", "note: --decode channel --channel-unit sentence"),
             (ckpt, [], "channel", "sentence", "note: --decode channel --channel-unit sentence"),
             (run / "adapter", ["--decode", "rank"], "rank", None, None),
             (run / "adapter", ["--decode", "channel", "--channel-unit", "paragraph"], "channel", "paragraph", None),
             (token_run / "adapter", [], "constrained", None, None),
             (bare, [], "constrained", None, "no run config.json beside")]
    for i, (adapter, flags, decode, unit, note) in enumerate(cases):
        capsys.readouterr()
        assert evaluate([*common, "--adapter", str(adapter), *flags, "--out", str(tmp_path / f"ev{i}")]) == 0
        ev = json.loads((tmp_path / f"ev{i}" / "eval.json").read_text())
        assert (ev["decode"], ev["channel_unit"]) == (decode, unit), (i, flags)
        err = capsys.readouterr().err
        assert (note in err) if note else ("note:" not in err), (i, err)
    # a baseline decoded otherwise: said before the model loads; --channel-unit without channel decoding: refused
    assert evaluate([*common, "--adapter", str(run / "adapter"), "--compare", str(tmp_path / "ev2" / "eval.json"),
                     "--out", str(tmp_path / "cmp")]) == 0
    assert "the baseline decoded with --decode rank, this run with --decode channel --channel-unit sentence" \
        in capsys.readouterr().err
    assert evaluate([*common, "--adapter", str(run / "adapter"), "--decode", "rank", "--channel-unit",
                     "paragraph", "--out", str(tmp_path / "x")]) != 0
    assert "--channel-unit is what --decode channel quotes" in capsys.readouterr().err
    contract = tmp_path / "c.txt"
    contract.write_text("This Agreement is governed by the laws of Delaware. Venue is Wilmington.\n\n"
                        "Notices shall be in writing. Each party pays its own costs.\n")
    sentences = ["This Agreement is governed by the laws of Delaware.", "Venue is Wilmington.",
                 "Notices shall be in writing.", "Each party pays its own costs."]
    capsys.readouterr()
    assert extract(["--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--contract", str(contract),
                    "--clause", "Governing Law", "--json", "--quiet", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "note: --decode channel --channel-unit sentence" in err
    found = json.loads(out)
    assert not found["found"] or found["text"] in sentences, found  # exactly one sentence (the unit), or NONE
    assert extract(["--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--contract", str(contract),
                    "--clause", "all", "--json", "--quiet", "--threads", "1", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "note: --decode channel --channel-unit sentence" in err
    assert all(not r["found"] or r["text"] in sentences for r in json.loads(out)["clauses"].values())


def test_channel_loss_scores_equal_the_decoders_under_bf16_autocast(tiny):
    """Training's scores (engine.loss.LinearCrossEntropy per row) and the decoder's (model.channel.
    query_logprobs: lm_head under autocast, then an fp32 log_softmax) are the same computation in bf16 too: the
    matmul in the autocast dtype, the softmax in fp32 (measured differences ~1e-6 of scores ~30)."""
    from engine.channel_train import ChannelLoss, choice_of, make_group
    from model.channel import query_logprobs

    model, tok = tiny
    ex = _example("Beta clause here.")
    texts, gold = choice_of(ex)
    g = make_group(tok, ex, texts, gold, 8, 64, random.Random(0))
    args = (g["input_ids"], g["labels"], g["position_ids"], g["segment_ids"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = ChannelLoss(model).scores(*args), query_logprobs(model, *args)
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape == (4,)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-4), (ours, ref)
    with torch.no_grad():
        fp32 = query_logprobs(model, *args)
    assert not torch.equal(ref, fp32)  # bf16 really rounded something: the comparison above is in bf16


# a contract whose Governing Law clause runs over three sentences, whose first sentence comes again word for word
# further on, and whose last sentence's words ("thirty days") come again inside another sentence
RUNS_OVER = ("Recitals come first. The parties agree as follows.\n\n"
             "This Agreement is governed by Delaware law. Venue lies in Wilmington. Notice takes thirty days.\n\n"
             "Payment is due monthly. This Agreement is governed by Delaware law. Audits are yearly.\n\n"
             "Either party may end it on thirty days. Licensor owns the marks. The term is five years.")
RUNS_OVER_ANSWER = "This Agreement is governed by Delaware law. Venue lies in Wilmington. Notice takes thirty days."


def test_units_holding_the_answer_or_the_gold_text_are_never_negatives(tiny):
    """An answer over three sentences: the gold is the first, and the two after it, the sentence repeating the
    gold's text, and (for a short answer) the sentence holding the answer again are never offered as wrong
    candidates, whether sampled or mined as hard negatives (a ranking that puts them first), in any group the
    training stream draws; every other sentence still is, in some group."""
    import engine.channel_train
    from engine.channel_train import _groups, build_parser, candidate_order, choice_of, make_group, placed

    _, tok = tiny
    texts, gold, right = placed(_example(RUNS_OVER_ANSWER, RUNS_OVER), "sentence")
    assert (texts, gold) == choice_of(_example(RUNS_OVER_ANSWER, RUNS_OVER), "sentence")
    assert texts[gold] == "This Agreement is governed by Delaware law."
    assert [texts[i] for i in sorted(right)] == ["Venue lies in Wilmington.", "Notice takes thirty days.",
                                                  "This Agreement is governed by Delaware law."]
    short = placed(_example("thirty days", RUNS_OVER), "sentence")  # the answer again in another sentence
    assert [short[0][i] for i in sorted(short[2]) + [short[1]]] == ["Either party may end it on thirty days.",
                                                                    "Notice takes thirty days."]
    assert placed(_example("NONE", RUNS_OVER), "sentence")[2] == frozenset()
    assert placed(_example("Beta clause here."))[2] == frozenset()  # nothing repeated: as before

    n = len(texts) - 1
    wrong = set(range(n)) - right - {gold}
    hard = sorted(right) + [gold] + sorted(wrong)  # an earlier adapter that finds the right ones likeliest
    for share in (0.0, 0.5, 1.0):
        for seed in range(20):
            for k in (3, 20):
                order = candidate_order(len(texts), gold, k, random.Random(seed), hard, share, right)
                assert gold in order and not right & set(order), (share, seed, k, order)
                plain = candidate_order(len(texts), gold, k, random.Random(seed), None, share, right)
                assert gold in plain and not right & set(plain)
    assert set(candidate_order(len(texts), gold, 20, random.Random(0), right=right)[:-1]) == wrong | {gold}
    g = make_group(tok, _example(RUNS_OVER_ANSWER, RUNS_OVER), texts, gold, 20, 64, random.Random(0), right)
    assert int(g["segment_ids"].max()) == len(wrong) + 1  # the wrong ones, the gold one, the null

    # the training stream (sampled, and with hard negatives ranking the right ones first)
    seen = []
    ex = _example(RUNS_OVER_ANSWER, RUNS_OVER)
    for flags, ranking in (([], None), (["--hard-negatives", "x.json", "--hard-share", "1"], {ex.id: hard})):
        args = build_parser().parse_args(["--data", "jsonl:x", "--out", "o", "--unit", "sentence",
                                          "--max-candidates", "4", *flags])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine.channel_train, "_group", lambda tok, ex, texts, gold, order, n: seen.append(order))
            stream = _groups(tok, [ex], args, hard=ranking)
            for _ in range(30):
                next(stream)
    assert len(seen) == 60 and all(gold in o and not right & set(o) for o in seen)
    assert set().union(*seen) == wrong | {gold, n}  # every wrong sentence is drawn, in some group


def _spanning_data(path):
    """_paragraph_data and one more train example whose answer runs over two paragraphs (no unit holds it)."""
    spec = _paragraph_data(path)
    first = json.loads(path.read_text().splitlines()[1])
    a, b = first["context"].split("\n\n")[:2]
    path.write_text(path.read_text() + json.dumps({**first, "id": "train_over", "answer": f"{a}\n\n{b}"}) + "\n")
    return spec


def test_the_banner_counts_the_examples_trained_on_and_those_left_out(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """An example whose answer runs over two paragraphs cannot be a paragraph choice: the banner says how many
    examples train and how many were left out, and why; --eval-every says how many examples it evaluates
    (--eval-limit of the split, 0: all of them)."""
    from engine.channel_train import main

    spec = _spanning_data(tmp_path / "d.jsonl")
    common = ["--model", str(tiny_model_dir), "--data", spec, "--max-steps", "1", "--groups-per-step", "1",
              "--quantize", "none", "--threads", "1", "--eval-split", "test", "--eval-every", "1"]
    assert main([*common, "--out", str(tmp_path / "a"), "--eval-limit", "3"]) == 0
    err = capsys.readouterr().err
    assert "channel training on 8 of 9 train examples" in err, err
    assert "1 left out: 1 answer not within one paragraph (the decoder quotes one)" in err, err
    assert "--eval-every 1: evaluating 3 of the 8 test examples (--eval-limit; 0: all)" in err, err
    assert main([*common, "--out", str(tmp_path / "b"), "--eval-limit", "0", "--unit", "sentence"]) == 0
    err = capsys.readouterr().err
    # sentences: an answer over two paragraphs begins in a sentence, which is its gold one
    assert "channel training on 9 of 9 train examples" in err and "none left out" in err, err
    assert "--eval-every 1: evaluating 8 of the 8 test examples\n" in err, err


def test_eval_limit_picks_a_fixed_subset_and_keeps_a_small_split_whole(tmp_path):
    """--eval-limit N evaluates engine.evaluate's eval_subset of N (the same examples at every evaluation); the
    default, 200, keeps a smaller split whole (the demo recipe's evaluation does not change); negative: refused."""
    from data.validate import load_validated
    from engine.channel_train import _eval_examples, build_parser, check_args
    from engine.config import ConfigError
    from engine.evaluate import eval_subset

    spec = _paragraph_data(tmp_path / "d.jsonl")
    parse = lambda *a: build_parser().parse_args(["--data", spec, "--out", "o", "--eval-split", "test", *a])  # noqa
    every = load_validated(spec, "test")[0]
    assert _eval_examples(parse("--eval-every", "5")) == (every, 8)  # default 200 > 8: all of them
    assert _eval_examples(parse("--eval-every", "5", "--eval-limit", "0")) == (every, 8)
    assert _eval_examples(parse("--eval-every", "5", "--eval-limit", "3")) == (eval_subset(every, 3), 8)
    assert _eval_examples(parse()) == ([], 0)
    with pytest.raises(ConfigError, match="--eval-limit must be >= 0"):
        check_args(parse("--eval-limit", "-1"))


@pytest.mark.parametrize("rows, what", [
    (["just a string"], "rows[0]"),
    ([{"id": "train1", "channel": {"scores": [1.0, 2.0, 3.0]}, "windows": None}], "rows[0]"),
    ([{"id": "train1", "channel": "scores", "windows": 1}], "rows[0]"),
    ([{"id": "train1", "channel": {"scores": [1.0, "x", 3.0]}, "windows": 1}], "rows[0]"),
    ({"not": "a list"}, "'rows' is not a list"),
])
def test_malformed_hard_negatives_rows_are_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch, rows, what):
    import engine.channel_train
    from engine.channel_train import main

    monkeypatch.setattr(engine.channel_train, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    spec = _paragraph_data(tmp_path / "d.jsonl")
    bad = tmp_path / "mined.json"
    bad.write_text(json.dumps({"decode": "channel", "channel_unit": "paragraph", "overall": {}, "rows": rows}))
    assert main(["--model", str(tiny_model_dir), "--data", spec, "--out", str(tmp_path / "o"),
                 "--hard-negatives", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: ") and "\n" not in err and what in err and "engine.evaluate" in err, err
    assert not (tmp_path / "o").exists()


def test_a_skipped_step_does_not_advance_the_channel_learning_rate(tiny_model_dir, tmp_path):  # noqa: F811
    """As in engine.train: a step skipped for an inf/NaN gradient moves no warmup or decay."""
    from engine.channel_train import main
    from tests.conftest import nan_gradient_at_step

    spec = _paragraph_data(tmp_path / "d.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        nan_gradient_at_step(mp, 2)
        assert main(["--model", str(tiny_model_dir), "--data", spec, "--out", str(tmp_path / "o"), "--max-steps",
                     "4", "--groups-per-step", "2", "--lr", "4e-3", "--warmup-steps", "4", "--quantize", "none",
                     "--threads", "1"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 6) for r in rows if "loss" in r] == [1e-3, 2e-3, 2e-3, 3e-3]


def test_channel_train_writes_strict_json_when_an_fp16_step_overflows(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """A T4's first steps overflow while the loss scale settles: the skipped step's non-finite gradient norm is
    written as null (strict JSON, as engine.train writes it), and the row says the step was skipped. fp16 runs
    here on the CPU by letting resolve() accept it, with a loss scale so large that the first step overflows."""
    import engine.precision as precision
    from engine.channel_train import main

    resolve = precision.resolve
    monkeypatch.setattr(precision, "resolve", lambda mode, device: "fp16" if mode == "fp16" else resolve(mode, device))
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scaler(*a, **{**k, "init_scale": 2.0 ** 100}))
    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--data", _paragraph_data(tmp_path / "d.jsonl"), "--out", str(out),
            "--max-steps", "2", "--groups-per-step", "2", "--quantize", "none", "--precision", "fp16",
            "--eval-every", "0", "--save-every", "0", "--threads", "1"]
    assert main(argv) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {x}")) for x in lines]
    assert rows[0]["overflow"] is True and rows[0]["grad_norm"] is None, rows[0]
    assert all("overflow" in r for r in rows)
