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


@pytest.mark.parametrize("trained_on, warned", [("train", True), ("fit", False)])
def test_calibrate_warns_when_the_adapter_trained_on_the_calibration_rows(tmp_path, capsys, trained_on, warned):
    from engine.calibrate import main as calibrate

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": "synthetic", "split": trained_on}))
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
    assert doc["calibration"]["adapter_trained_on"]["split"] == trained_on
