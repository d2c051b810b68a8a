"""The training loop end to end on a tiny random Llama (CPU): it learns, writes its outputs, refuses bad input.

The tiny run directory holds an HF-format random Llama (tests/conftest.py save_tiny_hf, vocab 320) and a
byte-level tokenizer.json (256 bytes + ChatML specials = 259 ids), so no real tokenizer or download is needed.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, TrainConfig
from tests.conftest import REPO, save_tiny_hf

CONTRACTS = [
    ("Governing Law", "This Agreement is governed by the laws of Ohio.", "Seller ships goods. Buyer pays in 30 days. "),
    ("Confidentiality", "Each party keeps the other's secrets.", "Buyer pays in 30 days. Notices go by mail. "),
    ("Termination", "Either party may end this on 10 days notice.", "Seller ships goods. Notices go by mail. "),
    ("Assignment", "Neither party may assign this Agreement.", "Buyer pays in 30 days. Seller ships goods. "),
    ("Warranty", "Seller warrants the goods for one year.", "Notices go by mail. Buyer pays in 30 days. "),
    ("Audit", "Buyer may audit Seller's records yearly.", "Seller ships goods. Buyer pays in 30 days. "),
    ("Insurance", "Seller keeps liability insurance of $1M.", "Notices go by mail. Seller ships goods. "),
    ("Non-Compete", "Seller shall not compete for two years.", "Buyer pays in 30 days. Notices go by mail. "),
]


def write_tiny_tokenizer(path: Path) -> Path:
    """Byte-level BPE without merges: every byte is a token; ChatML specials on top."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return path


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    # initializer_range 0.2 (HF default 0.02): with the frozen random lm_head at 0.02 the logits cannot leave
    # +-1.3, so no adapter could fit anything; 0.2 gives the tiny model a usable output range.
    save_tiny_hf(path, seed=seed, initializer_range=0.2)
    return write_tiny_tokenizer(path)


def tiny_jsonl(path: Path, n: int = 8, n_valid: int = 2, bad: int = 0) -> Path:
    lines = []
    for i in range(n + n_valid):
        cat, clause, filler = CONTRACTS[i % len(CONTRACTS)]
        context = f"{filler}{clause} Signed in {2000 + i}."
        answer = clause if i >= bad else "A clause that is nowhere in the contract at all."
        lines.append({"id": f"c{i}", "query": cat, "context": context, "answer": answer,
                      "split": "train" if i < n else "valid"})
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return path


def tiny_cfg(tmp_path: Path, **over) -> TrainConfig:
    """A tiny but complete recipe: NF4 base, LoRA on all projections, packing off, 384-token rows."""
    model = tmp_path / "tiny" if (tmp_path / "tiny").is_dir() else tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "data.jsonl" if (tmp_path / "data.jsonl").is_file() else tiny_jsonl(tmp_path / "data.jsonl")
    kw = dict(model=str(model), data=f"jsonl:{data}", out=str(tmp_path / "run"), seq_len=384, pack=False,
              batch_size=2, grad_accum=2, max_steps=6, lr=1e-2, warmup_steps=1, lora_r=8, lora_alpha=16.0,
              quantize="nf4", device="cpu", seed=0)
    kw.update(over)
    return TrainConfig(**kw)


def read_metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln]


