"""Adapters in PEFT's on-disk layout, both ways: ours load in PEFT with equal logits, PEFT's load into ours, and
every malformed file is a one-line error naming the file and key."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import apply_lora, load_adapter, load_model, save_adapter
from model.lora import lora_state_dict
from tests.conftest import save_tiny_hf
from tests.test_lora import hf_logits, ids, our_logits, randomize_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_in_peft_with_equal_logits(hf_dir, tmp_path, use_rslora):
    ours = apply_lora(load_model(hf_dir), r=4, alpha=8, use_rslora=use_rslora)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model=str(hf_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    torch.testing.assert_close(our_logits(ours, x), hf_logits(peft_model, x), rtol=0, atol=1e-4)
    # the adapter is not a no-op: the logits moved away from the base model's
    assert (our_logits(load_model(hf_dir), x) - our_logits(ours, x)).abs().max() > 1e-2


def save_peft_adapter(hf_dir, path, perturb="lora_B", **config):
    """An adapter made and saved by PEFT on the tiny model (LoraConfig(**config), r 8, alpha 16 unless given), its
    `perturb` matrices (lora_B: zero at init) set to random values; returns the PEFT model in eval mode."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "task_type": "CAUSAL_LM", **config}
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if perturb and perturb in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(path)
    return peft_model.eval()


def test_peft_adapter_loads_into_ours_with_equal_logits(hf_dir, tmp_path):
    peft_model = save_peft_adapter(hf_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    ours = load_adapter(load_model(hf_dir), tmp_path / "adapter")  # applies LoRA from adapter_config.json
    assert sorted(ours.lora_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert ours.lora_config["r"] == 8 and len(lora_state_dict(ours)) == 2 * 3 * 2
    x = ids(seed=3)
    torch.testing.assert_close(our_logits(ours, x), hf_logits(peft_model, x), rtol=0, atol=1e-4)


def test_a_peft_config_with_every_field_at_its_default_loads(hf_dir, tmp_path):
    """PEFT writes every LoraConfig field, each variant's at its "off" default: a plain adapter loads."""
    save_peft_adapter(hf_dir, tmp_path / "a", target_modules=["q_proj"])
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    every = set(peft.LoraConfig().to_dict())
    assert every <= set(saved), every - set(saved)
    assert {"alora_invocation_tokens", "use_qalora", "use_bdlora", "velora_config", "kasa_config"} <= set(saved)
    load_adapter(load_model(hf_dir), tmp_path / "a")


@pytest.mark.parametrize("target_modules", [
    r".*\.(q_proj|v_proj|down_proj)",  # a regex string: PEFT fullmatches it against each module's path
    ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],  # dotted suffixes
    "all-linear",  # saved as every module's full path on a model with fewer than 20 of them
], ids=["regex", "dotted", "all-linear"])
def test_peft_target_module_forms_load_with_equal_logits(hf_dir, tmp_path, target_modules):
    peft_model = save_peft_adapter(hf_dir, tmp_path / "a", target_modules=target_modules)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    if target_modules == "all-linear":
        assert "model.layers.0.self_attn.q_proj" in saved and len(saved) == 2 * 7
    ours = load_adapter(load_model(hf_dir), tmp_path / "a")
    want = ALL if target_modules == "all-linear" else ["q_proj", "v_proj", "down_proj"]
    assert sorted(ours.lora_config["target_modules"]) == sorted(want)
    x = ids(seed=4)
    torch.testing.assert_close(our_logits(ours, x), hf_logits(peft_model, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("target_modules,says", [
    (["self_attn.up_proj"], "are not linear layers of this Llama"),
    (["lm_head"], "are not linear layers of this Llama"),
    (r".*(q_proj|lm_head)", "also selects lm_head"),
    (r"encoder\..*", "selects no linear layer"),
    (r"(q_proj", "not a valid regex"),
    (r"model\.layers\.0\.self_attn\.q_proj", "covers only some layers of q_proj"),
])
def test_target_modules_we_cannot_load_are_one_line_errors(hf_dir, tmp_path, target_modules, says):
    """Names that are not a Llama's decoder linears are refused by name; a regex (or full paths) naming some
    layers only is refused when its weights miss the other layers, saying so."""
    save_adapter(apply_lora(load_model(hf_dir), r=4, targets=["q_proj"]), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), target_modules=target_modules)))
    if says.startswith("covers"):  # the weights of layer 0 only, as PEFT saves them for this regex
        weights = tmp_path / "a" / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(weights).items() if ".layers.0." in k}, weights)
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        load_adapter(load_model(hf_dir), tmp_path / "a")
    assert "\n" not in str(e.value) and "adapter_" in str(e.value)


