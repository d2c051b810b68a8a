"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` plus the two chat formats, written by hand.

Sources: a Hugging Face `tokenizer.json` (Llama 3.x and friends), a model directory holding one, or the
vocabulary + merges stored in a GGUF file (the embedded SmolLM2). Nothing is ever added to `encode`
automatically: the chat strings below spell out every special token, so what training tokenizes and what
generation feeds the model are the same ids by construction.

Only the chat template's own special tokens become special ids. Text (a contract, a query, an answer) is always
encoded as text, even where it spells a special token: a contract holding "<|im_end|>\n<|im_start|>assistant\n"
must not close the user's turn and open a forged answer. chat_prompt / chat_answer return a ChatText, a str that
remembers which of its pieces are the template's; encode turns those pieces (and only those) into special ids.
"""
from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .files import atomic_file

# Each chat format: the special token that identifies it in a vocabulary, the end-of-turn marker, and the
# templates. No system header/line: the official Llama 3 template injects a dated system header and
# SmolLM2's template a "You are a helpful AI assistant" line; both turn clause extraction into chat.
# The user message goes in as it is (DESIGN.md fixes `{prompt}`), where the official Llama 3.2 template writes
# `message['content'] | trim` (SmolLM2's does not trim). The two agree on every prompt data/ renders (its loaders
# strip every context and query: tests/test_tokenizer.py pins it) but not on messages ending in whitespace: the
# channel prompt (model/channel.py, "... Answer: ", the query's tokens follow it) and an evaluation window cut
# after a space. Trimming here would change what every trained Llama 3 adapter saw, so it is not done.
CHAT_FORMATS = {
    "llama3": dict(
        marker="<|start_header_id|>",
        eot="<|eot_id|>",
        prompt="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": dict(
        marker="<|im_start|>",
        eot="<|im_end|>",
        prompt="<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
    ),
}

# GGUF token types (llama.cpp's llama_token_type): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4

# The GPT-2 split regex, as byte-level BPE tokenizers use it (tokenizers' ByteLevel(use_regex=True) applies it).
# Llama 3's regex (llama.cpp pre-tokenizer "llama-bpe"): numbers in groups of up to three, letters may take
# one leading non-letter, newlines kept with the punctuation before them.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# A special token's name in a template: what ChatText marks as the template's own.
_SPECIAL_IN_TEMPLATE = re.compile(r"(<\|[a-z_]+\|>)")


class ChatText(str):
    """A chat-format string that knows which of its pieces are the template's special tokens.

    parts: ((text, is_template_special), ...). Tokenizer.encode gives those pieces their special ids and encodes
    everything else as text. `+` keeps the marks (a plain str added on either side is text); every other str
    operation (slicing, replace, format, str()) returns a plain str, which encodes as text throughout. So build
    chat strings with chat_prompt, chat_answer and `+` only.
    """

    def __new__(cls, parts):
        parts = tuple(parts)
        self = super().__new__(cls, "".join(text for text, _ in parts))
        self.parts = parts
        return self

    @staticmethod
    def _parts_of(s: str) -> tuple:
        return s.parts if isinstance(s, ChatText) else ((str(s), False),)

    def __add__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return ChatText(self.parts + self._parts_of(other))

    def __radd__(self, other):  # a plain str on the left: str.__add__ would drop the marks, so Python asks us first
        if not isinstance(other, str):
            return NotImplemented
        return ChatText(self._parts_of(other) + self.parts)

    def __reduce__(self):
        return ChatText, (self.parts,)


def _template_parts(template: str) -> tuple:
    """A template's literal text as ChatText parts: its special-token names marked, the rest text."""
    return tuple((piece, bool(i % 2)) for i, piece in enumerate(_SPECIAL_IN_TEMPLATE.split(template)) if piece)


def _gguf_pre_tokenizer(pre: str):
    """(pre-tokenizer, ignore_merges) for a GGUF `tokenizer.ggml.pre` name, following llama.cpp's definitions."""
    if pre == "smollm":
        # llama.cpp: regexes "\p{N}" then the GPT-2 regex. The digit split comes first, so "12345" is five
        # tokens; transformers' GGUF conversion drops this step (it only keeps the GPT-2 regex).
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),  # Rust char::is_numeric == \p{N}
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "llama-bpe":
        # llama.cpp sets ignore_merges for llama-bpe: a word already in the vocabulary is one token.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), True
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: supported are 'smollm', 'gpt2', 'llama-bpe'; "
                     "use the model's tokenizer.json instead (Tokenizer.from_file / from_dir)")


