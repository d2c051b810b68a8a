"""engine.calibrate: the NONE rule of the noisy-channel decoder, fitted on one split and applied to another."""
import json

import numpy as np
import pytest

from tests.test_evaluate import tiny_model_dir  # noqa: F401  (the module-scoped fixture)


def test_fit_logistic_is_the_penalised_optimum():
    """The gradient of the objective fit_logistic minimises vanishes at its answer (in raw units), and the
    direction it finds is the one the labels were drawn from."""
    from engine.calibrate import fit_logistic

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3)) * np.array([1.0, 5.0, 0.2]) + np.array([0.5, -2.0, 1.0])
    true_w, true_b = np.array([2.0, -0.3, 4.0]), -0.5
    y = (rng.random(400) < 1 / (1 + np.exp(-(X @ true_w + true_b)))).astype(float)
    l2 = 1e-3
    w, b = fit_logistic(X, y, l2=l2)
    # the penalty is on the standardised weights: w_std = w * sd
    sd = X.std(0)
    p = 1 / (1 + np.exp(-(X @ w + b)))
    grad_w_std = ((X - X.mean(0)) / sd).T @ (p - y) / len(y) + l2 * w * sd
    assert np.abs(grad_w_std).max() < 1e-8 and abs((p - y).mean()) < 1e-8
    cos = w @ true_w / np.linalg.norm(w) / np.linalg.norm(true_w)
    assert cos > 0.9


def _rows(n_clause, n_none, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_clause + n_none):
        clause = i < n_clause
        f = {"gain": rng.normal(1.0 if clause else 0.5, 0.4), "gap": rng.normal(0.8 if clause else 0.2, 0.3),
             "lead": rng.normal(1.0, 0.3)}
        rows.append({"id": f"r{i}", "answer": "some clause" if clause else "NONE", "channel": {"features": f}})
    return rows


@pytest.mark.parametrize("bound", [0.0, 5.0, 10.0, 30.0])
def test_fit_rule_answers_none_on_at_most_the_bound_of_clause_rows(bound):
    from engine.calibrate import fit_rule

    rows = _rows(200, 50)
    rule, fit = fit_rule(rows, ("gain", "gap", "lead"), bound)
    decided = [rule.value(r["channel"]["features"]) <= 0 for r in rows]
    wrongly = sum(decided[:200])
    assert wrongly == int(np.floor(bound / 100 * 200))  # exactly at the bound: no NONE left on the table
    assert fit["wrongly_none"] == pytest.approx(100 * wrongly / 200)
    assert fit["none_answered_none"] == pytest.approx(100 * sum(decided[200:]) / 50)
    assert rule.weights["gap"] > 0  # the feature that separates the kinds here pushes towards quoting


def _paragraph_data(path):
    """Clause and NONE examples whose contexts are several paragraphs (the channel decoder quotes paragraphs)."""
    paras = ["The Licensee shall pay royalties quarterly.", "This Agreement is governed by the laws of Delaware.",
             "Either party may terminate on thirty days notice.", "Licensor may audit the books once a year.",
             "Notices shall be in writing.", "The term is five years."]
    lines = []
    for split in ("train", "test"):
        for i in range(8):
            ctx_paras = [paras[(i + j) % len(paras)] for j in range(3)]
            answer = ctx_paras[1] if i % 3 else "NONE"
            lines.append({"id": f"{split}{i}", "split": split, "query": ["Governing Law", "Audit Rights"][i % 2],
                          "context": "\n\n".join(ctx_paras), "answer": answer})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f"jsonl:{path}"


