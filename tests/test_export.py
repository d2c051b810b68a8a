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
    assert "library_name: peft" in yaml and f"base_model: {trained['base']}" in yaml
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


def test_push_to_hub_uploads_files_and_card_without_printing_the_token(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SECRET)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "push"
    assert main(["--adapter", str(trained["adapter"]), "--out", str(out), "--push-to-hub", "me/clause-lora",
                 "--private"]) == 0
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
    args = ["--adapter", str(trained["adapter"]), "--push-to-hub", "me/x"]
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
