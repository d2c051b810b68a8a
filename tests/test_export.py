"""engine.export: merged checkpoints load in transformers with equal logits, adapters load in peft, the model
card, and push-to-hub against a local fake HfApi (no network)."""
import json
import re

import pytest
import torch

from engine.export import main
from tests.test_evaluate import make_tiny_model_dir

SECRET = "hf_test_token_never_print_me"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model dir and a run dir holding config.json + adapter/ with non-zero LoRA weights."""
    from model import apply_lora, load_model, save_adapter

    root = tmp_path_factory.mktemp("export")
    base = make_tiny_model_dir(root / "base")
    model = load_model(str(base))
    apply_lora(model, r=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # B = 0 after init would make the merge a no-op
    run = root / "run"
    run.mkdir()
    save_adapter(model, run / "adapter", base_model=str(base))
    (run / "config.json").write_text(json.dumps({"data": "acord:../shared/datasets/acord", "lr": 2e-4,
                                                 "seq_len": 1024, "max_steps": 100, "quantize": "nf4"}))
    ids = torch.randint(0, 259, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).float()
    return {"base": base, "adapter": run / "adapter", "ids": ids, "logits": ref}


def _card(path):
    text = path.read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "model card must start with a YAML header"
    return m.group(1), text


def test_merge_loads_in_transformers_with_equal_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "merged"
    # a tiny shard limit forces several shards + the index, as a 3B model would have
    assert main(["--model", str(trained["base"]), "--adapter", str(trained["adapter"]), "--out", str(out),
                 "--merge", "--max-shard-gb", "0.0001"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    assert len([n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]) > 1
    assert not [n for n in names if n.startswith("adapter_")]
    assert not list(tmp_path.glob(".*"))  # no temporary directories left beside OUT

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(trained["ids"]).logits
    torch.testing.assert_close(got, trained["logits"], atol=1e-4, rtol=1e-4)

    from model import load_tokenizer

    ours = load_tokenizer(str(trained["base"]))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "Copy the exact Governing Law clause.\nÉtat 42"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=False) == ours.chat_prompt(text)
    yaml, _ = _card(out / "README.md")
    assert "library_name: transformers" in yaml and "pipeline_tag: text-generation" in yaml


def _bf16_copy(base, path):
    """The base checkpoint stored in bf16, as Llama 3.2's is."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, path)
    for f in path.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return path


def _stored_dtypes(out):
    from safetensors import safe_open

    dtypes = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return dtypes


def test_merge_writes_the_base_checkpoints_dtype(trained, tmp_path):
    """A bf16 base merges into a bf16 checkpoint (half a float32 one), each weight W + B @ A * scaling computed
    in float32 and rounded once, exactly what merge_lora(..., bfloat16) gives; --dtype chooses another."""
    from safetensors.torch import load_file

    from model import load_adapter, load_model
    from model.lora import merge_lora

    base = _bf16_copy(trained["base"], tmp_path / "bf16-base")
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(trained["adapter"]), "--out", str(out), "--merge"]) == 0
    assert _stored_dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = merge_lora(load_adapter(load_model(str(base)), str(trained["adapter"])), torch.bfloat16).state_dict()
    got = load_file(out / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    assert main(["--model", str(base), "--adapter", str(trained["adapter"]), "--out", str(tmp_path / "f32"),
                 "--merge", "--dtype", "fp32"]) == 0
    assert _stored_dtypes(tmp_path / "f32") == {"F32"}


def test_dtype_without_merge_is_a_one_line_error(trained, tmp_path, capsys):
    assert main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "o"), "--dtype", "bf16"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dtype") and "--merge" in err and not (tmp_path / "o").exists()


def test_merge_folds_each_layer_in_place(trained):
    """export --merge folds the adapters into the loaded model itself, layer by layer (model.lora.fold_lora):
    no second model, every tensor in its own memory (the merged weights too), the weights those of merge_lora."""
    import torch.nn as nn

    from model import load_adapter, load_model
    from model.lora import LoRALinear, fold_lora, merge_lora

    model = load_adapter(load_model(str(trained["base"])), str(trained["adapter"]))
    want = merge_lora(model).state_dict()
    kept = {k: p.data_ptr() for k, p in model.named_parameters() if "lora_" not in k}
    folded = fold_lora(model, torch.float32)
    assert folded is model and model.lora_config is None
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == kept
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_adapter_export_loads_in_peft_and_has_a_card(trained, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"data": "acord:x", "split": "test", "overall": {
        "n": 50, "avg_similarity": 71.25, "excellent": 40.0, "good": 60.0, "exact_match": 30.0, "f1": 75.0,
        "abstention_precision": None, "abstention_recall": 50.0}}))
    out = tmp_path / "adapter-out"
    assert main(["--adapter", str(trained["adapter"]), "--out", str(out), "--eval", str(ev)]) == 0
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "tokenizer.json", "README.md"}
    base = transformers.AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(trained["ids"]).logits, trained["logits"], atol=1e-4, rtol=1e-4)

    yaml, text = _card(out / "README.md")
    # a local base: named by its path (peft above read it from adapter_config.json), not as Hub metadata
    assert "library_name: peft" in yaml and "base_model:" not in yaml and f"`{trained['base']}`" in text
    assert "pipeline_tag: text-generation" in yaml and "tags:" in yaml and "- theatticusproject/acord" in yaml
    assert "| avg similarity (0-100) | 71.2 |" in text or "| avg similarity (0-100) | 71.3 |" in text
    assert "| lr | 0.0002 |" in text and "| LoRA r | 4 |" in text and "CC BY 4.0" in text


