"""Training data: corpora in, token shards on disk, packed fixed-length batches out.

    documents  iter_documents(path)       local .txt / .jsonl / .parquet files or folders, or "hf:NAME[:CONFIG]"; streamed
                                          (.txt: one document per paragraph, per line, or per file)
               synthetic_corpus(...)      the embedded task generators + general prose, mixed by weights
               long_documents(...)        stage 3: related task examples, prose and passkey documents of target lengths
               mix(streams, weights)      one deterministic stream from several
    shards     write_shards(docs, tok)    tokens_NNNNN.bin (uint16 below 65,536 ids, else uint32) + docs_NNNNN.npy
                                          (each document's end offset) + meta.json; written into a temporary folder, renamed
    batches    PackedLoader(dir, ...)     documents shuffled per epoch by seed, concatenated, cut into rows of seq_len
                                          (or, whole_documents, never cut: padded rows); yields input_ids, labels and
                                          document_ids (attention never crosses documents);
                                          state_dict() / load_state_dict() resume mid-epoch
"""
from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_SPLITS = ("paragraph", "line", "file")  # how a .txt file is cut into documents
TXT_PIECE_CHARS = 1 << 20  # a longer .txt document is cut at the first line end past ~1M characters


# ----------------------------------------------------------------------------------------------------------------
# Corpora: streams of text documents

def render_messages(messages: list[dict]) -> str:
    """A chat as pretraining text, in the Qwen3 turn format."""
    return "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)


def _read_txt(path, text_split: str = "paragraph"):
    """The documents of a text file: its paragraphs (runs of lines between blank lines), its lines, or the whole
    file; any document is cut at a line end once it passes ~1M characters."""
    try:
        with open(path, encoding="utf-8") as f:
            piece, size = [], 0
            for line in f:
                blank = not line.strip()
                if not (blank and text_split == "paragraph"):
                    piece.append(line)
                    size += len(line)
                if text_split == "line" or (blank and text_split == "paragraph") or size >= TXT_PIECE_CHARS:
                    yield "".join(piece).rstrip("\n")
                    piece, size = [], 0
            yield "".join(piece).rstrip("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None


def iter_jsonl(path: str, check=None, on_bad_line: str = "error"):
    """The records of a JSONL file, streamed. A line that is not JSON, or whose record check(record) rejects (it
    returns the reason, or None), is reported as PATH:LINE: reason: raised with on_bad_line="error", printed to stderr
    and skipped with "skip" (then a count of skipped and kept lines follows the last record)."""
    if on_bad_line not in ("skip", "error"):
        raise ValueError(f"on_bad_line must be 'skip' or 'error', got {on_bad_line!r}")
    kept = bad = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = check(record) if check else None
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem is None:
                kept += 1
                yield record
                continue
            if on_bad_line == "error":
                raise ValueError(f"{path}:{number}: {problem}")
            print(f"{path}:{number}: skipped: {problem}", file=sys.stderr)
            bad += 1
    if bad:
        print(f"{path}: {bad} malformed line(s) skipped, {kept} kept", file=sys.stderr)


def _read_jsonl(path, text_field: str = "text"):
    def check(record) -> str | None:
        if isinstance(record, dict) and (isinstance(record.get(text_field), str)
                                         or isinstance(record.get("messages"), list)):
            return None
        return f"a record needs a {text_field!r} string or a 'messages' list"

    for record in iter_jsonl(path, check):
        text = record.get(text_field)
        yield text if isinstance(text, str) else render_messages(record["messages"])


def _read_parquet(path, text_field: str = "text"):
    pq = _optional_import("pyarrow.parquet", "pyarrow", "a .parquet corpus")
    file = pq.ParquetFile(path)
    if text_field not in file.schema_arrow.names:
        raise ValueError(f"{path}: no {text_field!r} column (it has {', '.join(file.schema_arrow.names)}; "
                         f"name the text column with --text-field)")
    for batch in file.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


def _read_hf(spec: str, text_field: str = "text"):
    datasets = _optional_import("datasets", "datasets", f"hf:{spec}")  # it streams over the network
    name, _, config = spec.partition(":")
    dataset = datasets.load_dataset(name, config or None, split="train", streaming=True)
    for record in dataset:
        text = record.get(text_field)
        if not isinstance(text, str) and not isinstance(record.get("messages"), list):
            raise ValueError(f"hf:{spec}: a record has no {text_field!r} string (its fields: {', '.join(record)}; "
                             f"name the text field with --text-field)")
        yield text if isinstance(text, str) else render_messages(record["messages"])


def _optional_import(module: str, package: str, what: str):
    """A package only some corpora need; its absence is one line naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"{what} needs the {package} package: pip install {package}") from None


def corpus_files(path: str) -> list[str]:
    """The data files of a path (a file, or a folder searched recursively, sorted); checked now, read later."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data at {path}")
    if os.path.isfile(path):
        if not path.endswith(DATA_SUFFIXES):
            raise ValueError(f"{path}: unsupported data file (use {', '.join(DATA_SUFFIXES)})")
        return [path]
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(DATA_SUFFIXES))
    if not files:
        raise ValueError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this folder")
    return files


