"""Bad input across the commands, as a user meets it: a file that fails while being read, a full disk, an --out
that is a file, a damaged checkpoint, a truncated adapter, nonsense flag values. Each gives one line naming the
file or flag and what to do, a non-zero exit, and nothing half-written. (A full disk is simulated by making the
write raise ENOSPC: CI runs as root on one filesystem, where neither a read-only directory nor a small tmpfs can
be made.)"""
import errno
import json
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError

from tests.test_evaluate import _write_jsonl, tiny_model_dir  # noqa: F401  (the module-scoped fixture)
from tests.test_export import trained  # noqa: F401  (the module-scoped fixture)
from tests.test_train import cfg_args, tiny_cfg


def one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- reading -------------------------------------------------------------------------------------------------
class _FailingFile:
    """An open file whose reading fails half-way, as on a disk error or a vanished network mount."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def __iter__(self):
        yield '{"id": "a"}\n'
        raise OSError(errno.EIO, "Input/output error")


def test_a_read_that_fails_half_way_names_the_file(tmp_path, monkeypatch):
    import data.io
    from data.example import DataError

    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\n')
    monkeypatch.setattr(data.io, "open_text", lambda p, what: _FailingFile())
    with pytest.raises(DataError, match=r"d\.jsonl: reading JSONL rows failed \(Input/output error\)"):
        list(data.io.read_jsonl(path, "JSONL rows"))


def test_data_check_refuses_bad_values_and_a_non_string_corpus_text(shared_datasets, tmp_path, capsys):
    from data.check import main

    for argv, needles in ((["--seq-len", "-5"], ("--seq-len", "-5")), (["--split", "nope"], ("--split", "nope"))):
        with pytest.raises(SystemExit) as e:  # usage errors: argparse's exit status 2, on one line
            main(["synthetic", *argv])
        assert e.value.code == 2
        one_line(capsys, *needles)
    acord = tmp_path / "acord"
    shutil.copytree(shared_datasets / "acord", acord, ignore=shutil.ignore_patterns("corpus.jsonl"))
    lines = (shared_datasets / "acord" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["text"] = None
    (acord / "corpus.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n", encoding="utf-8")
    assert main([f"acord:{acord}"]) == 2
    one_line(capsys, "corpus.jsonl:1", "'text'")


# ---- writing -------------------------------------------------------------------------------------------------
def test_a_full_disk_names_the_destination_and_leaves_the_old_file(tmp_path, monkeypatch):
    from model.files import WriteError, atomic_write_text

    path = tmp_path / "rule.json"
    path.write_text("old")
    monkeypatch.setattr(Path, "write_bytes", enospc)
    with pytest.raises(WriteError, match=r"rule\.json: cannot write it \(No space left on device\)") as e:
        atomic_write_text(path, "new")
    assert ".tmp" not in str(e.value)  # the destination, not the temporary it was going to
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["rule.json"]


def test_safetensors_on_a_full_disk_names_the_directory(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError ("Error while serializing: I/O error")."""
    import model.adapter
    from model import apply_lora, save_adapter
    from model.files import WriteError
    from tests.test_evaluate import make_tiny_model_dir
    from model import load_model

    m = load_model(str(make_tiny_model_dir(tmp_path / "m")))
    apply_lora(m, r=2, alpha=4.0)

    def full(*_a, **_k):
        raise SafetensorError("Error while serializing: I/O error")

    monkeypatch.setattr(model.adapter, "save_file", full)
    with pytest.raises(WriteError, match=r"adapter: cannot write it \(Error while serializing: I/O error\)"):
        save_adapter(m, tmp_path / "run" / "adapter", base_model="x")
    assert not (tmp_path / "run" / "adapter").exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no temporary left


def test_a_write_into_a_missing_directory_names_the_destination(tmp_path):
    from model.files import WriteError, atomic_write_text

    with pytest.raises(WriteError, match=r"nowhere/x\.json: cannot write it \(No such file or directory\)"):
        atomic_write_text(tmp_path / "nowhere" / "x.json", "{}")


def test_tokenizer_save_on_a_full_disk_names_tokenizer_json(tmp_path):
    """tokenizers reports ENOSPC as a plain Exception("No space left on device (os error 28)"), no file named."""
    from types import SimpleNamespace

    from model.files import WriteError
    from model.tokenizer import Tokenizer

    def full(_path):
        raise Exception("No space left on device (os error 28)")

    path = tmp_path / "export" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text("old")
    with pytest.raises(WriteError) as e:
        Tokenizer.save(SimpleNamespace(_tk=SimpleNamespace(save=full)), path)
    assert str(e.value) == f"{path}: cannot write it (No space left on device (os error 28)); free disk space"
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]


