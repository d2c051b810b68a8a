"""What a user meets when --model is wrong: one line naming the file, key or repo and what to do, from the loader
and from ./launch.sh's preflight before torchrun starts N copies; the Hub's failures told apart (gated, not
found, not cached offline, a full cache) and never the token; a checkpoint whose config.json contradicts its
weights refused instead of loaded as another model; and no parsed GGUF reader kept once the model is loaded."""
import errno
import gc
import json
import re
import subprocess
import threading
import traceback
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model, load_tokenizer
from model.load import load_config
from tests.conftest import REPO, save_tiny_hf
from tests.test_load import _hub_cache
from tests.test_launcher import _env

SECRET = "hf_SECRETtoken_doNotPrint123"


def _one_line(e: BaseException) -> str:
    assert "\n" not in str(e), str(e)
    return str(e)


# ---- ./launch.sh's preflight --------------------------------------------------------------------------------
def _preflights():
    from engine import channel_train, train

    return {"engine.train": train.preflight, "engine.channel_train": channel_train.preflight}


@pytest.mark.parametrize("command", ["engine.train", "engine.channel_train"])
@pytest.mark.parametrize("breakage", ["missing", "no-weights", "adapter"])
def test_the_preflight_refuses_a_model_that_would_not_load(tmp_path, capsys, command, breakage):
    """Each trainer's preflight checked the flags, OUT and the data, not --model: a typo was N ranks' errors
    inside torchrun's 40-line report. Now it is the loader's own line, once, and nothing is written to OUT."""
    model = tmp_path / "m"
    if breakage == "no-weights":  # a directory of pickled weights only
        save_tiny_hf(model)
        for f in model.glob("*.safetensors"):
            f.unlink()
        (model / "pytorch_model.bin").write_bytes(b"pickle")
    elif breakage == "adapter":
        model.mkdir()
        (model / "adapter_config.json").write_text("{}")
    out = tmp_path / "out"
    capsys.readouterr()  # (transformers' progress bar, saving the model)
    code = _preflights()[command](["--model", str(model), "--data", "synthetic", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: {model}"), err
    assert {"missing": "no such model directory", "no-weights": "no *.safetensors weights",
            "adapter": "--adapter"}[breakage] in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["engine.train", "engine.channel_train"])
def test_the_preflight_passes_a_loadable_model(tmp_path, capsys, command):
    model = save_tiny_hf(tmp_path / "m")
    capsys.readouterr()
    code = _preflights()[command](["--model", str(model), "--data", "synthetic", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err


def test_the_preflight_reads_a_hub_ids_config_from_the_cache_offline(tmp_path, monkeypatch, capsys, tiny_hf_dir):
    """A hub id: its config.json only (cached here; offline), never the weights; an id not cached is refused."""
    from engine.train import preflight

    _hub_cache(tmp_path, monkeypatch, "acme/tiny-llama", tiny_hf_dir)
    args = ["--data", "synthetic", "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert preflight(["--model", "acme/tiny-llama", *args]) == 0, capsys.readouterr().err
    assert preflight(["--model", "acme/other", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: acme/other: not in the Hugging Face cache"), err


def test_launch_sh_with_a_missing_model_prints_one_line_and_starts_no_workers(tmp_path):
    """The review's case: --nproc 2 and a --model that does not exist printed 42 lines (each rank's error and
    torchrun's report)."""
    r = subprocess.run([str(REPO / "launch.sh"), "--nproc", "2", "--model", str(tmp_path / "nope"), "--data",
                        "synthetic", "--out", str(tmp_path / "out"), "--max-steps", "1"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: {tmp_path / 'nope'}: no such model directory")


# ---- the Hub: which failure, and what to do -------------------------------------------------------------------
class _Hub(BaseHTTPRequestHandler):
    """A Hugging Face endpoint answering every request as the Hub answers a gated repo (403 GatedRepo) or a
    missing one (401 RepoNotFound: also what a private repo gets without a token)."""
    code, error_code = 403, "GatedRepo"

    def _answer(self):
        body = json.dumps({"error": "Access to model acme/x is restricted."}).encode()
        self.send_response(self.code)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Access to model acme/x is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *a):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Start a fake endpoint: hub(code, error_code); huggingface_hub is pointed at it, with a token set."""
    import huggingface_hub.constants as c

    servers = []

    def start(code, error_code):
        handler = type("H", (_Hub,), {"code": code, "error_code": error_code})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        endpoint = f"http://127.0.0.1:{server.server_port}"
        monkeypatch.setattr(c, "ENDPOINT", endpoint)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_TOKEN", SECRET)
        return endpoint

    yield start
    for s in servers:
        s.shutdown()


def _never_the_token(e: BaseException) -> None:
    """Not in the message, nor anywhere in the chain a traceback (or a debugger) could show."""
    seen = "".join(traceback.format_exception(e))
    for x in (e.__cause__, e.__context__):
        if x is not None:
            seen += "".join(traceback.format_exception(x)) + repr(x) + repr(vars(x))
    assert SECRET not in seen


@pytest.mark.parametrize("load", [load_model, load_config])
def test_a_gated_repo_says_where_to_ask_for_access(hub, load):
    endpoint = hub(403, "GatedRepo")
    with pytest.raises(OSError) as e:
        load("acme/gated")
    assert _one_line(e.value) == (f"acme/gated is gated: request access at {endpoint}/acme/gated and log in "
                                  "(hf auth login or HF_TOKEN)")
    _never_the_token(e.value)


@pytest.mark.parametrize("load", [load_model, load_config])
def test_a_repo_the_hub_does_not_have_says_so_and_that_no_local_directory_has_the_name(hub, load):
    hub(401, "RepoNotFound")
    with pytest.raises(OSError) as e:
        load("acme/typo")
    msg = _one_line(e.value)
    assert msg.startswith("acme/typo: no such model on the Hugging Face Hub, or a private one")
    assert "hf auth login" in msg and msg.endswith("there is no local directory acme/typo either")
    _never_the_token(e.value)


def test_a_mistyped_local_path_shaped_like_org_name_says_there_is_no_such_directory(tmp_path, monkeypatch,
                                                                                    tiny_hf_dir):
    _hub_cache(tmp_path, monkeypatch, "acme/tiny-llama", tiny_hf_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(OSError) as e:
        load_model("models/tiny-lama")
    msg = _one_line(e.value)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "no local directory models/tiny-lama" in msg


def test_a_full_cache_disk_names_the_cache_and_says_free_disk_space(tmp_path, monkeypatch):
    """huggingface_hub writes its blobs with plain open(): a full disk is OSError 28 (seen on a 300 KB tmpfs)."""
    import huggingface_hub
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    with pytest.raises(OSError) as e:
        load_model("acme/big")
    assert _one_line(e.value) == (f"{tmp_path / 'cache'}: cannot download acme/big into this Hugging Face cache "
                                  "(No space left on device); free disk space, or set HF_HUB_CACHE to a cache "
                                  "elsewhere")


def test_an_unforeseen_error_is_not_disguised_as_a_network_problem(monkeypatch):
    import huggingface_hub

    def bug(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        load_model("acme/any")


# ---- a hub snapshot cached in part -----------------------------------------------------------------------------
def _fetch_command(msg: str) -> list[str]:
    """The --include patterns of the `hf download` command the message gives."""
    m = re.search(r"hf download (\S+) --include '([^']+)'", msg)
    assert m, msg
    return [m[2]]


def test_a_hub_id_whose_cache_holds_only_its_tokenizer_says_the_weights_are_not_cached(tmp_path, monkeypatch,
                                                                                       tiny_hf_dir):
    """data.check --tokenizer ORG/NAME caches the tokenizer files only; loading the model offline then said
    "no *.safetensors weights (pickled .bin/.pth are not loaded...)", as if the repo had none."""
    for f in tiny_hf_dir.glob("*.safetensors"):
        f.unlink()
    _hub_cache(tmp_path, monkeypatch, "acme/tiny-llama", tiny_hf_dir)
    with pytest.raises(OSError) as e:
        load_model("acme/tiny-llama")
    msg = _one_line(e.value)
    assert msg.startswith("acme/tiny-llama: its weights (model*.safetensors) are not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in msg and "hf download acme/tiny-llama" in msg


def test_a_hub_snapshot_missing_a_shard_names_it(tmp_path, monkeypatch):
    src = save_tiny_hf(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].unlink()
    _hub_cache(tmp_path, monkeypatch, "acme/sharded", src)
    with pytest.raises(OSError) as e:
        load_model("acme/sharded")
    msg = _one_line(e.value)
    assert msg.startswith(f"acme/sharded: its weight shard {shards[-1].name} is not in the Hugging Face cache")


def test_the_download_command_offered_fetches_the_weights_the_loader_reads():
    """The pattern in the advice, matched as huggingface_hub matches it (fnmatch), against Llama 3.2 3B
    Instruct's files: every top-level weight file and the index, nothing from original/."""
    import huggingface_hub.constants as c

    from model.load import _weights_not_cached

    offline = c.HF_HUB_OFFLINE
    try:
        c.HF_HUB_OFFLINE = True
        (pattern,) = _fetch_command(str(_weights_not_cached("meta-llama/Llama-3.2-3B-Instruct", "x", Path("."))))
    finally:
        c.HF_HUB_OFFLINE = offline
    weights = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    others = ["original/consolidated.00.pth", "original/params.json", "tokenizer.json", "README.md"]
    assert [f for f in weights + others if fnmatch(f, pattern)] == weights


# ---- local directories people pass by mistake ----------------------------------------------------------------
def test_an_adapter_directory_is_named_an_adapter(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "adapter")
    msg = _one_line(e.value)
    assert "a LoRA adapter" in msg and "--adapter" in msg and "--init-adapter" in msg


def test_a_shape_preset_name_is_refused_as_having_no_weights():
    assert load_config("llama-3.2-3b").num_hidden_layers == 28  # what presets are for
    with pytest.raises(ValueError) as e:
        load_model("llama-3.2-3b")
    assert _one_line(e.value).startswith("llama-3.2-3b: a shape preset for engine.memory and engine.bench")


def test_a_directory_holding_a_gguf_file_names_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=re.escape(f"pass the file itself: {tmp_path / 'm' / 'model.gguf'}")):
        load_model(tmp_path / "m")


# ---- files that are not what they should be ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_json_file_saved_as_utf16_is_named(tmp_path, name):
    """Notepad's "Unicode" is UTF-16: the error was "'utf-8' codec can't decode byte 0xff", without a file."""
    src = save_tiny_hf(tmp_path / "m", max_shard_size="100KB")
    f = src / name
    f.write_text(f.read_text(encoding="utf-8"), encoding="utf-16")
    with pytest.raises(ValueError) as e:
        load_model(src)
    assert _one_line(e.value).startswith(f"{f}: not UTF-8 text")


def test_tie_word_embeddings_as_a_string_is_refused(tiny_hf_dir):
    """bool("false") is True: the quoted value tied the embeddings (and dropped the stored lm_head)."""
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = "false"
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_config(tiny_hf_dir)
    assert _one_line(e.value).startswith(f"{tiny_hf_dir / 'config.json'}: tie_word_embeddings must be true or false")


def _retie(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))


def test_a_tied_config_over_a_different_stored_lm_head_is_refused(tiny_hf_dir):
    """The model the weights describe computes with its lm_head; tying would silently drop it (transformers'
    logits and ours then differed by 1.34)."""
    _retie(tiny_hf_dir)
    with pytest.raises(ValueError) as e:
        load_model(tiny_hf_dir)
    msg = _one_line(e.value)
    assert msg.startswith(f"{tiny_hf_dir / 'model.safetensors'}: lm_head.weight differs from model.embed_tokens")
    assert "set tie_word_embeddings to false" in msg


def test_a_tied_config_over_an_equal_stored_lm_head_loads(tiny_hf_dir):
    sd = load_file(tiny_hf_dir / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tiny_hf_dir / "model.safetensors", metadata={"format": "pt"})
    _retie(tiny_hf_dir)
    m = load_model(tiny_hf_dir, dtype=torch.bfloat16)
    assert m.lm_head.weight is m.model.embed_tokens.weight


# ---- the GGUF reader ----------------------------------------------------------------------------------------
def _readers() -> int:
    from gguf import GGUFReader

    gc.collect()
    return sum(type(o) is GGUFReader for o in gc.get_objects())  # (type: isinstance trips lazy modules' warnings)


def test_no_gguf_reader_outlives_loading_the_model_and_its_tokenizer(smollm):
    """The reader was kept (lru_cache) for the process's life: ~150 MiB of numpy views of SmolLM2's vocabulary,
    its docstring said free. smollm: load_model then load_tokenizer of the embedded GGUF."""
    assert _readers() == 0


def test_the_tokenizer_after_the_model_reads_the_gguf_once_and_equals_one_from_a_reader(smollm, smollm_gguf,
                                                                                          monkeypatch):
    from model import load as load_mod
    from model.tokenizer import Tokenizer

    parsed = []
    real = load_mod.gguf_reader
    monkeypatch.setattr(load_mod, "gguf_reader", lambda p: parsed.append(p) or real(p))
    tok = load_tokenizer(smollm_gguf)  # smollm has just decoded this file's metadata
    assert parsed == []
    text = "Copy the exact Governing Law clause from this contract. Ünïcode ✓"
    assert tok.encode(text) == Tokenizer.from_gguf(smollm_gguf).encode(text) == smollm[1].encode(text)
    assert tok.eos_id == smollm[1].eos_id and tok.chat_format == smollm[1].chat_format
    assert _readers() == 0


def test_no_gguf_reader_outlives_loading_the_tokenizer_alone(smollm_gguf, monkeypatch):
    """data.check --tokenizer smollm2-135m, or engine.train's order (the tokenizer first): the reader parsed for
    the tokenizer is dropped too; only its decoded metadata is kept."""
    from model import load as load_mod

    monkeypatch.setattr(load_mod, "_GGUF_FIELDS", {}, raising=False)  # as in a fresh process
    assert load_tokenizer(smollm_gguf).encode("Governing Law")
    assert _readers() == 0
