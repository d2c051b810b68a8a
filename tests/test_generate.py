"""KV-cache decoding equals full recomputation token for token; batching with left padding changes nothing."""
import pytest
import torch

from model import load_model
from model.generate import generate_ids


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (11, 4, 7)]


def test_kv_cache_equals_recompute(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    kw = dict(max_new_tokens=20, stop_ids={2}, pad_id=0)
    assert generate_ids(m, _prompts(), **kw) == generate_ids(m, _prompts(), use_cache=False, **kw)


def test_left_padded_batch_equals_one_by_one(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    kw = dict(max_new_tokens=15, stop_ids={2}, pad_id=0)
    batched = generate_ids(m, _prompts(), **kw)
    assert batched == [generate_ids(m, [p], **kw)[0] for p in _prompts()]
    assert all(len(x) == 15 for x in batched)  # random tiny model: no stop token within 15 steps here


def test_stops_at_stop_token(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    free = generate_ids(m, _prompts()[:1], max_new_tokens=10, stop_ids={-1}, pad_id=0)[0]
    stop = free[4]  # make the 5th generated token a stop token
    cut = generate_ids(m, _prompts()[:1], max_new_tokens=10, stop_ids={stop}, pad_id=0)[0]
    assert cut == free[:free.index(stop)]


def test_sampling_is_seeded(tiny_hf_dir):
    m = load_model(tiny_hf_dir)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(m, _prompts(), max_new_tokens=8, stop_ids={2}, pad_id=0, temperature=1.0,
                            top_p=0.9, generator=g)

    assert run(1) == run(1) and run(1) != run(2)


def test_stopped_says_which_answers_a_stop_token_ended(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    free = generate_ids(m, _prompts()[:1], max_new_tokens=10, stop_ids={-1}, pad_id=0)[0]
    stopped = []
    generate_ids(m, _prompts(), max_new_tokens=10, stop_ids={free[4]}, pad_id=0, stopped=stopped)
    assert stopped[0] is True and len(stopped) == 3
    stopped = []
    generate_ids(m, _prompts(), max_new_tokens=10, stop_ids={-1}, pad_id=0, stopped=stopped)
    assert stopped == [False, False, False]  # cut at max_new_tokens


def test_cli_adapter_alone_runs_on_the_adapters_base(tmp_path, monkeypatch, capsys):
    """--adapter without --model loads the base named in adapter_config.json (as engine.evaluate and
    engine.extract do), not the embedded model the adapter does not fit."""
    import model.generate
    from model import apply_lora, save_adapter
    from tests.test_evaluate import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base")
    m = load_model(str(base))
    apply_lora(m, r=2, alpha=4.0)
    save_adapter(m, tmp_path / "adapter", base_model=str(base))
    loaded = []
    real = model.load_model
    monkeypatch.setattr(model.generate, "load_model", lambda src, **kw: loaded.append(src) or real(src, **kw),
                        raising=False)
    model.generate.main(["--adapter", str(tmp_path / "adapter"), "--prompt", "Copy the clause.",
                         "--max-new-tokens", "2", "--threads", "1"])
    assert loaded == [str(base)] and capsys.readouterr().out.count("\n") == 1


def test_cli_usage_errors_are_one_line(capsys):
    from model.generate import main

    n_gpus = torch.cuda.device_count()
    for argv in (["--prompt", "x", "--max-new-tokens", "0"], [], ["--prompt", "x", "--device", "xyz"],
                 ["--prompt", "x", "--device", "mps"], ["--prompt", "x", "--device", f"cuda:{n_gpus}"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err


def _random_llama(vocab_size):
    """A one-layer random Llama with the given vocabulary (Llama 3.2 3B's 128256 rows: 4 MB at hidden size 16)."""
    from model import Llama, LlamaConfig

    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()


def test_a_contract_spelling_image_generates_with_the_3b_text_vocabulary(llama3_tok):
    """Llama 3.2's tokenizer.json has <|image|> = 128256, one past the 3B text model's rows: written in a prompt
    it was an IndexError; it is text now."""
    from model.generate import generate

    stopped = []
    out = generate(_random_llama(128256), llama3_tok, ["Exhibit A <|image|> attached."], max_new_tokens=2,
                   stopped=stopped)
    assert len(out) == 1 and len(stopped) == 1


def test_token_ids_beyond_the_models_vocabulary_are_a_one_line_error():
    m = _random_llama(320)
    m.source = "tiny-llama"
    with pytest.raises(ValueError, match=r"token id 400 is outside tiny-llama's vocabulary \(vocab_size 320") as e:
        generate_ids(m, [[5, 6], [7, 400]], max_new_tokens=2, stop_ids={2}, pad_id=0)
    assert "\n" not in str(e.value) and "tokenizer" in str(e.value)