def test_calibrate_then_evaluate_with_the_rule_agrees_with_check(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """The rule written by calibrate, passed to evaluate --channel-rule, gives exactly the headline that
    calibrate --check computed from the stored scores of a default-rule run."""
    from engine.calibrate import main as calibrate
    from engine.evaluate import main as evaluate

    spec = _paragraph_data(tmp_path / "d.jsonl")
    common = ["--model", str(tiny_model_dir), "--data", spec, "--decode", "channel", "--precision", "fp32",
              "--quiet"]
    assert evaluate(common + ["--split", "train", "--out", str(tmp_path / "cal")]) == 0
    assert evaluate(common + ["--split", "test", "--out", str(tmp_path / "test0")]) == 0
    ev = json.loads((tmp_path / "test0" / "eval.json").read_text())
    assert ev["channel_rule"] == {"file": None, "weights": {"gain": 1.0}, "bias": 0.0}
    for r in ev["rows"]:
        a, b = r["channel"]["best"]
        assert len(r["channel"]["scores"]) == 3 and a < b
    capsys.readouterr()
    rule = tmp_path / "rule.json"
    assert calibrate(["--rows", str(tmp_path / "cal" / "eval.json"), "--out", str(rule), "--max-wrongly-none", "30",
                      "--check", str(tmp_path / "test0" / "eval.json")]) == 0
    out = capsys.readouterr().out
    checked = out[out.index("under the rule:\n") + len("under the rule:\n"):].splitlines()[1:3]
    doc = json.loads(rule.read_text())
    assert set(doc["weights"]) == {"gain", "gap", "lead"} and doc["calibration"]["split"] == "train"

    assert evaluate(common + ["--split", "test", "--channel-rule", str(rule), "--out", str(tmp_path / "test1")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:3] == checked
    ev1 = json.loads((tmp_path / "test1" / "eval.json").read_text())
    assert ev1["channel_rule"]["file"] == str(rule) and ev1["channel_rule"]["bias"] == doc["bias"]
    # the check's outcome is kept in the rule file too, and it is what evaluating with the rule gives
    assert doc["check"]["eval_json"] == str(tmp_path / "test0" / "eval.json")
    assert doc["check"]["clause"] == ev1["clause"] and doc["check"]["none"] == ev1["none"]


def test_calibrate_errors_are_one_line(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from engine.calibrate import main as calibrate
    from engine.evaluate import main as evaluate

    spec = _paragraph_data(tmp_path / "d.jsonl")
    assert evaluate(["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--max-new-tokens", "3",
                     "--quiet", "--out", str(tmp_path / "free")]) == 0
    capsys.readouterr()
    for argv, needle in (
        (["--rows", str(tmp_path / "free" / "eval.json")], "--decode channel"),  # not a channel run
        (["--rows", str(tmp_path / "missing.json")], "missing.json"),
        (["--rows", str(tmp_path / "free" / "eval.json"), "--features", "gain,nope"], "nope"),
    ):
        assert calibrate(argv + ["--out", str(tmp_path / "rule.json")]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "rule.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{\"weights\": {\"gain\": 1}}")
    assert evaluate(["--data", spec, "--decode", "channel", "--channel-rule", str(bad), "--out",
                     str(tmp_path / "o")]) != 0
    assert "bad.json" in capsys.readouterr().err
    assert evaluate(["--data", spec, "--channel-rule", str(bad), "--out", str(tmp_path / "o")]) != 0
    assert "--decode channel" in capsys.readouterr().err


def test_split_overlap_and_the_adapters_training_split(tmp_path):
    from data.example import splits_overlap
    from engine.calibrate import adapter_training, same_data

    assert splits_overlap("train", "calib") and splits_overlap("fit", "train") and splits_overlap("test", "test")
    assert not splits_overlap("fit", "calib") and not splits_overlap("valid", "test")
    assert same_data(f"acord:{tmp_path}/x/..", f"acord:{tmp_path}") and not same_data("acord:/a", "cuad:/a")
    assert not same_data(None, "synthetic") and same_data("synthetic", "synthetic")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-5" / "adapter").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "config.json").write_text(json.dumps({"data": "acord:/d", "split": "fit"}))
    for a in (run / "adapter", run / "checkpoints" / "step-5" / "adapter"):
        assert adapter_training(str(a)) == {"config": str(run / "config.json"), "data": "acord:/d", "split": "fit"}
    (run / "config.json").write_text(json.dumps({"data": "acord:/d", "train_split": "train"}))  # engine.train's
    assert adapter_training(str(run / "adapter"))["split"] == "train"
    assert adapter_training(None) is None and adapter_training(str(tmp_path / "elsewhere" / "adapter")) is None
    # a run continued from another adapter (--init-adapter) has seen what that one trained on too
    cont = tmp_path / "cont"
    (cont / "adapter").mkdir(parents=True)
    (cont / "config.json").write_text(json.dumps({"data": "acord:/d", "split": "fit",
                                                  "init_adapter": str(run / "adapter")}))
    chain = adapter_training(str(cont / "adapter"))
    assert chain["split"] == "fit" and chain["before"]["split"] == "train"


@pytest.mark.parametrize("trained_on, warned", [("train", True), ("fit", False), ("train>fit", True)])
def test_calibrate_warns_when_the_adapter_trained_on_the_calibration_rows(tmp_path, capsys, trained_on, warned):
    """train>fit: an adapter trained on train (which holds calib), then continued on fit with --init-adapter."""
    from engine.calibrate import main as calibrate

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    first, _, then = trained_on.partition(">")
    (run / "config.json").write_text(json.dumps({"data": "synthetic", "split": first}))
    if then:
        (tmp_path / "cont" / "adapter").mkdir(parents=True)
        (tmp_path / "cont" / "config.json").write_text(json.dumps({"data": "synthetic", "split": then,
                                                                   "init_adapter": str(run / "adapter")}))
        run = tmp_path / "cont"
    rng = np.random.default_rng(0)
    rows = [{"id": f"r{i}", "answer": "NONE" if i % 4 == 0 else "a clause",
             "channel": {"features": {"gain": float(rng.normal(1.0 if i % 4 else -1.0)), "gap": 0.0, "lead": 0.0}}}
            for i in range(40)]
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"decode": "channel", "data": "synthetic", "split": "calib", "model": "m", "overall": {},
                              "adapter": str(run / "adapter"), "rows": rows}))
    rule = tmp_path / "calib" / "rule.json"  # a directory that does not exist yet
    assert calibrate(["--rows", str(ev), "--features", "gain", "--out", str(rule)]) == 0
    err = capsys.readouterr().err
    assert ("trained on split" in err) == warned, err
    doc = json.loads(rule.read_text())
    assert doc["calibration"]["adapter_trained_on"]["split"] == (then or first)


