"""Qwen2.5 byte-level BPE tokenizer with Long-VITA's 17 special tokens, on the `tokenizers` library.

Source: Qwen2's tokenizer (vocab.json + merges.txt, NFC, the Qwen2 split regex, byte-level mapping without
prefix space, no BOS) and Long-VITA's added tokens (ids 151665..151681). See LONG_VITA.md section 2.
No transformers at run time.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BASE_VOCAB_SIZE = 151643  # ids 0..151642 are BPE tokens; added tokens start here
FIRST_QWEN_ADDED_ID = 151643
LAST_QWEN_ADDED_ID = 151664
FIRST_LONG_VITA_ID = 151665

# Qwen2.5's 22 added tokens, ids 151643..151664: (content, special).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# Long-VITA's special tokens, in id order from 151665.
LONG_VITA_TOKENS: tuple[str, ...] = (
    "<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>", "<patch>", "</patch>",
    "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<image>", "<video>",
)
LONG_VITA_IDS = {tok: FIRST_LONG_VITA_ID + k for k, tok in enumerate(LONG_VITA_TOKENS)}

# ChatML without a default system prompt, written into saved tokenizer_config.json files so that
# transformers' apply_chat_template agrees with processing.prompt.apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CONFIG_DEFAULTS = {
    "add_bos_token": False, "add_prefix_space": False,
    "additional_special_tokens": [t for t, s in QWEN25_ADDED_TOKENS[1:14] if s],
    "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
    "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
    "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
}


def default_tokenizer_path() -> str:
    """Directory of the packaged Qwen2.5 tokenizer (vocab.json.gz, merges.txt.gz, tokenizer_config.json).

    Lets the library work offline. Returns an absolute path (str)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "qwen2_tokenizer")