def check_corpus(source: str) -> None:
    """Fail now, in one line, on a corpus that cannot be read: a missing path, a folder without data files, a
    package its files need that is not installed."""
    if source.startswith("hf:"):
        _optional_import("datasets", "datasets", source)
    elif any(file.endswith(".parquet") for file in corpus_files(source)):
        _optional_import("pyarrow.parquet", "pyarrow", "a .parquet corpus")


def iter_documents(source: str, text_split: str = "paragraph", text_field: str = "text"):
    """Stream the documents of a corpus: a path (file or folder) or "hf:NAME[:CONFIG]" (a HF dataset, streamed).
    text_split: a .txt file's documents are its paragraphs (separated by blank lines), its lines, or the whole file.
    text_field: the key (.jsonl, hf:) or column (.parquet) holding a document's text; a record without it may hold
    a chat as 'messages' instead."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {', '.join(TEXT_SPLITS)}, got {text_split!r}")
    if source.startswith("hf:"):
        return (doc for doc in _read_hf(source[3:], text_field) if doc.strip())
    readers = {".txt": lambda file: _read_txt(file, text_split), ".jsonl": lambda file: _read_jsonl(file, text_field),
               ".parquet": lambda file: _read_parquet(file, text_field)}
    files = corpus_files(source)
    return (doc for file in files for doc in readers[os.path.splitext(file)[1]](file) if doc.strip())


def mix(streams: list, weights: list[float], seed: int):
    """Interleave document streams, each next document drawn from stream i with probability ~ weights[i].
    A finite stream that runs out drops out of the mix."""
    rng = random.Random(f"nanoqwen.data.mix/{seed}")
    streams, weights = [iter(s) for s in streams], list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


def synthetic_corpus(split: str = "train", seed: int = 0, task_weight: float = 1.0, prose_weight: float = 1.0,
                     tasks=None, difficulty=None, languages=None):
    """The embedded default corpus: task documents (question, steps, answer) and general prose, mixed by weight."""
    from .tasks import LANGUAGES, format_document, general_text, iter_examples
    examples = (format_document(ex) for ex in iter_examples(split, seed, tasks, difficulty, languages))
    rng = random.Random(f"nanoqwen.data.prose/{split}/{seed}")
    prose = (general_text(rng, rng.choice(languages or LANGUAGES)) for _ in iter(int, 1))
    return mix([examples, prose], [task_weight, prose_weight], seed)


# ----------------------------------------------------------------------------------------------------------------
# Long documents (pre-training stage 3)

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def passkey_prompt(rng: random.Random, num_filler: int) -> tuple[str, str]:
    """A passkey-retrieval prompt (the key hidden at a random depth in filler text) and its 5-digit key."""
    key = str(rng.randrange(10_000, 100_000))
    depth = rng.randint(0, num_filler)
    text = ("There is a pass key hidden in this text. Find it and remember it.\n" + PASSKEY_FILLER * depth
            + f"The pass key is {key}. Remember it. {key} is the pass key.\n" + PASSKEY_FILLER * (num_filler - depth)
            + "What is the pass key? The pass key is")
    return text, key


def passkey_document(rng: random.Random, num_filler: int) -> str:
    """A passkey prompt and its answer, as training text."""
    prompt, key = passkey_prompt(rng, num_filler)
    return f"{prompt} {key}."


def long_documents(tokenizer, max_tokens: int, split: str = "train", seed: int = 0, passkey_weight: float = 0.3,
                   tasks_weight: float = 0.5, prose_weight: float = 0.2, tasks=None, difficulty=None, languages=None):
    """Documents of up to max_tokens: 75% with a length in the upper half (max/2..max), 25% in the lower half
    (max/8..max/2), as Qwen3's stage 3. A document is a run of examples of one task family (related problems), a run
    of prose, or a passkey-retrieval document."""
    from .tasks import TASKS, LANGUAGES, format_document, general_text, iter_examples
    rng = random.Random(f"nanoqwen.data.long/{split}/{seed}")
    filler_tokens = len(tokenizer.encode(PASSKEY_FILLER))
    families = {name: iter_examples(split, seed, [name], difficulty, languages) for name in tasks or TASKS}
    for _ in iter(int, 1):
        target = rng.randint(max_tokens // 2, max_tokens) if rng.random() < 0.75 else \
            rng.randint(max_tokens // 8, max_tokens // 2)
        kind = rng.choices(["passkey", "tasks", "prose"], [passkey_weight, tasks_weight, prose_weight])[0]
        if kind == "passkey":
            yield passkey_document(rng, max(1, (target - 60) // filler_tokens))
            continue
        family, language = families[rng.choice(sorted(families))], rng.choice(languages or LANGUAGES)
        pieces, length = [], 0
        while length < target:
            piece = format_document(next(family)) if kind == "tasks" else general_text(rng, language)
            length += len(tokenizer.encode(piece)) + 1
            pieces.append(piece)
        yield "\n\n".join(pieces[:-1] if len(pieces) > 1 else pieces)


# ----------------------------------------------------------------------------------------------------------------
# Token shards on disk

def write_shards(documents, tokenizer, out_dir: str, max_tokens: int | None = None, shard_tokens: int = 1 << 26,
                 batch_documents: int = 512) -> dict:
    """Tokenise a document stream (each document + <|endoftext|>) into shards until it ends or max_tokens is reached.

    Written into a temporary folder next to out_dir and renamed at the end: out_dir is complete or absent."""
    eos = tokenizer.special_tokens["<|endoftext|>"]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-shards-")
    os.chmod(tmp, 0o755)
    meta = dict(dtype=np.dtype(dtype).name, vocab_size=tokenizer.vocab_size, eos_token_id=eos, shards=[],
                num_tokens=0, num_documents=0)
    tokens, ends = [], []

    def flush():
        if not ends:
            return
        name = f"{len(meta['shards']):05d}"
        np.concatenate(tokens).astype(dtype).tofile(os.path.join(tmp, f"tokens_{name}.bin"))
        np.save(os.path.join(tmp, f"docs_{name}.npy"), np.asarray(ends, dtype=np.int64))
        meta["shards"].append(name)
        tokens.clear(), ends.clear()

    documents, done = iter(documents), False
    while not done and (max_tokens is None or meta["num_tokens"] < max_tokens):
        batch = [doc for _, doc in zip(range(batch_documents), documents)]
        done = len(batch) < batch_documents
        for ids in tokenizer.encode_batch(batch):
            ids = np.asarray(ids + [eos], dtype=np.int64)
            tokens.append(ids)
            ends.append((ends[-1] if ends else 0) + len(ids))
            meta["num_tokens"] += len(ids)
            meta["num_documents"] += 1
            if ends[-1] >= shard_tokens:
                flush()
    flush()
    if meta["num_documents"] == 0:
        shutil.rmtree(tmp)
        raise ValueError("the corpus is empty: no documents to tokenise")
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return meta


def read_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token shards at {data_dir} (meta.json missing)")
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Packed, resumable batches

class PackedLoader:
    """Fixed-length rows packed from the documents of a shard folder, deterministic by seed, resumable mid-epoch.

    Each epoch visits every document once in an order drawn from (seed, epoch); documents are concatenated and cut
    into rows of seq_len tokens (a document longer than what is left of a row continues in the next row, with its
    positions restarting). Every global batch is batch_size * world_size rows; rank r takes its slice, so N ranks
    see exactly the rows one process with batch_size * N would see.
    whole_documents (long-context training): a document that does not fit in what is left of a row starts the next
    row instead, and the rest of the row is padding (<|endoftext|>, document id -1, never a target), so a document
    of up to seq_len tokens is always seen whole: a passkey and its question in the same row."""

    def __init__(self, data_dir: str, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 whole_documents: bool = False):
        meta = read_meta(data_dir)
        dtype = np.dtype(meta["dtype"])
        self.batch_size, self.seq_len, self.seed, self.rank, self.world_size = batch_size, seq_len, seed, rank, world_size
        self.whole_documents, self.eos = whole_documents, meta["eos_token_id"]
        self.tokens, self.starts, self.ends = [], [], []
        for i, name in enumerate(meta["shards"]):
            self.tokens.append(np.memmap(os.path.join(data_dir, f"tokens_{name}.bin"), dtype=dtype, mode="r"))
            ends = np.load(os.path.join(data_dir, f"docs_{name}.npy"))
            self.starts.append(np.concatenate([[0], ends[:-1]]))
            self.ends.append(ends)
        self.doc_index = np.concatenate([np.stack([np.full(len(e), i), np.arange(len(e))], 1)
                                         for i, e in enumerate(self.ends)])  # global doc -> (shard, local doc)
        self.num_tokens = meta["num_tokens"]
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._order = None

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, cursor=self.cursor, offset=self.offset, seed=self.seed, seq_len=self.seq_len,
                    global_batch=self.batch_size * self.world_size)

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.batch_size * self.world_size or state["seq_len"] != self.seq_len:
            raise ValueError(f"the data position was saved for global batch {state['global_batch']} x seq "
                             f"{state['seq_len']}, this run uses {self.batch_size * self.world_size} x {self.seq_len}")
        self.epoch, self.cursor, self.offset, self.seed = state["epoch"], state["cursor"], state["offset"], state["seed"]
        self._order = None

    def _document(self, position: int) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.doc_index))
        shard, doc = self.doc_index[self._order[position]]
        return self.tokens[shard][self.starts[shard][doc]:self.ends[shard][doc]]

    def _row(self) -> tuple[np.ndarray, np.ndarray]:
        ids, doc_ids, filled, piece = np.empty(self.seq_len, np.int64), np.empty(self.seq_len, np.int64), 0, 0
        while filled < self.seq_len:
            document = self._document(self.cursor)
            if self.whole_documents and filled and self.offset == 0 and len(document) > self.seq_len - filled:
                ids[filled:], doc_ids[filled:] = self.eos, -1  # padding: the document starts the next row
                break
            take = min(len(document) - self.offset, self.seq_len - filled)
            ids[filled:filled + take] = document[self.offset:self.offset + take]
            doc_ids[filled:filled + take] = piece
            filled, piece, self.offset = filled + take, piece + 1, self.offset + take
            if self.offset == len(document):
                self.cursor, self.offset = self.cursor + 1, 0
                if self.cursor == len(self.doc_index):
                    self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return ids, doc_ids

    def next_batch(self) -> dict:
        rows = [self._row() for _ in range(self.batch_size * self.world_size)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        input_ids = torch.from_numpy(np.stack([r[0] for r in mine]))
        document_ids = torch.from_numpy(np.stack([r[1] for r in mine]))
        labels = input_ids.clone()
        labels[:, 1:][document_ids[:, 1:] != document_ids[:, :-1]] = -100  # never predict across a boundary
        labels[document_ids < 0] = -100  # nor padding
        return dict(input_ids=input_ids, labels=labels, document_ids=document_ids)

    def __iter__(self):
        while True:
            yield self.next_batch()