def _feature_rows(n=40, seed=0, drop=None):
    """Rows as engine.evaluate --decode channel writes them (features only); drop: a feature left out of the
    first row (an older eval.json, or one edited by hand)."""
    rng = np.random.default_rng(seed)
    rows = [{"id": f"r{i}", "answer": "NONE" if i % 4 == 0 else "a clause",
             "channel": {"features": {"gain": float(rng.normal(1.0 if i % 4 else -1.0)), "gap": 0.1, "lead": 0.2}}}
            for i in range(n)]
    if drop:
        del rows[0]["channel"]["features"][drop]
    return rows


def _eval_json(path, rows, **facts):
    d = {"decode": "channel", "data": "synthetic", "split": "calib", "model": "m", "adapter": None, "overall": {},
         "channel_unit": "paragraph", "rows": rows, **facts}
    path.write_text(json.dumps(d))
    return path


def test_the_rule_records_its_unit_and_another_unit_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                                    monkeypatch):
    """The rule file says which --channel-unit (and model and adapter) its rows were decoded with; evaluate,
    extract and demo refuse it in one line for another unit, before the model loads; calibrate --check refuses
    an eval.json of another unit."""
    import engine.demo
    import engine.evaluate
    import engine.extract
    from engine.calibrate import main as calibrate
    from engine.demo import main as demo
    from engine.evaluate import main as evaluate
    from engine.extract import main as extract

    ev = _eval_json(tmp_path / "eval.json", _feature_rows(), channel_unit="sentence", adapter="runs/a/adapter")
    rule = tmp_path / "rule.json"
    assert calibrate(["--rows", str(ev), "--out", str(rule)]) == 0
    cal = json.loads(rule.read_text())["calibration"]
    assert (cal["channel_unit"], cal["model"], cal["adapter"]) == ("sentence", "m", "runs/a/adapter")

    for mod in (engine.evaluate, engine.extract, engine.demo):
        monkeypatch.setattr(mod, "load_for_eval", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(engine.demo, "_gradio", lambda: None)
    contract = tmp_path / "c.txt"
    contract.write_text("Governed by Delaware law.\n")
    spec = _paragraph_data(tmp_path / "d.jsonl")
    capsys.readouterr()
    for command, argv in ((evaluate, ["--data", spec, "--out", str(tmp_path / "o")]),
                          (extract, ["--contract", str(contract), "--clause", "Governing Law"]),
                          (demo, [])):
        assert command([*argv, "--decode", "channel", "--channel-rule", str(rule)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {rule}: ") and "\n" not in err, err
        assert "--channel-unit sentence" in err and "paragraph" in err, err
    assert not (tmp_path / "o").exists()
    # --check on an eval.json of another unit: refused, and no rule written
    check = _eval_json(tmp_path / "check.json", _feature_rows(seed=1), split="test")
    assert calibrate(["--rows", str(ev), "--out", str(tmp_path / "rule2.json"), "--check", str(check)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {check}: ") and "--channel-unit paragraph" in err and "sentence" in err, err
    assert "\n" not in err and not (tmp_path / "rule2.json").exists()


def test_a_rule_from_another_adapter_warns_and_an_old_rule_is_accepted(tmp_path, capsys):
    from engine.evaluate import read_rule

    rule = tmp_path / "rule.json"
    doc = {"weights": {"gain": 1.0}, "bias": 0.5, "calibration": {"model": "m", "adapter": "runs/a/adapter",
                                                                   "channel_unit": "paragraph"}}
    rule.write_text(json.dumps(doc))
    assert read_rule(rule, "paragraph", "runs/a/adapter", "m").bias == 0.5
    assert capsys.readouterr().err == ""  # the same unit, adapter and model: nothing to say
    (tmp_path / "a").mkdir()
    doc["calibration"]["adapter"] = str(tmp_path / "a" / ".." / "a")  # the same directory, spelled otherwise
    rule.write_text(json.dumps(doc))
    assert read_rule(rule, "paragraph", str(tmp_path / "a"), "m").bias == 0.5 and capsys.readouterr().err == ""
    assert read_rule(rule, "paragraph", "runs/b/adapter", "m").bias == 0.5  # used, with a warning
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: {rule} was calibrated with adapter ") and "runs/b/adapter" in err, err
    assert "\n" not in err
    assert read_rule(rule, "paragraph", None, "other").bias == 0.5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "this run reads none" in err[0] and "model m and this run reads other" in err[1], err
    with pytest.raises(ValueError, match="--channel-unit paragraph"):
        read_rule(rule, "sentence", None, "m")
    old = tmp_path / "old.json"  # written before the unit was recorded (or by hand): accepted as it is
    old.write_text(json.dumps({"weights": {"gain": 1.0}, "bias": 0.0}))
    assert read_rule(old, "sentence", "x", "y").bias == 0.0
    old.write_text(json.dumps({"weights": {"gain": 1.0}, "bias": 0.0, "calibration": {"data": "synthetic"}}))
    assert read_rule(old, "sentence", "x", "y").bias == 0.0 and capsys.readouterr().err == ""


def test_rows_missing_a_feature_are_one_line_naming_the_file_and_the_key(tmp_path, capsys):
    from engine.calibrate import main as calibrate

    ev = _eval_json(tmp_path / "eval.json", _feature_rows(drop="lead"))
    assert calibrate(["--rows", str(ev), "--out", str(tmp_path / "rule.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ev}: rows[0] (id 'r0')") and "'lead'" in err and "\n" not in err, err
    assert "engine.evaluate --decode channel" in err and not (tmp_path / "rule.json").exists()
    assert calibrate(["--rows", str(ev), "--features", "gain,gap", "--out", str(tmp_path / "rule.json")]) == 0
    capsys.readouterr()
    good = _eval_json(tmp_path / "good.json", _feature_rows())
    rows = _feature_rows(seed=1, drop="lead")
    for r in rows:
        r["channel"]["best"] = [0, 5]
    check = _eval_json(tmp_path / "check.json", rows, split="test")  # the rule weighs lead: rule.value needs it
    assert calibrate(["--rows", str(good), "--out", str(tmp_path / "rule3.json"), "--check", str(check)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {check}: rows[0]") and "'lead'" in err and "\n" not in err, err
    assert not (tmp_path / "rule3.json").exists()


def test_check_replays_the_focus_stages_trims(tmp_path, capsys):
    """--check on a --focus-adapter run quotes what its focus stage kept of each unit (channel "focus"), the
    unit whole where the trim kept it whole (null), and, for a row that run answered NONE (no trim stored), the
    unit whole, which the output says."""
    from data.validate import load_validated
    from engine.calibrate import main as calibrate, redecide
    from model.channel import ChannelRule, paragraphs

    spec = _paragraph_data(tmp_path / "d.jsonl")
    examples = load_validated(spec, "test")[0]
    rows = []
    for i, ex in enumerate(examples):
        a, b = paragraphs(ex.context)[1]
        ch = {"features": {"gain": 1.0, "gap": 0.5, "lead": 0.5}, "best": [a, b]}
        if i % 3 == 0:
            ch["focus"] = [a + 4, b - 1]  # the focus stage kept a part
        elif i % 3 == 1:
            ch["focus"] = None  # it kept the unit whole
        # i % 3 == 2: the run answered NONE, the focus stage never ran
        rows.append({"id": ex.id, "answer": ex.answer, "channel": ch})
    d = {"decode": "channel", "data": spec, "split": "test", "channel_unit": "paragraph", "overall": {},
         "focus_adapter": "runs/focus/adapter", "rows": rows}
    untrimmed = []
    out = redecide(d, rows, ChannelRule(), "check.json", untrimmed)  # gain 1 > 0: every row quoted
    for i, (ex, r) in enumerate(zip(examples, out)):
        a, b = paragraphs(ex.context)[1]
        want = (a + 4, b - 1) if i % 3 == 0 else (a, b)
        assert (r["start"], r["end"]) == want and r["prediction"] == ex.context[want[0]:want[1]], i
    assert untrimmed == [ex.id for i, ex in enumerate(examples) if i % 3 == 2]
    check = tmp_path / "check.json"
    check.write_text(json.dumps(d))
    ev = _eval_json(tmp_path / "eval.json", _feature_rows())
    assert calibrate(["--rows", str(ev), "--out", str(tmp_path / "rule.json"), "--check", str(check)]) == 0
    said = capsys.readouterr().out
    assert "replayed as that run trimmed them" in said
    n = len(untrimmed)
    assert f"{n} row(s) it answered NONE and the rule quotes have no focus trim to replay and are scored with " \
           "the whole paragraph" in said, said