def _find(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def read_merges(path: str) -> list[tuple[str, str]]:
    """Parse a merges.txt (optionally .gz): LF or CRLF line ends, optional "#version" first line.

    Returns the merge pairs in rank order. Raises ValueError on a line that is not two tokens."""
    merges = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'left right' merge, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_from_files(directory: str) -> list[tuple[int, dict]] | None:
    """Added tokens (id, fields) from tokenizer_config.json, else tokenizer.json, else None."""
    cfg = _find(directory, "tokenizer_config.json")
    if cfg is not None:
        decoder = json.loads(_read_text(cfg)).get("added_tokens_decoder")
        if decoder:
            return sorted((int(k), v) for k, v in decoder.items())
    tj = _find(directory, "tokenizer.json")
    if tj is not None:
        return sorted((int(t["id"]), t) for t in json.loads(_read_text(tj)).get("added_tokens", []))
    return None


class LongVITATokenizer:
    """Qwen2.5 BPE + Long-VITA special tokens (ids 151665..151681); vocabulary size 151682.

    Build with `from_pretrained(dir)` or directly from a vocab dict (151643 entries, ids 0..151642) and
    merge pairs. `added_tokens`: (id, content, special) for ids 151643..151664; None -> Qwen2.5's 22.
    Raises ValueError if any token would not get the id Long-VITA's checkpoints use."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 added_tokens: Sequence[tuple[int, str, bool]] | None = None):
        if len(vocab) != BASE_VOCAB_SIZE or set(vocab.values()) != set(range(BASE_VOCAB_SIZE)):
            raise ValueError(f"vocab: expected {BASE_VOCAB_SIZE} tokens with ids 0..{BASE_VOCAB_SIZE - 1}, "
                             f"received {len(vocab)} tokens")
        if added_tokens is None:
            added_tokens = [(FIRST_QWEN_ADDED_ID + k, c, s) for k, (c, s) in enumerate(QWEN25_ADDED_TOKENS)]
        self._vocab = dict(vocab)
        self._merges = [tuple(m) for m in merges]
        tok = Tokenizer(BPE(vocab=self._vocab, merges=self._merges, dropout=None, unk_token=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                            byte_fallback=False, ignore_merges=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        self._added: list[tuple[int, str, bool]] = []
        for want_id, content, special in sorted(added_tokens):
            self._add(tok, want_id, content, special)
        for content, want_id in LONG_VITA_IDS.items():
            self._add(tok, want_id, content, True)
        self._tok = tok
        self._init_ids()

    def _add(self, tok: Tokenizer, want_id: int, content: str, special: bool) -> None:
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
        got = tok.token_to_id(content)
        if got != want_id:
            raise ValueError(f"added token {content!r}: expected id {want_id}, received id {got}")
        self._added.append((want_id, content, special))

    def _init_ids(self) -> None:
        t = self.token_to_id
        self.bos_token_id = self.pad_token_id = t("<|endoftext|>")
        self.eos_token_id = self.im_end_id = t("<|im_end|>")
        self.im_start_id = t("<|im_start|>")
        self.image_token_id, self.video_token_id = t("<image>"), t("<video>")
        self.img_start_id, self.img_end_id, self.img_context_id = t("<img>"), t("</img>"), t("<IMG_CONTEXT>")
        self.vid_start_id, self.vid_end_id, self.vid_context_id = t("<vid>"), t("</vid>"), t("<VID_CONTEXT>")
        self.patch_start_id, self.patch_end_id, self.patch_context_id = (
            t("<patch>"), t("</patch>"), t("<PATCH_CONTEXT>"))
        newline = self.encode("\n")
        if len(newline) != 1:
            raise ValueError(f"'\\n' must be one token, received {newline}")
        self.newline_id = newline[0]
        if (self.eos_token_id, self.bos_token_id) != (151645, 151643):
            raise ValueError(f"eos/bos: expected 151645/151643, received {self.eos_token_id}/{self.bos_token_id}")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LongVITATokenizer":
        """Load from a directory with vocab.json + merges.txt (each optionally .gz; merges may have CRLF
        and a "#version" line) or with tokenizer.json; tokenizer_config.json is optional.

        Added tokens: ids 151643..151664 from tokenizer_config.json's added_tokens_decoder (else
        tokenizer.json's added_tokens, else Qwen2.5's built-in 22); other ids are dropped (e.g. Qwen3's
        <think>), except Long-VITA tokens, which must already sit at their ids 151665..151681.
        Raises FileNotFoundError (no tokenizer files), ValueError (ids that differ from Long-VITA's)."""
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        try:
            return cls._from_files(directory)
        except FileNotFoundError:
            raise
        except ValueError as exc:
            if directory in str(exc):
                raise
            raise ValueError(f"{directory}: cannot load the tokenizer files ({exc})") from exc
        except Exception as exc:  # noqa: BLE001 - malformed files: wrong JSON types, bad gzip, ...
            raise ValueError(f"{directory}: cannot load the tokenizer files ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_files(cls, directory: str) -> "LongVITATokenizer":
        vocab_path, merges_path = _find(directory, "vocab.json"), _find(directory, "merges.txt")
        if vocab_path and merges_path:
            vocab, merges = json.loads(_read_text(vocab_path)), read_merges(merges_path)
        elif _find(directory, "tokenizer.json"):
            model = json.loads(_read_text(_find(directory, "tokenizer.json")))["model"]
            if model.get("type") != "BPE":
                raise ValueError(f"{directory}/tokenizer.json: expected a BPE model, received {model.get('type')}")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"no tokenizer in {directory}: expected vocab.json + merges.txt "
                                    f"(or .gz) or tokenizer.json")
        added = None
        from_files = _added_from_files(directory)
        if from_files is not None:
            added = []
            for tid, fields in from_files:
                content = fields["content"]
                if content in LONG_VITA_IDS and tid != LONG_VITA_IDS[content]:
                    raise ValueError(f"{directory}: Long-VITA token {content!r}: expected id "
                                     f"{LONG_VITA_IDS[content]}, received id {tid}")
                if FIRST_QWEN_ADDED_ID <= tid <= LAST_QWEN_ADDED_ID:
                    added.append((tid, content, bool(fields.get("special", True))))
        return cls(vocab, merges, added)

    @classmethod
    def default(cls) -> "LongVITATokenizer":
        """The packaged Qwen2.5 + Long-VITA tokenizer, loaded once per process and shared (do not
        modify its backend)."""
        return _load_default()

    def save_pretrained(self, directory: str | os.PathLike, tokenizer_json: bool = False) -> None:
        """Write vocab.json, merges.txt (no header, LF) and tokenizer_config.json (HF layout: Qwen2.5's 22
        added tokens + Long-VITA's 17, ChatML template without a system prompt) into `directory`
        (created if needed); with tokenizer_json=True also tokenizer.json. Loadable by from_pretrained
        and by transformers' AutoTokenizer."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        vocab_text, merges_text = self._file_texts
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            f.write(vocab_text)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(merges_text)
        config = dict(_CONFIG_DEFAULTS)
        config["added_tokens_decoder"] = {
            str(tid): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": s} for tid, c, s in self._added}
        config["chat_template"] = CHAT_TEMPLATE
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sorted(config.items())), f, ensure_ascii=False, indent=2)
        if tokenizer_json:
            self._tok.save(os.path.join(directory, "tokenizer.json"))

    @functools.cached_property
    def _file_texts(self) -> tuple[str, str]:
        """vocab.json and merges.txt as text, serialised once (every training checkpoint saves them)."""
        return (json.dumps(self._vocab, ensure_ascii=False, separators=(",", ":")),
                "".join(f"{a} {b}\n" for a, b in self._merges))

    # ---- encoding / decoding ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids (list of int) of `text`; special tokens written in the text (e.g. "<image>",
        "<|im_end|>") become single tokens. No BOS/EOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """encode() for many texts (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (ints or a 1-D tensor); invalid UTF-8 becomes U+FFFD. With
        skip_special_tokens the special tokens (not e.g. <tool_call>, which Qwen marks non-special) are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one token string (BPE token in byte-level form, or an added token); KeyError if unknown."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"unknown token {token!r}")
        return tid

    def id_to_token(self, tid: int) -> str:
        """Token string of an id; KeyError if out of range."""
        tok = self._tok.id_to_token(int(tid))
        if tok is None:
            raise KeyError(f"unknown token id {tid}")
        return tok

    def stream(self, skip_special_tokens: bool = False) -> "StreamingDetokenizer":
        """A StreamingDetokenizer bound to this tokenizer."""
        return StreamingDetokenizer(self, skip_special_tokens)

    # ---- ids ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (151682)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Generation stops on either (151645 <|im_end|>, 151643 <|endoftext|>)."""
        return (self.eos_token_id, self.bos_token_id)

    @property
    def context_token_ids(self) -> tuple[int, int, int]:
        """(<IMG_CONTEXT>, <PATCH_CONTEXT>, <VID_CONTEXT>) ids: the positions vision features overwrite."""
        return (self.img_context_id, self.patch_context_id, self.vid_context_id)

    @property
    def backend(self) -> Tokenizer:
        """The underlying tokenizers.Tokenizer."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size


@functools.lru_cache(maxsize=1)
def _load_default() -> LongVITATokenizer:
    return LongVITATokenizer.from_pretrained(default_tokenizer_path())


class StreamingDetokenizer:
    """Turns generated token ids into text pieces as they arrive.

    put(ids) returns the newly printable text (possibly ""); text is held back while the pending tokens
    end inside a multi-byte UTF-8 character (their decode ends with U+FFFD). finish() returns the rest.
    The concatenation of all pieces equals tokenizer.decode(all_ids, skip_special_tokens)."""

    def __init__(self, tokenizer: LongVITATokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._pending: list[int] = []

    def put(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text that became complete (str, maybe empty)."""
        if isinstance(ids, int) or (hasattr(ids, "dim") and ids.dim() == 0):
            ids = [int(ids)]
        self._pending.extend(int(i) for i in ids)
        text = self._tokenizer.decode(self._pending, self._skip)
        if not text or text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def finish(self) -> str:
        """Flush what is left (an incomplete character decodes to U+FFFD) and reset."""
        text = self._tokenizer.decode(self._pending, self._skip) if self._pending else ""
        self._pending.clear()
        return text