def test_check_writable_fails_before_the_work_and_creates_nothing(tmp_path):
    from model.files import WriteError, check_writable

    (tmp_path / "afile").write_text("x")
    with pytest.raises(WriteError, match=r"--out .*afile exists and is not a directory"):
        check_writable(tmp_path / "afile")
    with pytest.raises(WriteError, match=r"--out .*afile/deeper: cannot write there"):
        check_writable(tmp_path / "afile" / "deeper")
    check_writable(tmp_path / "new" / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ---- engine.train ----------------------------------------------------------------------------------------------
def test_train_out_that_is_a_file_is_one_line(tmp_path, capsys):
    from engine.train import main

    (tmp_path / "taken").write_text("keep me")
    cfg = tiny_cfg(tmp_path, out=str(tmp_path / "taken"), max_steps=1)
    capsys.readouterr()  # the tiny model's own writing
    assert main(cfg_args(cfg)) != 0
    one_line(capsys, "--out", "taken", "not a directory")
    assert (tmp_path / "taken").read_text() == "keep me"


def test_resume_from_a_damaged_checkpoint_names_it_and_writes_nothing(tmp_path, capsys):
    from engine.train import main

    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1, grad_accum=1)
    assert main(cfg_args(cfg)) == 0
    out = Path(cfg.out)
    step2 = out / "checkpoints" / "step-2"
    (step2 / "state.json").write_text("{not json")
    config_before = (out / "config.json").read_bytes()
    capsys.readouterr()
    args = cfg_args(tiny_cfg(tmp_path, max_steps=3, save_every=1, grad_accum=1)) + ["--resume"]
    assert main(args) != 0
    one_line(capsys, "step-2", "checkpoint does not read", "delete this step directory")
    assert (out / "config.json").read_bytes() == config_before  # max_steps=3 was not written over the run's


def test_a_second_signal_says_what_is_left(tmp_path):
    from engine.checkpoint import interrupted_message

    out = tmp_path / "run"
    assert "nothing was written" in interrupted_message(out)
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")  # a start without a logged step: discarded, nothing of a run
    assert "nothing was written" in interrupted_message(out)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    msg = interrupted_message(out)
    assert "before the first checkpoint" in msg and "--overwrite" in msg and "intact" not in msg
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "step-4" / "state.json").write_text("{}")
    assert "step-4, is intact" in interrupted_message(out) and "--resume" in interrupted_message(out)


# ---- engine.evaluate -------------------------------------------------------------------------------------------
def _eval_args(model_dir, tmp_path, out="o"):
    return ["--model", str(model_dir), "--data", _write_jsonl(tmp_path / "tiny.jsonl"), "--split", "test",
            "--max-new-tokens", "3", "--seq-len", "512", "--quiet", "--out", str(tmp_path / out)]


def test_evaluate_output_lands_whole_or_not_at_all(tiny_model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    import engine.evaluate
    from engine.evaluate import main

    real = engine.evaluate.write_report

    def report_then_full_disk(result, out_dir, **kw):
        real(result, out_dir, **kw)  # report.md and the PNGs written, then the disk fills
        enospc()

    monkeypatch.setattr(engine.evaluate, "write_report", report_then_full_disk)
    assert main(_eval_args(tiny_model_dir, tmp_path)) != 0
    one_line(capsys, "No space left on device")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temporary either
    monkeypatch.setattr(engine.evaluate, "write_report", real)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert main(_eval_args(tiny_model_dir, tmp_path)) == 0
    assert {"eval.json", "report.md", "notes.txt"} <= {p.name for p in (tmp_path / "o").iterdir()}


def test_evaluate_refuses_bad_side_files_before_evaluating(tiny_model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    import engine.evaluate
    from engine.evaluate import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(engine.evaluate, "load_for_eval", no_model)
    (tmp_path / "afile").write_text("x")
    assert main(_eval_args(tiny_model_dir, tmp_path, out="afile/o")) != 0
    one_line(capsys, "--out", "afile/o", "cannot write there")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe\n')
    assert main(_eval_args(tiny_model_dir, tmp_path) + ["--metrics", str(metrics)]) != 0
    one_line(capsys, "metrics.jsonl does not read")
    compare = tmp_path / "before.json"
    compare.write_text(json.dumps({"overall": {"n": 1}, "rows": [{"id": "x", "answer": "NONE"}]}))
    assert main(_eval_args(tiny_model_dir, tmp_path) + ["--compare", str(compare)]) != 0
    one_line(capsys, "before.json", "rows[0]", "scores.similarity")
    assert main(_eval_args(tiny_model_dir, tmp_path) + ["--adapter", str(tmp_path / "afile")]) != 0
    one_line(capsys, "afile/adapter_config.json not found")
    rule_dir = tmp_path / "rules"
    rule_dir.mkdir()
    assert main(_eval_args(tiny_model_dir, tmp_path) + ["--decode", "channel", "--channel-rule", str(rule_dir)]) != 0
    one_line(capsys, "rules: channel rule does not read")
    assert not (tmp_path / "o").exists()


# ---- engine.calibrate ------------------------------------------------------------------------------------------
def test_calibrate_checks_rows_and_writes_no_rule_when_the_check_fails(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from engine.calibrate import main as calibrate
    from engine.evaluate import main as evaluate
    from tests.test_calibrate import _paragraph_data

    spec = _paragraph_data(tmp_path / "d.jsonl")
    assert evaluate(["--model", str(tiny_model_dir), "--data", spec, "--decode", "channel", "--precision", "fp32",
                     "--quiet", "--split", "train", "--out", str(tmp_path / "cal")]) == 0
    rows = tmp_path / "cal" / "eval.json"
    doc = json.loads(rows.read_text())
    for r in doc["rows"]:
        del r["channel"]["features"]
    doc["split"] = "test"  # as a real --check would be (no warning about shared rows)
    stripped = tmp_path / "stripped.json"
    stripped.write_text(json.dumps(doc))
    capsys.readouterr()
    assert calibrate(["--rows", str(stripped), "--out", str(tmp_path / "rule.json")]) != 0
    one_line(capsys, "stripped.json", "without channel scores and features")
    assert calibrate(["--rows", str(rows), "--out", str(tmp_path / "rule.json"), "--max-wrongly-none", "30",
                      "--check", str(stripped)]) != 0
    one_line(capsys, "stripped.json")
    assert not (tmp_path / "rule.json").exists()  # the check failed: no rule written either


# ---- engine.export ----------------------------------------------------------------------------------------------
def test_export_refuses_an_adapter_its_users_could_not_load(trained, tmp_path, capsys):  # noqa: F811
    from engine.export import main

    cut = tmp_path / "cut"
    shutil.copytree(trained["adapter"], cut)
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert main(["--adapter", str(cut), "--out", str(tmp_path / "o1")]) != 0
    one_line(capsys, "adapter_model.safetensors", "unreadable")
    odd = tmp_path / "odd"
    shutil.copytree(trained["adapter"], odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "lm_head"]}))
    assert main(["--adapter", str(odd), "--out", str(tmp_path / "o2")]) != 0
    one_line(capsys, "adapter_config.json", "lm_head")
    (odd / "adapter_config.json").write_text("[1, 2]")
    assert main(["--adapter", str(odd), "--out", str(tmp_path / "o3")]) != 0
    one_line(capsys, "adapter_config.json", "JSON object")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    assert main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "ok")]) == 0