def run_train(args: list[str], env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def cfg_args(cfg: TrainConfig) -> list[str]:
    """The command-line spelling of a TrainConfig (what a user would type)."""
    out = []
    for k, v in cfg.to_dict().items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, ",".join(v) if isinstance(v, list) else str(v)]
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core runner oversubscription makes them 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ tests
def test_tiny_model_overfits_a_handful_of_examples(tmp_path):
    """4 examples, one batch of all 4 per step, 40 steps: the answer loss falls from ~7 to below 1.0."""
    from engine.train import train

    cfg = tiny_cfg(tmp_path, max_steps=40, lr=3e-2, warmup_steps=2, batch_size=4, grad_accum=1, max_examples=4,
                   lora_r=16, lora_alpha=32.0, eval_every=20)
    res = train(cfg)
    rows = read_metrics(cfg.out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and losses[0] > 4.0
    assert sum(losses[-5:]) / 5 < 1.0, losses
    assert res["eval_loss"] < rows[0]["eval_loss"]  # step-0 line: evaluation before training


def test_run_writes_config_metrics_and_peft_adapter(tmp_path):
    from safetensors.torch import load_file

    from engine.train import train

    cfg = tiny_cfg(tmp_path, max_steps=3)
    train(cfg)
    out = Path(cfg.out)
    assert TrainConfig(**json.loads((out / "config.json").read_text())) == cfg
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes", "overflow"} <= set(r)
        assert r["tokens"] > 0 and r["peak_mem_bytes"] > 0
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["peft_type"] == "LORA"
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(keys) == 2 * 2 * 7 and all(k.startswith("base_model.model.") for k in keys)
    assert not (out / "checkpoints").exists()  # save_every 0: no checkpoints unless signalled


def test_init_adapter_starts_where_the_saved_adapter_ended(tmp_path):
    """--init-adapter: the model before the first step is the saved adapter's (its step-0 eval loss is the one the
    earlier run ended with), not fresh LoRA; a LoRA shape that differs, or a wrong directory, is one line before
    anything loads."""
    from engine.train import train

    first = tiny_cfg(tmp_path, out=str(tmp_path / "a"), max_steps=4, eval_every=4)
    ended = train(first)["eval_loss"]
    base = read_metrics(first.out)[0]["eval_loss"]  # step 0: fresh LoRA, the base model's loss
    assert abs(ended - base) > 0.05
    cont = tiny_cfg(tmp_path, out=str(tmp_path / "b"), max_steps=1, eval_every=1, save_every=1,
                    init_adapter=str(tmp_path / "a" / "adapter"))
    train(cont)
    assert abs(read_metrics(cont.out)[0]["eval_loss"] - ended) < 1e-5
    assert json.loads((Path(cont.out) / "config.json").read_text())["init_adapter"] == cont.init_adapter

    for over, named in ((dict(lora_r=4), "--lora-r 8 (this run: --lora-r 4)"),
                        (dict(lora_alpha=8.0, lora_targets=["q_proj"]),
                         "--lora-alpha 16.0 (this run: --lora-alpha 8.0), --lora-targets"),
                        (dict(use_rslora=True), "--no-use-rslora (this run: --use-rslora)"),
                        (dict(init_adapter=str(tmp_path / "nope")), "nope")):
        cfg = tiny_cfg(tmp_path, out=str(tmp_path / "c"), **{"init_adapter": cont.init_adapter, **over})
        r = run_train(cfg_args(cfg))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and named in r.stderr, r.stderr
        assert not Path(cfg.out).exists()

    # a resume reads its LoRA weights from its checkpoint: the adapter it started from may be gone by then
    shutil.rmtree(tmp_path / "a" / "adapter")
    assert train(dataclasses.replace(cont, max_steps=2, resume=True))["step"] == 2


def test_max_examples_and_the_eval_rows_are_seeded_samples_not_the_first_in_file_order(tmp_path):
    """CUAD lists every NONE example after its clause examples, and the eval rows came longest first: a prefix
    of either held no NONE example."""
    from engine import dist
    from engine.precision import Precision
    from engine.train import _setup_data

    rows = []
    for i in range(40):  # clauses first, then NONE, as CUAD's loader emits them; the clause contexts are longer
        cat, clause, filler = CONTRACTS[i % len(CONTRACTS)]
        none = i >= 20
        rows.append({"id": f"e{i}", "query": cat, "context": filler + ("" if none else clause + " " + filler * 3),
                     "answer": "NONE" if none else clause, "split": "train" if i % 2 else "valid"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)) + "\n")
    cfg = tiny_cfg(tmp_path, max_examples=6, eval_every=1, eval_batches=3, batch_size=2)
    run = _setup_data(cfg, dist.Dist(), tmp_path / "run", Precision("fp32", torch.device("cpu")))
    answer = {r["id"]: r["answer"] for r in rows}
    picked = [answer[ex.id] for unit in run.batcher.units for ex in unit]
    assert len(picked) == 6 and 0 < picked.count("NONE") < 6
    none = run.tok.encode("NONE")
    targets = [[int(t) for t in row if t >= 0] for b in run.eval_batches for row in b["labels"]]
    assert len(targets) == 6 and any(t[:len(none)] == none for t in targets)
    assert not all(t[:len(none)] == none for t in targets)


