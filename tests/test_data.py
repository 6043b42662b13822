"""Corpora streaming, token shards and the packed, resumable loader."""
import itertools
import json
import random
import sys

import numpy as np
import pytest
import torch

from nanoqwen import data
from nanoqwen.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(itertools.islice(data.synthetic_corpus("train", 0), 2000))
    return train_tokenizer(texts, 512)


@pytest.fixture(scope="module")
def shards(tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "train")
    meta = data.write_shards(itertools.islice(data.synthetic_corpus("train", 1), 300), tokenizer, out,
                             shard_tokens=5000)
    return out, meta


def test_local_corpora_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a.txt").write_text("a plain text document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    pq.write_table(pa.table({"text": ["row one", "row two"]}), tmp_path / "c.parquet")
    docs = list(data.iter_documents(str(tmp_path)))
    assert docs == ["a plain text document", "row one", "row two", "from jsonl",
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"]
    with pytest.raises(FileNotFoundError, match="no data at"):
        data.iter_documents(str(tmp_path / "missing"))
    (tmp_path / "bad.jsonl").write_text('{"title": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(data.iter_documents(str(tmp_path / "bad.jsonl")))


def test_text_files_split_into_documents(tmp_path):
    """Paragraphs (blank or whitespace-only lines between them) by default, else one per line or one per file."""
    (tmp_path / "a.txt").write_text("first paragraph,\nits second line\n\n\n  \nsecond paragraph\n\nthird")
    (tmp_path / "b.txt").write_bytes(b"windows one\r\n\r\nwindows two\r\n")
    by = lambda split: list(data.iter_documents(str(tmp_path), text_split=split))  # noqa: E731
    assert by("paragraph") == ["first paragraph,\nits second line", "second paragraph", "third", "windows one",
                               "windows two"]
    assert list(data.iter_documents(str(tmp_path))) == by("paragraph")  # the default
    assert by("line") == ["first paragraph,", "its second line", "second paragraph", "third", "windows one",
                          "windows two"]
    assert by("file") == ["first paragraph,\nits second line\n\n\n  \nsecond paragraph\n\nthird",
                          "windows one\n\nwindows two"]
    with pytest.raises(ValueError, match="text_split must be one of paragraph, line, file"):
        data.iter_documents(str(tmp_path), text_split="sentence")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8: one line naming the file
    with pytest.raises(ValueError, match="c.txt: not UTF-8 text"):
        list(data.iter_documents(str(tmp_path / "c.txt")))


def test_text_field_of_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "from the body field", "text": 3}) + "\n")
    pq.write_table(pa.table({"id": [1, 2], "body": ["row one", None]}), tmp_path / "b.parquet")
    assert list(data.iter_documents(str(tmp_path), text_field="body")) == ["from the body field", "row one"]
    with pytest.raises(ValueError, match="a.jsonl:1: a record needs a 'text' string"):
        list(data.iter_documents(str(tmp_path / "a.jsonl")))
    with pytest.raises(ValueError, match="b.parquet: no 'text' column \\(it has id, body; name the text column with "
                                         "--text-field\\)"):
        list(data.iter_documents(str(tmp_path / "b.parquet")))


@pytest.mark.parametrize("module,source", [("datasets", "hf:someone/corpus"), ("pyarrow.parquet", "c.parquet")])
def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch, module, source):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["row"]}), tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    package = module.split(".")[0]
    source = source if source.startswith("hf:") else str(tmp_path / source)
    with pytest.raises(RuntimeError, match=f"needs the {package} package: pip install {package}$"):
        data.check_corpus(source)
    with pytest.raises(RuntimeError, match=f"pip install {package}$"):
        list(data.iter_documents(source))


def test_mix_follows_weights_and_is_deterministic():
    a, b = itertools.repeat("a"), itertools.repeat("b")
    first = list(itertools.islice(data.mix([a, b], [3, 1], seed=5), 4000))
    assert 0.72 < first.count("a") / 4000 < 0.78
    assert first == list(itertools.islice(data.mix([itertools.repeat("a"), itertools.repeat("b")], [3, 1], 5), 4000))
    assert list(data.mix([iter(["x"]), iter(["y", "z"])], [1, 1], 0)).count("z") == 1  # finite streams run out
    assert list(itertools.islice(data.synthetic_corpus("train", 3), 5)) == \
        list(itertools.islice(data.synthetic_corpus("train", 3), 5))