# ---- engine.memory, engine.channel_train, data.focus -----------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--lora-r", "-4"), ("--loss-chunk", "0"), ("--supervised", "-5"),
                                        ("--steps", "0")])
def test_memory_refuses_nonsense_values(flag, value, capsys):
    from engine.memory import main

    assert main(["--seq-len", "512", "--batch-size", "1", flag, value]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err and value in err, err


def test_memory_usage_errors_are_one_line(capsys):
    from engine.memory import main

    with pytest.raises(SystemExit) as e:
        main(["--seq-len", "512", "--batch-size", "1", "--sdpa", "fast"])
    assert e.value.code == 2
    one_line(capsys, "--sdpa", "fast")


def test_channel_train_checks_its_flags_before_touching_out(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from engine.channel_train import main

    spec = _write_jsonl(tmp_path / "tiny.jsonl")
    base = ["--model", str(tiny_model_dir), "--data", spec, "--split", "test", "--out", str(tmp_path / "o"),
            "--max-steps", "1", "--quantize", "none", "--no-checkpointing", "--precision", "fp32"]
    for flag, value in (("--lr", "-1"), ("--eval-every", "-1"), ("--warmup-steps", "-2")):
        assert main(base + [flag, value]) != 0
        one_line(capsys, flag, value)
        assert not (tmp_path / "o").exists()
    assert main(base + ["--eval-every", "1", "--eval-split", "valid"]) != 0
    one_line(capsys, "'valid'", "--eval-every 0")
    assert not (tmp_path / "o").exists()


def test_focus_writes_into_a_new_directory_and_its_usage_errors_are_one_line(tmp_path, capsys):
    from data.focus import main

    spec = _write_jsonl(tmp_path / "tiny.jsonl")
    out = tmp_path / "new" / "dir" / "focus.jsonl"
    assert main([spec, "--split", "test", "--out", str(out)]) == 0
    assert out.is_file() and len(out.read_text().splitlines()) == 3  # the three examples with a clause
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([spec, "--unit", "word", "--out", str(out)])
    assert e.value.code == 2
    one_line(capsys, "--unit", "word")


# ---- engine.channel_train --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda:0", "gpu", "CUDA"])
def test_channel_train_refuses_a_device_it_would_not_use(tmp_path, capsys, device):
    """--device takes engine.train's choices (auto, cpu, cuda); anything else used to train on the CPU silently."""
    from engine.channel_train import main, preflight

    for command in (preflight, main):  # (preflight first: the old code then fails before training)
        with pytest.raises(SystemExit) as e:
            command(["--data", "synthetic", "--out", str(tmp_path / "o"), "--device", device])
        assert e.value.code == 2
        one_line(capsys, "--device", repr(device), "auto", "cuda")
    assert not (tmp_path / "o").exists()