def test_an_eval_split_too_small_for_the_processes_names_the_split_and_the_way_out(tmp_path):
    """Two processes need at least two eval rows: the error said only '1 samples cannot feed 2 ranks', naming
    neither the data, nor the split, nor what to change."""
    from engine import dist
    from engine.precision import Precision
    from engine.train import _setup_data

    rows = [{"id": f"e{i}", "query": cat, "context": filler + clause + " " + filler, "answer": clause,
             "split": "train" if i else "valid"} for i, (cat, clause, filler) in enumerate(CONTRACTS[:5])]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)) + "\n")
    cfg = tiny_cfg(tmp_path, eval_every=1, batch_size=1)
    with pytest.raises(ValueError, match=r"data.jsonl: eval split 'valid': 1 samples cannot feed 2 ranks .*"
                                         r"--eval-every 0") as e:
        _setup_data(cfg, dist.Dist(rank=0, world_size=2), tmp_path / "run", Precision("fp32", torch.device("cpu")))
    assert "\n" not in str(e.value)


def test_resume_of_a_run_without_checkpoints_is_refused_and_keeps_its_metrics(tmp_path):
    """--save-every 0 leaves no checkpoint: a --resume used to start over from step 0 and write an empty
    metrics.jsonl over the finished run's record."""
    from engine.train import train

    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=0)
    train(cfg)
    before = (Path(cfg.out) / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"--resume: .* logged 2 step\(s\) but no complete checkpoint .*--overwrite"):
        train(dataclasses.replace(cfg, max_steps=4, resume=True))
    assert (Path(cfg.out) / "metrics.jsonl").read_text() == before
    train(dataclasses.replace(cfg, max_steps=4, overwrite=True))  # what the error says to do


@pytest.mark.parametrize("when", ["loading", "step-0 evaluation"])
def test_a_signal_before_the_first_step_stops_without_leaving_a_run(tmp_path, monkeypatch, when):
    """SIGTERM while a 3B model loads (minutes), or during the evaluation before training: the run used to go on
    through the evaluation and one step before it stopped, and left a run behind."""
    from engine import checkpoint as ckpt
    from engine import train as T

    asked = {"now": when == "loading"}
    monkeypatch.setattr(ckpt.StopFlag, "requested", property(lambda self: asked["now"]))
    install = ckpt.StopFlag.install
    monkeypatch.setattr(ckpt.StopFlag, "install", lambda self: setattr(self, "signum", 15) or install(self))
    real = T._Run.evaluate

    def evaluate(self):
        asked["now"] = True
        return real(self)
    monkeypatch.setattr(T._Run, "evaluate", evaluate)
    cfg = tiny_cfg(tmp_path, max_steps=3, eval_every=2)
    res = T.train(cfg)
    assert res["stopped"] and res["signal"] == 15 and res["step"] == 0
    assert not Path(cfg.out).exists()  # nothing of this start is left; the same command starts it again
    asked["now"] = False
    monkeypatch.setattr(T._Run, "evaluate", real)
    assert T.train(cfg)["step"] == 3