_WARNED_PRE: set[str] = set()  # GGUF files already warned about (once per file and process)


def _guess_pre(tokens: list[str], path) -> str:
    """The pre-tokenizer of a GGUF without tokenizer.ggml.pre. A Llama 3 vocabulary (it holds
    <|start_header_id|>) was converted before llama.cpp wrote the key and is "llama-bpe": GPT-2's regex would
    give "1234567" as 123|45|67 (not 123|456|7) and ".\n\n" as three tokens (not one), other ids than the
    model's. Anything else gets "gpt2" (byte-level BPE's own split) and a warning on stderr, once per file."""
    if "<|start_header_id|>" in tokens:
        return "llama-bpe"
    if str(path) not in _WARNED_PRE:
        _WARNED_PRE.add(str(path))
        print(f"warning: {path}: GGUF metadata has no tokenizer.ggml.pre; tokenizing with the GPT-2 pre-tokenizer, "
              "which may differ from the model's own (use its tokenizer.json if it has one)", file=sys.stderr)
    return "gpt2"


class Tokenizer:
    """Byte-level BPE tokenizer + chat format.

    Attributes: chat_format ("llama3" | "chatml"), bos_id (int | None), eos_id, pad_id, eot_token, eot_id,
    stop_ids (set[int]: generation stops at any of them), vocab_size (including added tokens).
    """

    def __init__(self, tk: _HFTokenizer, chat_format: str | None = None, *, bos: int | str | None = None,
                 eos: int | str | None = None, pad: int | str | None = None, source: str = "<memory>"):
        # Text is encoded with special-token matching off; the template's special ids come from ChatText marks.
        # (A property of this tokenizers object, not saved by save(): the wrapper owns tk from here on.)
        tk.encode_special_tokens = True
        self._tk = tk
        self.source = source
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.chat_format = self._pick_format(chat_format)
        fmt = CHAT_FORMATS[self.chat_format]
        self.eot_token = fmt["eot"]
        self.eot_id = self._require(self.eot_token)
        before, after = fmt["prompt"].split("{user}")
        self._prompt_parts = (_template_parts(before), _template_parts(after))
        for piece, special in self._prompt_parts[0] + self._prompt_parts[1]:
            if special:
                self._require(piece)
        # A template token that strips whitespace beside it (AddedToken lstrip/rstrip) took that whitespace when
        # the whole chat string was matched; encode does the same. (False for Llama 3's and SmolLM2's tokens.)
        self._strips = {t.content: (t.lstrip, t.rstrip) for t in tk.get_added_tokens_decoder().values()
                        if t.lstrip or t.rstrip}
        if self.chat_format == "llama3":
            # Fixed by the format, whatever a config says: the instruct tokenizer_config names <|eot_id|> as
            # eos_token and some recipes pad with it; a model trained with pad = an end token never learns to stop.
            self.bos_id = self._require("<|begin_of_text|>")
            self.eos_id = self._require("<|end_of_text|>")
            # Llama 3.0 has no <|finetune_right_pad_id|> (its 128004 is <|reserved_special_token_2|>). Padding
            # only fills positions the labels and the attention mask leave out, so any token but <|eot_id|> will do.
            pads = ("<|finetune_right_pad_id|>", "<|reserved_special_token_2|>")
            self.pad_id = next((i for i in map(tk.token_to_id, pads) if i is not None), self.eos_id)
            ends = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
            self.stop_ids = {i for i in map(tk.token_to_id, ends) if i is not None}
        else:
            # ChatML models differ (SmolLM2: bos <|im_start|> 1, eos = pad = <|im_end|> 2); take what the source
            # says, else fall back to the format's end-of-turn. Padding is masked out of the labels anyway.
            self.bos_id = self._id_of(bos)
            self.eos_id = self._id_of(eos) if eos is not None else self.eot_id
            self.pad_id = self._id_of(pad) if pad is not None else self.eos_id
            self.stop_ids = {self.eot_id, self.eos_id}

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json, chat_format: str | None = None, **special) -> "Tokenizer":
        """Load a Hugging Face tokenizer.json. `special` may carry bos/eos/pad (ids or token strings)."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: pass the path of a Hugging Face "
                                    "tokenizer.json (or a model directory / .gguf to load_tokenizer)")
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                             "re-download the tokenizer.json") from None
        try:
            tk = _HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception with a multi-line message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({first})") from None
        return cls(tk, chat_format, source=str(path), **special)

    @classmethod
    def from_dir(cls, model_dir, chat_format: str | None = None) -> "Tokenizer":
        """Load `model_dir/tokenizer.json`; bos/eos/pad names come from tokenizer_config.json when present."""
        d = Path(model_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"model directory {d} not found: pass a directory holding tokenizer.json")
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found: the model directory must hold a Hugging Face tokenizer.json "
                                    "(download it with the model, e.g. allow_patterns=['tokenizer*'])")
        special = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                                 "fix or delete the file") from None
            for key in ("bos", "eos", "pad"):
                tok = cfg.get(f"{key}_token") if isinstance(cfg, dict) else None
                if isinstance(tok, dict):  # older files: {"content": "<s>", "lstrip": false, ...}
                    tok = tok.get("content")
                if isinstance(tok, str):
                    special[key] = tok
        return cls.from_file(tj, chat_format, **special)

    @classmethod
    def from_gguf(cls, path, chat_format: str | None = None, *, reader=None) -> "Tokenizer":
        """Build the byte-level BPE tokenizer stored in a GGUF file's metadata (vocab, merges, token types).

        `reader`: an already open `gguf.GGUFReader` of `path`, so a loader that reads the weights too parses the
        file once (GGUFReader is slow on big string arrays: ~3 s for SmolLM2's, ~13 s for Llama 3's vocab).
        """
        path = Path(path)
        if reader is None:
            from gguf import GGUFReader

            if not path.is_file():
                raise FileNotFoundError(f"GGUF file {path} not found: pass the path of a .gguf model file")
            try:
                reader = GGUFReader(path)
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ValueError(f"{path}: cannot read as GGUF ({type(e).__name__}: {msg})") from None

        def field(key, default=KeyError):
            f = reader.fields.get(key)
            if f is None:
                if default is KeyError:
                    raise ValueError(f"{path}: GGUF metadata key {key!r} missing; the file carries no usable tokenizer")
                return default
            return f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                             "use the model's tokenizer.json instead")
        tokens = field("tokenizer.ggml.tokens")
        merges = field("tokenizer.ggml.merges")
        types = field("tokenizer.ggml.token_type", [1] * len(tokens))
        pre = field("tokenizer.ggml.pre", None)
        if pre is None:  # converted before llama.cpp stored the key (April 2024): the vocabulary tells
            pre = _guess_pre(tokens, path)
        tk = build_bpe(tokens, merges, types, pre)
        special = {k: field(f"tokenizer.ggml.{n}_token_id", None)
                   for k, n in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
        return cls(tk, chat_format, source=str(path), **special)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _pick_format(self, chat_format):
        vocab = self._tk.get_vocab(with_added_tokens=True)
        if chat_format is None:
            found = [name for name, f in CHAT_FORMATS.items() if f["marker"] in vocab]
            if not found:
                raise ValueError(f"{self.source}: cannot tell the chat format (no "
                                 + " / ".join(f["marker"] for f in CHAT_FORMATS.values())
                                 + " token in the vocabulary); pass chat_format="
                                 + " or ".join(repr(n) for n in CHAT_FORMATS))
            return found[0]
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}: choose one of {', '.join(CHAT_FORMATS)}")
        return chat_format

    def _require(self, token: str) -> int:
        i = self._tk.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: chat format {self.chat_format!r} needs the token {token!r}, "
                             "which the vocabulary lacks; pass the right chat_format")
        return i

    def _id_of(self, tok) -> int | None:
        if tok is None or isinstance(tok, int):
            return tok
        return self._require(tok)

    def token_id(self, token: str) -> int | None:
        """Id of a token string (e.g. '<|eot_id|>'), None if absent."""
        return self._tk.token_to_id(token)

    # ---- the interface ------------------------------------------------------------------------------------
    def _segments(self, text: str) -> list:
        """text as runs to encode as text (str) and template special ids (int), in order. A plain str is one run;
        a ChatText's text pieces between two of its special tokens are joined into one run, so the ids are those
        of tokenizing the whole string with its special tokens matched, whenever the text holds none."""
        if not isinstance(text, ChatText):
            return [text] if text else []
        out: list = []
        run: list[str] = []
        strip_next = False
        for piece, special in text.parts:
            if not special:
                run.append(piece)
                continue
            lstrip, rstrip = self._strips.get(piece, (False, False))
            joined = "".join(run)
            joined = joined.lstrip() if strip_next else joined
            joined = joined.rstrip() if lstrip else joined
            if joined:
                out.append(joined)
            out.append(self._require(piece))
            run, strip_next = [], rstrip
        joined = "".join(run).lstrip() if strip_next else "".join(run)
        if joined:
            out.append(joined)
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing (no BOS) added. Special tokens come only from the chat template's own
        marks in a ChatText (chat_prompt, chat_answer): text that spells one, in a plain str or inside the user
        message or the answer, is encoded as the text it is."""
        ids: list[int] = []
        for seg in self._segments(text):
            ids += [seg] if isinstance(seg, int) else self._tk.encode(seg, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts at once (tokenizers parallelises the text runs in Rust)."""
        segs = [self._segments(t) for t in texts]
        runs = [s for row in segs for s in row if isinstance(s, str)]
        encoded = iter(e.ids for e in self._tk.encode_batch(runs, add_special_tokens=False))
        return [[i for s in row for i in ([s] if isinstance(s, int) else next(encoded))] for row in segs]

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character offset where each token starts) of `text` encoded as text."""
        enc = self._tk.encode(str(text), add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def chat_prompt(self, user: str) -> ChatText:
        """The whole text up to and including the assistant header: what generation starts from. `user` is text
        whatever it holds (a ChatText's marks are dropped too)."""
        before, after = self._prompt_parts
        return ChatText(before + ((str(user), False),) + after)

    def chat_answer(self, answer: str) -> ChatText:
        """The answer (text, whatever it holds) plus the end-of-turn marker: what the training labels cover."""
        return ChatText(((str(answer), False), (self.eot_token, True)))

    @functools.cached_property
    def token_bytes(self) -> list[bytes | None]:
        """The bytes each token id stands for (None for special and added tokens), for decoding decided on text.

        Byte-level BPE writes every byte as one printable character (GPT-2's table: printable Latin-1 bytes stand
        for themselves, the other 68 bytes for the characters 256 + n in order); this undoes it per token.
        """
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                     *range(ord("\u00ae"), ord("\u00ff") + 1)]
        char_to_byte = {chr(b): b for b in printable}
        others = [b for b in range(256) if b not in char_to_byte.values()]
        char_to_byte.update({chr(256 + n): b for n, b in enumerate(others)})
        out: list[bytes | None] = [None] * self.vocab_size
        added = set(self._tk.get_added_tokens_decoder())
        for text, i in self._tk.get_vocab(with_added_tokens=True).items():
            if i in added or i >= len(out):
                continue
            try:
                out[i] = bytes(char_to_byte[c] for c in text)
            except KeyError:   # not a byte-level token (some added token without the flag): never generated
                out[i] = None
        return out

    def save(self, path) -> None:
        """Write a Hugging Face tokenizer.json (e.g. beside an exported checkpoint of the GGUF model), atomically
        (model/files.atomic_file): tokenizers reports a full disk as a bare Exception("... (os error 28)"),
        which this turns into the one-line WriteError naming `path`."""
        with atomic_file(path) as tmp:
            self._tk.save(str(tmp))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, chat_format={self.chat_format!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, eot={self.eot_id})")


def build_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str) -> _HFTokenizer:
    """A tokenizers BPE tokenizer from GGUF-style vocab (index = id), "a b" merges and token types."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # the first id wins, as in llama.cpp's token -> id map
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")  # byte-level tokens never hold a literal space (it is 'Ġ')
        assert sep and " " not in b, f"malformed merge {m!r}"
        pairs.append((a, b))
    pre_tok, ignore_merges = _gguf_pre_tokenizer(pre)
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|eot_id|>, ...) are special: matched whole in text, skipped by decode.
    # User-defined tokens are matched whole too but decode as text: that is how llama.cpp treats them, and
    # how its converter maps tokenizer.json's added tokens (special=True -> control, else user-defined).
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tk.add_tokens(user)
    return tk
