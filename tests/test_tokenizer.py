"""model.tokenizer: the real Llama 3.2 tokenizer.json and the embedded SmolLM2 GGUF, against transformers."""
import json

import pytest

from model.tokenizer import Tokenizer, build_bpe

# Legal-style text with what byte-level BPE gets wrong most easily: unicode quotes and dashes, digits,
# whitespace runs, tabs, newlines, accents, CJK, an emoji.
LEGAL = ("Section 12.3 “Term”: This Agreement commences on 2024-01-15 and — unless terminated — renews\n\n"
         "for 3 (three) years;   the Licensee’s fee is $1,250,000.\n\t(a) naïve café §4 日本語 🙂  \n")
LEGAL_NO_DIGITS = ("Section “Term”: This Agreement commences hereby and — unless terminated — renews\n\n"
                   "annually;   the Licensee’s fee is payable.\n\t(a) naïve café § 日本語 🙂  \n")


# ---- Llama 3.2 tokenizer.json --------------------------------------------------------------------------------
def test_llama3_special_token_ids(llama3_tok):
    assert llama3_tok.chat_format == "llama3"
    ids = {t: llama3_tok.token_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                                                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                   "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
    assert (llama3_tok.bos_id, llama3_tok.eos_id, llama3_tok.pad_id) == (128000, 128001, 128004)
    assert (llama3_tok.eot_token, llama3_tok.eot_id) == ("<|eot_id|>", 128009)
    # This file is the Llama 3.2 (vision) one: <|image|> is 128256, so 128257 entries; the 3B text model's
    # embedding has 128256 rows. The model config's vocab_size, not this, sizes the embedding.
    assert llama3_tok.vocab_size == 128257


def test_llama3_stop_ids_are_end_tokens_and_never_pad(llama3_tok):
    assert llama3_tok.stop_ids == {128009, 128001, 128008}
    assert llama3_tok.pad_id not in llama3_tok.stop_ids


def llama3_0_tokenizer_json(llama3_tokenizer_json, path, reserved_name="<|reserved_special_token_{}|>"):
    """The Llama 3.2 tokenizer.json with Llama 3.0's special tokens: 128000/128001 begin/end_of_text, the header
    tokens 128006/128007, <|eot_id|> 128009, and every other id up to 128255 <|reserved_special_token_k|> in
    order (so 128004 is <|reserved_special_token_2|>; 3.1 made it <|finetune_right_pad_id|>)."""
    d = json.loads(llama3_tokenizer_json.read_text(encoding="utf-8"))
    k = 0
    for t in d["added_tokens"]:
        if 128002 <= t["id"] <= 128255 and t["id"] not in (128006, 128007, 128009):
            t["content"], k = reserved_name.format(k), k + 1
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


@pytest.mark.parametrize("reserved_name,pad", [("<|reserved_special_token_{}|>", 128004), ("<|other_{}|>", 128001)])
def test_llama3_0_tokenizer_pads_with_its_reserved_token_or_end_of_text(llama3_tokenizer_json, tmp_path,
                                                                         reserved_name, pad):
    tok = Tokenizer.from_file(llama3_0_tokenizer_json(llama3_tokenizer_json, tmp_path / "t.json", reserved_name))
    assert tok.token_id("<|finetune_right_pad_id|>") is None
    assert (tok.chat_format, tok.pad_id, tok.bos_id, tok.eos_id, tok.eot_id) == ("llama3", pad, 128000, 128001, 128009)
    assert tok.stop_ids == {128001, 128009}  # 3.0 has no <|eom_id|>
    assert tok.encode(tok.chat_prompt("Q"))[:2] == [128000, 128006]


def test_llama3_chat_prompt_header_structure(llama3_tok):
    user = "Copy the exact Governing Law clause from this contract."
    ids = llama3_tok.encode(llama3_tok.chat_prompt(user))
    body = llama3_tok.encode(user)
    user_tok, asst_tok, nl2 = llama3_tok.encode("user"), llama3_tok.encode("assistant"), llama3_tok.encode("\n\n")
    assert nl2 == [271] and len(user_tok) == 1 and len(asst_tok) == 1
    assert ids == ([128000, 128006] + user_tok + [128007] + nl2 + body + [128009]
                   + [128006] + asst_tok + [128007] + nl2)
    # Nothing is added automatically: no second BOS, no BOS on plain text.
    assert ids.count(128000) == 1 and llama3_tok.encode("Copy")[0] != 128000


def test_llama3_chat_strings_exact(llama3_tok):
    assert llama3_tok.chat_prompt("Q") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3_tok.chat_answer("NONE") == "NONE<|eot_id|>"
    assert llama3_tok.encode(llama3_tok.chat_answer("NONE"))[-1] == 128009


def test_llama3_ids_match_transformers(llama3_tok, llama3_tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(llama3_tokenizer_json))
    for text in (llama3_tok.chat_prompt("Copy the exact clause.\n\n" + LEGAL), llama3_tok.chat_answer(LEGAL), LEGAL):
        assert llama3_tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_llama3_round_trip(llama3_tok):
    assert llama3_tok.decode(llama3_tok.encode(LEGAL)) == LEGAL
    ids = llama3_tok.encode(llama3_tok.chat_prompt(LEGAL))
    assert llama3_tok.decode(ids, skip_special=False) == llama3_tok.chat_prompt(LEGAL)
    assert llama3_tok.decode(ids) == "user\n\n" + LEGAL + "assistant\n\n"  # specials skipped by default


def test_llama_bpe_builder_matches_tokenizer_json(llama3_tokenizer_json, llama3_tok):
    """The GGUF builder's 'llama-bpe' path, fed Llama 3's own vocab and merges, tokenizes like tokenizer.json.

    (Going through a written GGUF file costs ~13 s of GGUFReader string parsing, so the builder is fed directly.)"""
    d = json.loads(llama3_tokenizer_json.read_text(encoding="utf-8"))
    n = 1 + max(a["id"] for a in d["added_tokens"])
    tokens, types = [None] * n, [1] * n
    for t, i in d["model"]["vocab"].items():
        tokens[i] = t
    for a in d["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4
    built = Tokenizer(build_bpe(tokens, d["model"]["merges"], types, "llama-bpe"))
    text = llama3_tok.chat_prompt(LEGAL) + llama3_tok.chat_answer("12345678 don't  DON'T\r\n x")
    assert built.encode(text) == llama3_tok.encode(text)
    assert (built.bos_id, built.pad_id, built.stop_ids) == (128000, 128004, {128009, 128001, 128008})


# ---- chat format selection -----------------------------------------------------------------------------------
def test_chat_format_override_and_unknown(llama3_tokenizer_json):
    with pytest.raises(ValueError, match="unknown chat_format 'alpaca'"):
        Tokenizer.from_file(llama3_tokenizer_json, chat_format="alpaca")
    with pytest.raises(ValueError, match="<\\|im_end\\|>"):  # chatml forced on a vocab without its tokens
        Tokenizer.from_file(llama3_tokenizer_json, chat_format="chatml")


def test_vocab_without_chat_tokens_is_a_clear_error():
    tk = build_bpe(["a", "b", "ab", "<s>"], ["a b"], [1, 1, 1, 3], "gpt2")
    with pytest.raises(ValueError, match="cannot tell the chat format.*chat_format="):
        Tokenizer(tk)


# ---- SmolLM2 GGUF (the embedded default) ---------------------------------------------------------------------
def test_smollm_chatml_ids(chatml_tok):
    assert chatml_tok.chat_format == "chatml"
    assert chatml_tok.encode("<|im_start|>") == [1] and chatml_tok.encode("<|im_end|>") == [2]
    assert (chatml_tok.bos_id, chatml_tok.eos_id, chatml_tok.pad_id, chatml_tok.eot_id) == (1, 2, 2, 2)
    assert chatml_tok.stop_ids == {2} and chatml_tok.vocab_size == 49152


def test_smollm_chat_prompt(chatml_tok):
    prompt = chatml_tok.chat_prompt("Copy the clause.")
    assert prompt == "<|im_start|>user\nCopy the clause.<|im_end|>\n<|im_start|>assistant\n"
    ids = chatml_tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert ids[-4:] == [1] + chatml_tok.encode("assistant\n")  # "assistant" and "\n" as SmolLM2 expects them
    assert chatml_tok.encode(chatml_tok.chat_answer("NONE"))[-1] == 2


def test_smollm_splits_every_digit(chatml_tok):
    digits = [chatml_tok.token_id(c) for c in "12345"]
    assert chatml_tok.encode("12345") == digits
    assert chatml_tok.encode("In 2024") == chatml_tok.encode("In ") + [chatml_tok.token_id(c) for c in "2024"]


def test_smollm_digit_split_comes_before_the_gpt2_regex(chatml_tok):
    """llama.cpp's "smollm" splits digits first, so a whitespace run before a number stays one piece ("  " is
    token 256, "\\n\\n" is 1116). GPT-2's regex alone (transformers' GGUF conversion) would give " " + " 12"
    and "\\n" + "\\n12": [81, 216, 216, 33, 34] - the difference FACTS.md warns about."""
    tok = chatml_tok
    assert tok.encode("a  12") == [81, 256, 33, 34] == tok.encode("a") + tok.encode("  ") + [33, 34]
    assert chatml_tok.encode("Section\n\n12.3") == chatml_tok.encode("Section") + [1116, 33, 34, 30, 35]


def test_smollm_round_trip(chatml_tok):
    for text in (LEGAL, "a  b   c    d\n\n\n\te", chatml_tok.chat_prompt(LEGAL) + chatml_tok.chat_answer("NONE")):
        assert chatml_tok.decode(chatml_tok.encode(text), skip_special=False) == text
    assert chatml_tok.decode(chatml_tok.encode(LEGAL)) == LEGAL


def test_smollm_matches_transformers_gguf_without_digits(chatml_tok, smollm_gguf):
    """transformers' GGUF tokenizer is the reference for text without digits; it drops llama.cpp's "smollm"
    digit split (FACTS.md), so digits are checked against the per-digit rule above instead. Loading it costs
    ~8 s (it parses the GGUF again), the slowest test here."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    for text in (chatml_tok.chat_prompt("Copy the exact clause.\n\n" + LEGAL_NO_DIGITS), LEGAL_NO_DIGITS,
                 chatml_tok.chat_answer("NONE")):
        assert chatml_tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_saved_gguf_tokenizer_loads_from_dir(chatml_tok, tmp_path):
    """save() writes a tokenizer.json (for exported checkpoints) that from_dir reads back identically."""
    chatml_tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": {"content": "<|im_end|>"}}))
    back = Tokenizer.from_dir(tmp_path)
    assert (back.chat_format, back.bos_id, back.eos_id, back.pad_id, back.stop_ids) == ("chatml", 1, 2, 2, {2})
    assert back.encode(LEGAL) == chatml_tok.encode(LEGAL)


# ---- errors a user can cause: one line, naming the path --------------------------------------------------------
def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, msg


def test_missing_files_name_the_path(tmp_path):
    for ctor, p in ((Tokenizer.from_file, tmp_path / "nope.json"), (Tokenizer.from_gguf, tmp_path / "nope.gguf"),
                    (Tokenizer.from_dir, tmp_path / "nodir"), (Tokenizer.from_dir, tmp_path)):
        with pytest.raises(FileNotFoundError) as e:
            ctor(p)
        _one_line(e, p)


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {')
    with pytest.raises(ValueError) as e:
        Tokenizer.from_file(bad)
    _one_line(e, bad, "malformed JSON")
    bad.write_text('{"version": "1.0"}')  # valid JSON, not a tokenizer
    with pytest.raises(ValueError) as e:
        Tokenizer.from_file(bad)
    _one_line(e, bad, "not a valid tokenizers tokenizer.json")
    with pytest.raises(ValueError) as e:
        Tokenizer.from_dir(tmp_path)
    _one_line(e, bad)


def test_not_a_gguf_names_the_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(bad)
    _one_line(e, bad)


def test_sentencepiece_gguf_is_rejected(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "spm.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(path)
    _one_line(e, path, "'llama'")