def test_lr_schedule_warmup_then_cosine_to_min():
    from engine.step import lr_at

    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, max_steps=14)
    lrs = [lr_at(s, cfg, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert abs(lr_at(14, cfg, 14) - 0.1) < 1e-12 and abs(lrs[9] - 0.55) < 1e-12  # halfway: (1 + 0.1) / 2


def test_too_many_rejected_examples_is_refused_and_nothing_is_written(tmp_path):
    tiny_jsonl(tmp_path / "data.jsonl", bad=1)  # 1 of 8 train answers is not in its context: 12.5% > 1%
    cfg = tiny_cfg(tmp_path)
    r = run_train(cfg_args(cfg))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "rejected" in r.stderr, r.stderr
    assert not Path(cfg.out).exists()
    r = run_train(cfg_args(cfg) + ["--max-rejected", "0.2", "--max-steps", "1"])
    assert r.returncode == 0, r.stderr


def test_bad_model_path_is_one_line_error(tmp_path):
    cfg = tiny_cfg(tmp_path, model=str(tmp_path / "nope"))
    r = run_train(cfg_args(cfg))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr, r.stderr
    assert not Path(cfg.out).exists()


def test_persistent_nonfinite_loss_stops_with_a_report():
    from engine.precision import NonFiniteLoss, Precision

    prec = Precision("fp32", torch.device("cpu"), patience=3)
    prec.check_loss(1.5, 1)
    prec.check_loss(float("nan"), 2)
    prec.check_loss(float("inf"), 3)
    with pytest.raises(NonFiniteLoss, match="3 consecutive steps.*last finite loss 1.5"):
        prec.check_loss(float("nan"), 4)


def test_nonfinite_gradient_skips_the_step_and_counts_an_overflow():
    from engine.precision import Precision

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    prec = Precision("fp32", torch.device("cpu"))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    norm, overflow = prec.clip_and_step(opt, [p], 1.0)
    assert overflow and prec.overflows == 1 and torch.equal(p.detach(), torch.ones(3))


def test_a_skipped_step_does_not_advance_the_learning_rate_schedule(tmp_path, monkeypatch):
    """Steps skipped for an inf/NaN gradient (fp16's first steps while the loss scale finds its level) used to
    count in the schedule: each one used up a warmup step."""
    from engine.train import train
    from tests.conftest import nan_gradient_at_step

    nan_gradient_at_step(monkeypatch, 2)
    cfg = tiny_cfg(tmp_path, max_steps=4, warmup_steps=4, lr=4e-3)
    train(cfg)
    rows = [r for r in read_metrics(cfg.out) if "loss" in r]
    assert [r["overflow"] for r in rows] == [False, True, False, False]
    assert [round(r["lr"], 6) for r in rows] == [1e-3, 2e-3, 2e-3, 3e-3]


def test_fp16_loss_scaler_overflow_is_detected_and_the_step_skipped():
    """The fp16 path's bookkeeping, exercised with a CPU GradScaler: an inf gradient halves the scale, the
    optimizer step is skipped and counted; a clean step then goes through. Both AdamW kinds: the per-parameter
    loop, and the fused kernel the T4 runs (engine.step.make_optimizer on CUDA), to which GradScaler hands the
    overflow flag instead of skipping the call; the weights after the clean step agree."""
    from engine.precision import Precision

    after = []
    for fused in (False, True):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, foreach=False, fused=fused or None)
        prec = Precision("fp32", torch.device("cpu"))
        prec.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        prec.backward((p * torch.tensor([1.0, float("inf"), 1.0])).sum())
        norm, overflow = prec.clip_and_step(opt, [p], 1.0)
        assert overflow and prec.overflows == 1 and prec.scaler.get_scale() == 2.0**15
        assert torch.equal(p.detach(), torch.ones(3))
        opt.zero_grad()
        prec.backward(p.sum())
        norm, overflow = prec.clip_and_step(opt, [p], 1.0)
        assert not overflow and abs(norm - 3 ** 0.5) < 1e-5 and not torch.equal(p.detach(), torch.ones(3))
        assert int(opt.state[p]["step"]) == 1  # the skipped step did not count towards Adam's bias correction
        after.append(p.detach().clone())
    torch.testing.assert_close(after[0], after[1])


def test_generation_eval_logs_task_metrics_on_a_fixed_subset(tmp_path, monkeypatch):
    """eval_generate: extraction scores (not just loss) at step 0 and at each evaluation, same examples each time."""
    import engine.train
    from engine.train import train

    asked, real = [], engine.train.evaluate_for_training
    monkeypatch.setattr(engine.train, "evaluate_for_training",
                        lambda model, tok, subset, **kw: asked.append([ex.id for ex in subset]) or real(model, tok,
                                                                                                       subset, **kw))
    cfg = tiny_cfg(tmp_path, max_steps=4, eval_every=2, eval_generate=2)
    train(cfg)
    rows = [r for r in read_metrics(cfg.out) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert r["eval_n"] == 2 and 0 <= r["eval_avg_similarity"] <= 100 and "eval_exact_match" in r
    assert len(asked) == 3 and len(asked[0]) == 2 and asked[0] == asked[1] == asked[2]


def test_generation_eval_needs_eval_every():
    from engine.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="eval_generate needs eval_every"):
        parse_args(["--eval-generate", "2", "--eval-every", "0"])


# ---- a full disk: one line that says what survived and how to go on -------------------------------------------
def _enospc(*a, **k):
    raise OSError(28, "No space left on device")


def test_a_full_disk_at_a_checkpoint_names_the_intact_one_and_resume_continues(tmp_path, monkeypatch):
    import engine.checkpoint as ckpt
    from engine.train import train

    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2)
    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda t, path, *a, **k: _enospc() if "step-4" in str(path)
                        else real(t, path, *a, **k))
    with pytest.raises(OSError, match=r"No space left on device.*; .*step-2 is intact: once there is room, the "
                                      r"same command with --resume continues from it") as e:
        train(cfg)
    assert "\n" not in str(e.value) and "step-4" not in str(e.value).split(";")[-1]
    assert ckpt.latest(cfg.out).name == "step-2" and not (Path(cfg.out) / "checkpoints" / "step-4.tmp").exists()
    monkeypatch.setattr(ckpt, "save_file", real)
    train(dataclasses.replace(cfg, resume=True))  # what the line says to do
    assert ckpt.latest(cfg.out).name == "step-4"


