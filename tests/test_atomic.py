"""Atomic single-file writes. Every writer of a file that must never be seen half written (checkpoint weights, shards
and json, config.json, the tokenizer files, a run's `latest` pointer and compute.json, eval.json, JSONL data files,
the report card, the speedrun manifest) leaves the previous file intact and no temporary file behind
when its write is interrupted: by a failing rename, or by the process being killed part-way through the write."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch

from nanoqwen import report, speedrun
from nanoqwen.atomic import atomic_write
from nanoqwen.checkpoint import load_model, save_model
from nanoqwen.config import Qwen3Config
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.tokenizer import train_tokenizer
from nanoqwen.train import evaluate, posttrain
from nanoqwen.train.trainer import Compute, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREVIOUS = b'{"previous": true}\n'  # what the target held before the interrupted write (JSON: some writers read it)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int, vocab_size: int = 64, context: int = 64) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=context,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = Qwen3ForCausalLM(config)
    model.init_weights()
    return model


def write_report(folder: str, version: int) -> None:
    """The report card of a run folder holding only its manifest (no stage has run)."""
    settings = dict(tasks=None, difficulty="1-2", languages=None)
    manifest = dict(scale="tiny", minutes=3.0 * version, seed=0, settings=settings, stages={}, sizes={})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    names = ("plot_pretraining", "plot_posttraining", "plot_accuracy", "plot_budget")
    with mock.patch.multiple(report, **dict.fromkeys(names, lambda *args: None)):  # PNGs: slow, and not the point
        report.write_report(folder)


def write_manifest(folder: str, version: int) -> None:
    """The speedrun's manifest, rewritten after a stage."""
    manifest = speedrun.Manifest.__new__(speedrun.Manifest)  # the previous file is replaced, not read
    manifest.path = os.path.join(folder, "manifest.json")
    manifest.data = dict(scale="tiny", minutes=3.0, seed=0, sizes={}, stages={"teacher-s1": dict(seconds=version)})
    manifest.save()


def evaluation(folder: str, version: int) -> None:
    checkpoint = os.path.join(os.path.dirname(folder), "evaluated")
    if not os.path.exists(checkpoint):
        save_model(tiny_model(0, vocab_size=320, context=1024), checkpoint)
        train_tokenizer(["the quick brown fox jumps over the lazy dog\n"] * 20, 300).save(checkpoint)
    evaluate.run(evaluate.EvalOptions(model=checkpoint, out=folder, samples=1, k=1, seed=version, budgets="none",
                                      max_new_tokens=2, tasks="arithmetic", difficulty="1", languages="en"))


SHARDED = dict(max_shard_size=8000)  # the tiny model's 27 KB of weights in 4 shards
WRITERS = {  # the target file (relative to the folder written into) -> the call that writes it, new content per version
    "atomic_write.txt": lambda folder, v: atomic_write(os.path.join(folder, "atomic_write.txt"), f"{v}\n" * 4096),
    "config.json": lambda folder, v: Qwen3Config(rope_theta=1e4 * v).save(folder),
    "model.safetensors": lambda folder, v: save_model(tiny_model(v), folder),
    "model-00002-of-00004.safetensors": lambda folder, v: save_model(tiny_model(v), folder, **SHARDED),
    "model.safetensors.index.json": lambda folder, v: save_model(tiny_model(v), folder, **SHARDED),
    "generation_config.json": lambda folder, v: save_model(tiny_model(v), folder),
    "tokenizer.json": lambda folder, v: train_tokenizer([f"text number {v}\n"] * 20, 300).save(folder),
    "tokenizer_config.json": lambda folder, v: train_tokenizer([f"text number {v}\n"] * 20, 300).save(folder),
    "latest": lambda folder, v: write_checkpoint(folder, v, tiny_model(v), dict(step=v)),
    "compute.json": lambda folder, v: Compute(folder).step(),
    "prompts.jsonl": lambda folder, v: posttrain.write_jsonl([{"version": v}] * 100, os.path.join(folder,
                                                                                                "prompts.jsonl")),
    "eval.json": evaluation,
    "report.md": write_report,
    "manifest.json": write_manifest,
}


def temporary_files(folder) -> list[str]:
    """Every path under `folder` that is, or is inside, a temporary file or folder (a name with "tmp" in it)."""
    paths = [os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder) for n in dirs + files]
    return [os.path.join(folder, p) for p in paths if any("tmp" in part.lower() for part in p.split(os.sep))]