def test_an_adapter_with_dropout_loads_into_an_eval_model_in_eval_mode(hf_dir, tmp_path):
    """load_model returns an eval-mode model; the LoRA layers load_adapter adds (with the recipe's dropout) must
    not switch dropout on in it: extract, the demo and generate never call eval() again."""
    trained = apply_lora(load_model(hf_dir), r=4, alpha=8, dropout=0.1)
    randomize_adapters(trained)
    save_adapter(trained, tmp_path / "a")
    model = load_adapter(load_model(hf_dir), tmp_path / "a")
    assert not model.training and not any(m.training for m in model.modules())
    x = ids(seed=5)
    first, second = our_logits(model, x), our_logits(model, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # and it is the trained adapter, dropout off: the logits of the model it was saved from, in eval mode
    torch.testing.assert_close(first, our_logits(trained.eval(), x), rtol=0, atol=0)
    # a model in training mode gets its LoRA layers in training mode (dropout on), as before
    assert all(m.training for m in apply_lora(load_model(hf_dir).train(), r=4, dropout=0.1).modules())


def test_adapter_files_hold_only_lora_weights_in_peft_layout(hf_dir, tmp_path):
    model = apply_lora(load_model(hf_dir), r=4, alpha=8, dropout=0.05)
    save_adapter(model, tmp_path / "a", base_model="org/base")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    pattern = re.compile(r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight")
    assert keys and all(pattern.fullmatch(k) for k in keys)
    assert len(keys) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (4, 128)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] == (64, 4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    assert sorted(cfg["target_modules"]) == sorted(ALL)
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["use_rslora"] is False
    assert cfg["fan_in_fan_out"] is False and cfg["inference_mode"] is True
    peft.LoraConfig.from_pretrained(tmp_path / "a")  # PEFT accepts every field


def test_saving_again_replaces_the_adapter_directory(hf_dir, tmp_path):
    model = apply_lora(load_model(hf_dir), r=4, targets=["q_proj"])
    save_adapter(model, tmp_path / "a")
    randomize_adapters(model, seed=5)
    save_adapter(model, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directories left behind
    again = load_adapter(load_model(hf_dir), tmp_path / "a")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(again)[k], v)


def test_load_adapter_shape_mismatch_is_a_one_line_error_naming_the_key(hf_dir, tmp_path):
    save_adapter(apply_lora(load_model(hf_dir), r=4), tmp_path / "a")
    model = apply_lora(load_model(hf_dir), r=8)
    with pytest.raises(ValueError) as e:
        load_adapter(model, tmp_path / "a")
    msg = str(e.value)
    assert "\n" not in msg and "adapter_model.safetensors" in msg
    assert re.search(r"base_model\.model\.model\.layers\.\d+\.\w+\.\w+_proj\.lora_[AB]\.weight has shape", msg)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_adapter(model, tmp_path / "nowhere")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("r"), "r must be a positive integer"),
    (lambda c: c.update(r="4"), "r must be a positive integer"),
    (lambda c: c.update(r=1 << 30), "has rank 4"),  # refused from the header, before allocating anything
    (lambda c: c.update(lora_alpha=None), "lora_alpha must be a positive number"),
])
def test_bad_adapter_config_is_a_one_line_error_before_allocating(hf_dir, tmp_path, edit, match):
    save_adapter(apply_lora(load_model(hf_dir), r=4), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(load_model(hf_dir), tmp_path / "a")
    assert "\n" not in str(e.value) and "adapter_config.json" in str(e.value)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_adapter(load_model(hf_dir), tmp_path / "a")


def test_a_relative_local_base_model_is_stored_absolute(hf_dir, tmp_path, monkeypatch):
    """`--model models/llama32` must still name the model when evaluate runs from another directory."""
    monkeypatch.chdir(hf_dir.parent)
    model = apply_lora(load_model(hf_dir.name), r=2)
    assert model.source == hf_dir.name
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "b", base_model=f"./{hf_dir.name}")  # what train passes: cfg.model as typed
    for d in ("a", "b"):
        base = json.loads((tmp_path / d / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert os.path.isabs(base) and os.path.samefile(base, hf_dir)
    for name in ("org/base", "smollm2-135m"):  # hub ids and the embedded name are not paths
        save_adapter(model, tmp_path / "c", base_model=name)
        assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["base_model_name_or_path"] == name


def test_a_relative_base_model_is_found_beside_the_adapter(tmp_path, monkeypatch):
    """Adapters saved before paths were stored absolute: the base is looked up relative to the adapter too."""
    from engine.evaluate import _base_of_adapter

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "model").mkdir()
    for base, want in [("../model", "run/adapter/../model"), ("org/base", "org/base"),
                       ("smollm2-135m", "smollm2-135m")]:
        (tmp_path / "run" / "adapter" / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
        monkeypatch.chdir(tmp_path)  # "../model" is not there from here
        assert _base_of_adapter("run/adapter") == want
        monkeypatch.chdir(tmp_path / "run" / "adapter")  # from here it is: the cwd still wins
        assert _base_of_adapter(".") == base


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "lora_ga"])
def test_adapters_made_for_a_modified_base_are_refused(hf_dir, tmp_path, init):
    """PiSSA, OLoRA, LoftQ, CorDA and LoRA-GA start by rewriting the base weights (PEFT's tuners/lora/layer.py):
    on the original base the adapter computes something else. Orthogonal, EVA and MiCA set only A and B, on the
    unchanged base, and load."""
    save_adapter(apply_lora(load_model(hf_dir), r=4), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    for ok in (False, "gaussian", "orthogonal", "eva", "mica"):
        path.write_text(json.dumps(dict(json.loads(path.read_text()), init_lora_weights=ok)))
        load_adapter(load_model(hf_dir), tmp_path / "a")
    path.write_text(json.dumps(dict(json.loads(path.read_text()), init_lora_weights=init)))
    with pytest.raises(ValueError, match=rf"adapter_config.json: init_lora_weights='{init}' is not supported") as e:
        load_adapter(load_model(hf_dir), tmp_path / "a")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("init,trained", [("orthogonal", "lora_B"), ("mica", "lora_A")])
def test_peft_adapters_initialised_on_the_unchanged_base_load_with_equal_logits(hf_dir, tmp_path, init, trained):
    """Orthogonal init (A and B from orthogonal halves of one matrix, so B @ A = 0) and MiCA (B from the base's
    SVD, A zero) leave the base weights as they are: the adapter is plain LoRA on the original base. The factor
    PEFT trains (MiCA freezes B) is set to random values, as training would."""
    peft_model = save_peft_adapter(hf_dir, tmp_path / "a", perturb=trained, init_lora_weights=init,
                                   target_modules=["q_proj", "k_proj", "up_proj"])
    ours = load_adapter(load_model(hf_dir), tmp_path / "a")
    x = ids(seed=6)
    torch.testing.assert_close(our_logits(ours, x), hf_logits(peft_model, x), rtol=0, atol=1e-4)
    assert (our_logits(load_model(hf_dir), x) - our_logits(ours, x)).abs().max() > 1e-3  # not a no-op


def _edit_config(**fields):
    def make(hf_dir, path):
        save_adapter(apply_lora(load_model(hf_dir), r=4, targets=["q_proj"]), path)
        cfg = path / "adapter_config.json"
        cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), **fields)))
    return make


