"""Fixtures shared by the test modules: one thread for tiny models, the official tokenizer, a tiny checkpoint."""
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (nanoqwen/kernels.py) run in Triton's interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanoqwen import data
from nanoqwen.checkpoint import load_model, save_model
from nanoqwen.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's other processes. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The official Qwen3 tokenizer."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A random nano-d2 with a 512-token BBPE tokenizer, saved as an HF folder (read-only: copy before changing)."""
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    tokenizer = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 1000), 512)
    torch.manual_seed(0)
    save_model(load_model("nano-d2", vocab_size=512), path)
    tokenizer.save(path)
    return path