def prepare(folder, target: str) -> str:
    """The folder with the previous version of the target in it; returns the target's path."""
    path = os.path.join(folder, target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(PREVIOUS)
    return path


@pytest.mark.parametrize("target", WRITERS)
def test_a_failed_rename_keeps_the_previous_file_and_no_temporary_one(target, tmp_path, monkeypatch):
    folder = str(tmp_path / "out")
    path = prepare(folder, target)
    rename = os.replace

    def failing_rename(src, dst, *args, **kwargs):
        if os.path.abspath(dst) == path:
            raise OSError(errno.EIO, "rename failed (injected)")
        return rename(src, dst, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_rename)
        with pytest.raises(OSError, match="injected"):  # a writer that writes in place never gets here
            WRITERS[target](folder, 2)
    assert open(path, "rb").read() == PREVIOUS
    assert temporary_files(folder) == []
    WRITERS[target](folder, 2)  # the same call, uninterrupted, does write this file
    assert open(path, "rb").read() != PREVIOUS and temporary_files(folder) == []


# A process killed part-way through a write. The child below forks one writer process per target; that process
# lowers its file-size limit to half the new content once the target's temporary folder exists, so the kernel kills
# it (SIGXFSZ: like SIGKILL, no clean-up runs) in the middle of the target's write, wherever the writer is.
KILL_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys, tempfile
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from test_atomic import PREVIOUS, WRITERS, prepare, temporary_files
    root, results = {root!r}, {{}}
    mkdtemp = tempfile.mkdtemp

    def write_killed(target, folder, size):
        name = os.path.basename(target)

        def limited_mkdtemp(*args, prefix=None, **kwargs):  # the target's temporary folder: cut its write at half
            if prefix and prefix.startswith(f".tmp-{{name}}."):
                resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
            return mkdtemp(*args, prefix=prefix, **kwargs)
        pid = os.fork()
        if pid == 0:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it, so writes would just fail
            tempfile.mkdtemp = limited_mkdtemp
            try:
                WRITERS[target](folder, 2)
            finally:
                os._exit(3)  # never cut: the writer did not write through a temporary folder
        _, status = os.waitpid(pid, 0)
        return dict(signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)

    for target in WRITERS:
        scratch = os.path.join(root, "scratch", target.replace("/", "_"))
        WRITERS[target](scratch, 2)  # the new content's size, to cut the write in the middle
        size = os.path.getsize(os.path.join(scratch, target))
        folder = os.path.join(root, target.replace("/", "_"))
        path = prepare(folder, target)
        result = write_killed(target, folder, size)
        torn = [p for p in temporary_files(folder) if os.path.isfile(p)]
        result.update(size=size, torn=[os.path.getsize(p) for p in torn], kept=open(path, "rb").read() == PREVIOUS)
        WRITERS[target](folder, 2)  # the next write of the file removes what the killed writer left
        result.update(written=open(path, "rb").read() != PREVIOUS, left=temporary_files(folder))
        results[target] = result
    print("RESULTS", json.dumps(results))
""")


def test_a_process_killed_mid_write_keeps_the_previous_file(tmp_path):
    script = KILL_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), root=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULTS", 1)[1])
    assert set(results) == set(WRITERS)
    for target, r in results.items():
        # killed mid-write: it left one incomplete temporary file (half the new content; safetensors, which sizes
        # its file before writing, dies there with it empty), and the target untouched
        assert r["signal"] == signal.SIGXFSZ and len(r["torn"]) == 1 and r["torn"][0] < r["size"], (target, r)
        assert r["kept"], (target, r)
        assert r["written"] and r["left"] == [], (target, r)  # the next write succeeds and removes the leftover


def test_the_previous_checkpoint_still_loads_after_an_interrupted_save(tmp_path, monkeypatch):
    """A checkpoint saved again with another shard count: the old weights load until the new ones are complete."""
    folder = str(tmp_path / "model")
    old = tiny_model(1)
    save_model(old, folder)
    rename = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("injected"))
                        if dst.endswith("index.json") else rename(src, dst))
    with pytest.raises(OSError, match="injected"):
        save_model(tiny_model(2), folder, **SHARDED)  # every shard written, the index not
    loaded = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