def _made_by_peft(**config):
    def make(hf_dir, path):
        save_peft_adapter(hf_dir, path, **config)
    return make


def _bdlora_by_peft(hf_dir, path):
    from peft.tuners.lora.config import BdLoraConfig

    bd = BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)
    save_peft_adapter(hf_dir, path, target_modules=["q_proj", "o_proj"], use_bdlora=bd)


VARIANTS = {
    "alora_invocation_tokens": _made_by_peft(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6]),
    "use_bdlora": _bdlora_by_peft,  # lora_B [out, r / nblocks]: was refused as a shape mismatch, misleadingly
    "trainable_token_indices": _made_by_peft(target_modules=["q_proj"], trainable_token_indices=[3, 4]),
    "use_qalora": _edit_config(use_qalora=True),
    "velora_config": _edit_config(velora_config={"num_groups": 64, "init_type": "batch_average", "scale": 1.0}),
    "monteclora_config": _edit_config(monteclora_config={"use_monteclora": True}),
    "arrow_config": _edit_config(arrow_config={"top_k": 3}),
    "kasa_config": _edit_config(kasa_config={"beta": 1e-4}),
    "megatron_config": _edit_config(megatron_config={"tensor_model_parallel_size": 2}),
    "use_hypothetical_lora": _edit_config(use_hypothetical_lora=True),  # a variant of a future PEFT
    "hypothetical_config": _edit_config(hypothetical_config={"k": 2}),
}


@pytest.mark.parametrize("key", VARIANTS)
def test_peft_variants_are_refused_naming_the_field(hf_dir, tmp_path, key):
    """aLoRA, BD-LoRA, QALoRA, trainable tokens, VeLoRA, MonteCLoRA, Arrow, KaSA, Megatron and any field we do
    not know (a later PEFT's variant) store lora_A / lora_B keys that mean something else than plain LoRA: loading
    them as plain LoRA would compute another model without a word (or fail on a shape, for BD-LoRA)."""
    VARIANTS[key](hf_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=rf"adapter_config.json: .*{key}=.*only plain LoRA loads") as e:
        load_adapter(load_model(hf_dir), tmp_path / "a")
    assert "\n" not in str(e.value)
    unknown = key in ("use_hypothetical_lora", "hypothetical_config")
    assert ("remove it from the file" in str(e.value)) == unknown


@pytest.mark.parametrize("off", [None, False, {}, [], ""])
def test_an_unknown_field_left_off_loads(hf_dir, tmp_path, off):
    _edit_config(use_hypothetical_lora=off)(hf_dir, tmp_path / "a")
    load_adapter(load_model(hf_dir), tmp_path / "a")