def test_shards_round_trip(tokenizer, shards):
    out, meta = shards
    assert len(meta["shards"]) > 1 and meta["dtype"] == "uint16"
    docs = list(itertools.islice(data.synthetic_corpus("train", 1), 300))
    tokens = np.concatenate([np.fromfile(f"{out}/tokens_{name}.bin", dtype=np.uint16) for name in meta["shards"]])
    expected = [t for doc in docs for t in tokenizer.encode(doc) + [meta["eos_token_id"]]]
    assert tokens.tolist() == expected and meta["num_documents"] == 300
    with pytest.raises(ValueError, match="empty"):
        data.write_shards(iter([]), tokenizer, out + "-empty")


def test_packed_rows_respect_documents(shards):
    out, meta = shards
    batch = data.PackedLoader(out, batch_size=4, seq_len=128, seed=0).next_batch()
    ids, labels, docs = batch["input_ids"], batch["labels"], batch["document_ids"]
    assert ids.shape == labels.shape == docs.shape == (4, 128)
    starts = torch.zeros_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    eos = meta["eos_token_id"]
    assert (ids[:, :-1][starts[:, 1:]] == eos).all()  # a new document starts only after an <|endoftext|>
    assert (labels[starts] == -100).all() and (labels[~starts] == ids[~starts]).all()


def test_whole_documents_start_a_row(shards):
    out, meta = shards
    ends = [np.load(f"{out}/docs_{name}.npy") for name in meta["shards"]]
    lengths = set(np.concatenate([np.diff(e, prepend=0) for e in ends]).tolist())  # none is over 1,024 tokens
    batch = data.PackedLoader(out, batch_size=8, seq_len=1024, seed=0, whole_documents=True).next_batch()
    ids, labels, docs = batch["input_ids"], batch["labels"], batch["document_ids"]
    pad = docs < 0
    assert pad.any() and (ids[pad] == meta["eos_token_id"]).all() and (labels[pad] == -100).all()
    for row, row_docs in zip(ids, docs):  # every document in a row is whole
        pieces = [row[row_docs == d] for d in row_docs.unique() if d >= 0]
        assert all(len(p) in lengths and p[-1] == meta["eos_token_id"] for p in pieces)
    plain = data.PackedLoader(out, batch_size=8, seq_len=1024, seed=0).next_batch()["document_ids"]
    assert (plain >= 0).all()  # the default packing cuts documents across rows, with no padding


def test_loader_is_deterministic_resumable_and_rank_sliced(shards):
    out, _ = shards
    take = lambda loader, n: [loader.next_batch()["input_ids"] for _ in range(n)]  # noqa: E731
    a, b = data.PackedLoader(out, 4, 64, seed=1), data.PackedLoader(out, 4, 64, seed=1)
    first = take(a, 30)  # several epochs of this small corpus
    assert all(torch.equal(x, y) for x, y in zip(first, take(b, 30)))
    assert not torch.equal(first[0], take(data.PackedLoader(out, 4, 64, seed=2), 1)[0])
    resumed, state = data.PackedLoader(out, 4, 64, seed=1), None
    take(resumed, 7)
    state = resumed.state_dict()
    again = data.PackedLoader(out, 4, 64, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(again, 23), first[7:]))
    ranks = [data.PackedLoader(out, 2, 64, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        assert torch.equal(torch.cat([r.next_batch()["input_ids"] for r in ranks]), first[step])
    with pytest.raises(ValueError, match="global batch"):
        data.PackedLoader(out, 8, 64, seed=1).load_state_dict(state)


def test_long_documents_length_mix(tokenizer):
    docs = list(itertools.islice(data.long_documents(tokenizer, 1024, seed=0), 120))
    lengths = [len(tokenizer.encode(d)) for d in docs]
    upper = sum(length > 512 for length in lengths) / len(lengths)
    assert 0.6 < upper < 0.9 and max(lengths) < 1100 and min(lengths) > 64
    assert any("pass key" in d for d in docs)
    prompt, key = data.passkey_prompt(random.Random(0), 10)
    assert f"The pass key is {key}." in prompt and prompt.endswith("The pass key is")