class FakeHfApi:
    """Records what would go to the Hub: the repo, its privacy and each uploaded file's bytes."""
    calls: list = []

    def __init__(self, token=None, **kw):
        self.token = token

    def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, private, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        FakeHfApi.calls.append(("upload_folder", repo_id, files))


def test_a_local_base_is_named_by_its_absolute_path_with_a_warning(trained, tmp_path, monkeypatch, capsys):
    """A base given as a local directory (here relative) has no Hub id in it: the export names it by its absolute
    path (peft on this machine still finds it), the card makes no Hub link of it, and stderr says so in one line
    with what to pass."""
    monkeypatch.chdir(trained["base"].parent)
    out = tmp_path / "out"
    assert main(["--model", trained["base"].name, "--adapter", str(trained["adapter"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning:") and "\n" not in err and "--base-id ORG/NAME" in err and "local" in err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(trained["base"])
    yaml, card = _card(out / "README.md")
    assert "base_model:" not in yaml and "huggingface.co/" + str(trained["base"]) not in card
    assert f"the local checkpoint `{trained['base']}`" in card


@pytest.mark.parametrize("merge", [False, True])
def test_base_id_names_the_base_in_the_config_and_the_card(trained, tmp_path, capsys, merge):
    out = tmp_path / "out"
    assert main(["--model", str(trained["base"]), "--adapter", str(trained["adapter"]), "--out", str(out),
                 "--base-id", "org/tiny-base", *(["--merge"] if merge else [])]) == 0
    assert "warning" not in capsys.readouterr().err
    if not merge:
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "org/tiny-base"
        # the rest of the config as the adapter's file has it (target_modules in the file's own form)
        assert cfg["target_modules"] == json.loads((trained["adapter"] / "adapter_config.json").read_text())[
            "target_modules"]
    yaml, card = _card(out / "README.md")
    assert "base_model: org/tiny-base" in yaml and "(https://huggingface.co/org/tiny-base)" in card


def test_a_base_in_the_hub_cache_is_named_by_its_repo(trained, tmp_path, capsys):
    """huggingface_hub's cache keeps a snapshot at .../models--ORG--NAME/snapshots/REV: the repo is known."""
    import shutil

    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(trained["base"], snapshot)
    out = tmp_path / "out"
    assert main(["--model", str(snapshot), "--adapter", str(trained["adapter"]), "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    assert "base_model: org/tiny-llama" in _card(out / "README.md")[0]


def test_push_with_a_local_base_and_no_base_id_is_refused_before_anything_is_written(trained, tmp_path,
                                                                                      monkeypatch, capsys):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "push"
    for merge in ([], ["--merge"]):
        assert main(["--adapter", str(trained["adapter"]), "--out", str(out), "--push-to-hub", "me/x", *merge]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --push-to-hub") and "\n" not in err and "--base-id ORG/NAME" in err
        assert FakeHfApi.calls == [] and not out.exists()
    for bad in ("tiny-base", "./org/x", "org/x y"):
        assert main(["--adapter", str(trained["adapter"]), "--out", str(out), "--base-id", bad]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --base-id") and "ORG/NAME" in err and not out.exists()


def test_push_to_hub_uploads_files_and_card_without_printing_the_token(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "push"
    assert main(["--adapter", str(trained["adapter"]), "--out", str(out), "--push-to-hub", "me/clause-lora",
                 "--private", "--base-id", "org/tiny-base"]) == 0
    (c1, repo, private, token), (c2, repo2, files) = FakeHfApi.calls
    assert (c1, repo, private, token, c2, repo2) == ("create_repo", "me/clause-lora", True, SECRET,
                                                     "upload_folder", "me/clause-lora")
    assert set(files) >= {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"}
    assert files["adapter_model.safetensors"] == (trained["adapter"] / "adapter_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: peft\n") and "# me/clause-lora" in card
    assert 'from_pretrained("me/clause-lora")' in card
    cap = capsys.readouterr()
    assert "pushed to https://huggingface.co/me/clause-lora" in cap.out and SECRET not in cap.out + cap.err


def test_push_offline_or_unreachable_is_a_one_line_error(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--adapter", str(trained["adapter"]), "--push-to-hub", "me/x", "--base-id", "org/tiny-base"]
    assert main(args + ["--out", str(tmp_path / "a")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "HF_HUB_OFFLINE" in err
    assert (tmp_path / "a" / "README.md").is_file()  # the export itself is kept, to push later

    class Unreachable(FakeHfApi):
        def create_repo(self, *a, **kw):
            raise ConnectionError(f"Failed to establish a new connection (token {SECRET})")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    assert main(args + ["--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "reach" in err and SECRET not in err


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    assert main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "nope" in err and not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "full")]) != 0
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep me"


def _run_like(trained, root, config: dict, checkpoint: bool = False):
    """A copy of the trained adapter inside a run directory holding `config` as its config.json (as a trainer
    writes it), at OUT/adapter or OUT/checkpoints/step-2/adapter."""
    import shutil

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    adapter = root / "checkpoints" / "step-2" / "adapter" if checkpoint else root / "adapter"
    shutil.copytree(trained["adapter"], adapter)
    return adapter


CHANNEL_RUN = {"data": "cuad:../shared/datasets/cuad", "split": "fit", "unit": "sentence", "groups_per_step": 4,
               "max_steps": 10, "lr": 1e-4}


def test_channel_adapter_export_keeps_channel_decoding_and_its_card_says_so(trained, tmp_path):
    """An engine.channel_train adapter answers by --decode channel: its export keeps the run's config, so
    engine.extract/evaluate --adapter OUT still choose channel decoding with its unit, and the card describes
    scoring paragraphs (here: sentences), not generation. An engine.train adapter's export stays generative."""
    from argparse import Namespace

    from engine.evaluate import choose_decoding

    out = tmp_path / "channel-out"
    assert main(["--adapter", str(_run_like(trained, tmp_path / "chan", CHANNEL_RUN)), "--out", str(out)]) == 0
    assert json.loads((out / "training_config.json").read_text()) == CHANNEL_RUN
    args = Namespace(adapter=str(out), decode=None, channel_unit=None, channel_rule=None, focus_adapter=None)
    choose_decoding(args)
    assert (args.decode, args.channel_unit) == ("channel", "sentence")
    _, card = _card(out / "README.md")
    assert "noisy channel" in card and "--decode channel --channel-unit sentence" in card
    assert "model.generate(" not in card and "| unit | sentence |" in card

    out = tmp_path / "generative-out"
    assert main(["--adapter", str(trained["adapter"]), "--out", str(out)]) == 0
    args = Namespace(adapter=str(out), decode=None, channel_unit=None, channel_rule=None, focus_adapter=None)
    choose_decoding(args)
    assert args.decode == "constrained" and (out / "training_config.json").is_file()
    _, card = _card(out / "README.md")
    assert "noisy channel" not in card and "model.generate(" in card


def test_checkpoint_adapter_export_finds_its_runs_config(trained, tmp_path):
    run_cfg = {"data": "acord:../shared/datasets/acord", "lr": 3e-4, "max_steps": 50, "quantize": "none"}
    adapter = _run_like(trained, tmp_path / "run", run_cfg, checkpoint=True)
    out = tmp_path / "out"
    assert main(["--adapter", str(adapter), "--out", str(out)]) == 0
    _, card = _card(out / "README.md")
    assert "| lr | 0.0003 |" in card and "Training data: `acord:" in card and "Not recorded" not in card
    assert json.loads((out / "training_config.json").read_text()) == run_cfg


@pytest.mark.parametrize("channel", [False, True])
def test_card_usage_snippet_runs_against_the_export(trained, tmp_path, monkeypatch, capsys, channel):
    """The card's Python block, pointed at the export, runs as written (every name it uses defined) on a contract
    file: it prints the model's answer, or for a channel adapter one of the contract's paragraphs or NONE."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    adapter = _run_like(trained, tmp_path / "run", CHANNEL_RUN if channel else {"data": "synthetic"})
    out = tmp_path / "out"
    assert main(["--adapter", str(adapter), "--out", str(out)]) == 0
    capsys.readouterr()
    _, card = _card(out / "README.md")
    code = re.search(r"```python\n(.*?)\n```", card, re.S).group(1)
    assert '"OUT"' in code
    contract = "1. Term. Two years.\n\n2. Governing Law. This Agreement is governed by Ohio law.\n"
    (tmp_path / "contract.txt").write_text(contract, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"OUT"', repr(str(out))), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    if channel:
        assert printed in ("NONE", "1.", "Term.", "Two years.", "2.", "Governing Law.",
                           "This Agreement is governed by Ohio law.")


def test_out_that_would_lose_the_run_or_the_adapter_is_refused(trained, tmp_path, monkeypatch, capsys):
    """--overwrite replaces OUT as a whole: an OUT holding the adapter, the current directory (or one above it),
    or a training run is refused in one line, and nothing in it is touched."""
    run = tmp_path / "runs" / "x"
    adapter = _run_like(trained, run, {"data": "synthetic"})
    other = tmp_path / "other-run"
    other.mkdir()
    (other / ".lock").write_text("123\n")
    inner = tmp_path / "work" / "inner"
    inner.mkdir(parents=True)

    def files():
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    monkeypatch.chdir(inner)
    for out, says in ((run, "holds the adapter"), (adapter, "holds the adapter"), (tmp_path / "runs", "adapter"),
                      (inner, "current directory"), (tmp_path / "work", "current directory"), (".", "current"),
                      (other, "training run")):
        assert main(["--adapter", str(adapter), "--out", str(out), "--overwrite"]) != 0, out
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and says in err, (out, err)
        assert files() == before