def test_a_full_disk_at_the_adapter_says_the_weights_were_not_saved(tmp_path, monkeypatch):
    import engine.train
    from engine.train import train

    monkeypatch.setattr(engine.train, "save_adapter", _enospc)
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=0)
    with pytest.raises(OSError, match=r"No space left on device.*; the trained adapter was not saved; there is no "
                                      r"checkpoint to continue from: .*--overwrite") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def test_a_full_disk_at_a_metrics_line_names_metrics_jsonl(tmp_path, monkeypatch):
    import engine.rundir
    from engine.train import train

    real = engine.rundir.json_line
    monkeypatch.setattr(engine.rundir, "json_line", lambda row: _enospc() if row.get("step") == 2 else real(row))
    cfg = tiny_cfg(tmp_path, max_steps=3, save_every=0)
    with pytest.raises(OSError, match=r"metrics\.jsonl: cannot write it \(No space left on device\); step 2's "
                                      r"metrics line was not written; there is no checkpoint") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def test_a_full_disk_does_not_stop_a_run_at_its_lock(tmp_path, monkeypatch):
    """The lock file's pid only names the holder in another run's refusal."""
    import engine.rundir

    real = engine.rundir.os.write
    monkeypatch.setattr(engine.rundir.os, "write", lambda fd, data: _enospc())
    guard = engine.rundir.RunDir(tmp_path / "run").lock()
    monkeypatch.setattr(engine.rundir.os, "write", real)
    guard.release()
