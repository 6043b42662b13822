"""The Trainer core and the pre-training stages: learning, exact resume, crash-safe checkpoints, distributed
equivalence, one-line errors, and the three stages end to end (their commands, a tiny budget)."""
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from nanoqwen import cli, data
from nanoqwen.checkpoint import load_model
from nanoqwen.model import ExpertCounter
from nanoqwen.tokenizer import train_tokenizer
from nanoqwen.train import TrainConfig, Trainer, evaluate, latest_checkpoint, lr_multiplier, pretrain
from nanoqwen.train.trainer import Compute, MeteredTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Token shards of the synthetic corpus under a 512-token BBPE; the tokenizer is saved beside them."""
    root = tmp_path_factory.mktemp("train_data")
    tokenizer = train_tokenizer(itertools.islice(data.synthetic_corpus("train", 0), 2000), 512,
                                save_dir=str(root / "tokenizer"))
    data.write_shards(itertools.islice(data.synthetic_corpus("train", 1), 3000), tokenizer, str(root / "train"))
    return str(root)


def make_trainer(shard_dir, out, preset="nano-d2", steps=6, batch_size=4, rank=0, world_size=1, **options):
    resume_from = options.pop("resume_from", None)
    torch.manual_seed(0)
    model = load_model(preset, vocab_size=512)
    loader = data.PackedLoader(os.path.join(shard_dir, "train"), batch_size, 64, seed=0, rank=rank,
                               world_size=world_size)
    config = TrainConfig(out_dir=out, steps=steps, batch_size=batch_size, lr=3e-3, warmup_steps=2, progress=False,
                         **options)
    return Trainer(model, config, loader, device="cpu", resume_from=resume_from)


def test_lr_schedules():
    cosine = TrainConfig(out_dir="", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    wsd = TrainConfig(out_dir="", steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(0, cosine) == pytest.approx(0.1) and lr_multiplier(9, cosine) == 1.0
    assert lr_multiplier(55, cosine) == pytest.approx(0.55) and lr_multiplier(100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(50, wsd) == lr_multiplier(79, wsd) == 1.0
    assert lr_multiplier(90, wsd) == pytest.approx(0.5) and lr_multiplier(100, wsd) == 0.0


def test_resume_gives_bitwise_the_same_losses(shard_dir, tmp_path):
    """MoE (router, global-batch balancing) with gradient accumulation: stop at step 3, resume, same steps 4-6."""
    straight = make_trainer(shard_dir, str(tmp_path / "a"), "nano-moe-d2", grad_accum=2, save_every=3)
    losses = [r["loss"] for r in straight.train()]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    resumed = make_trainer(shard_dir, str(tmp_path / "b"), "nano-moe-d2", grad_accum=2,
                           resume_from=str(tmp_path / "a" / "step_000003"))
    assert resumed.step == 3
    assert [r["loss"] for r in resumed.train()[3:]] == losses[3:]
    assert os.path.exists(tmp_path / "a" / "loss.png") and len(open(tmp_path / "a" / "metrics.jsonl").readlines()) == 6


def test_packed_documents_count_attention_flops_per_document(tmp_path):
    """A step's FLOPs (and so its MFU) count attention per document: 6 per active weight per token plus, for
    each document of n tokens in a packed row, 6 x layers x heads x head_dim x n^2, evaluated here document by
    document from the definition; a row of four equal documents costs a quarter of a plain row's attention."""
    model = load_model("nano-d2", vocab_size=512)
    c = model.config
    ids = torch.randint(0, 512, (2, 64))
    docs = torch.tensor([[0] * 10 + [1] * 30 + [2] * 24, [0] * 16 + [1] * 16 + [2] * 16 + [3] * 16])
    docs[0, -4:] = -1  # padding attends nowhere
    trainer = Trainer(model, TrainConfig(out_dir=str(tmp_path), steps=2, batch_size=2, progress=False),
                      iter([dict(input_ids=ids, labels=ids, document_ids=docs), dict(input_ids=ids, labels=ids)]),
                      device="cpu")
    packed, plain = trainer.train_step()["train_flops"], trainer.train_step()["train_flops"]
    assert c.tie_word_embeddings  # the embedding's one copy counts as the lm_head's matmul (norms count too: ~0.2%)
    matmul = sum(p.numel() for p in model.parameters())
    width = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    lengths = [10, 30, 20, 16, 16, 16, 16]
    assert packed == 6 * matmul * ids.numel() + width * sum(n * n for n in lengths)
    assert plain == 6 * matmul * ids.numel() + width * 2 * 64 * 64
    quarter = width * 4 * 16 * 16
    assert quarter == (width * 64 * 64) / 4


@pytest.mark.parametrize("preset", ["nano-d2", "nano-moe-d2"])
def test_gradient_accumulation_equals_one_combined_batch(tmp_path, preset):
    """Micro-batches with 3 and 54 target tokens: the accumulated gradient is the gradient of the mean loss over the
    57 targets of the two as one batch (not the mean of the two means). The MoE runs without its load-balancing term:
    that one is a mean over routed tokens, not targets, and its expert fractions grow micro-batch by micro-batch (the
    first sees only its own), so it only approximates the combined batch's (by ~4e-5 here, at coefficient 1e-3)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 32))
    labels = ids.clone()
    labels[0, :30] = -100  # row 0: 2 targets
    labels[1, :] = -100
    labels[1, 10] = ids[1, 10]  # row 1: 1 target
    labels[2:, 1:5] = -100  # rows 2 and 3: 27 targets each
    micro = [dict(input_ids=ids[:2], labels=labels[:2]), dict(input_ids=ids[2:], labels=labels[2:])]
    counts = [(b["labels"][:, 1:] != -100).sum().item() for b in micro]
    model = load_model(preset, vocab_size=512, router_aux_loss_coef=0.0)
    combined = load_model(preset, vocab_size=512, router_aux_loss_coef=0.0)
    combined.load_state_dict(model.state_dict())

    config = TrainConfig(out_dir=str(tmp_path), steps=1, batch_size=2, grad_accum=2, grad_clip=0, progress=False)
    trainer = Trainer(model, config, iter(micro), device="cpu")
    accumulated = []
    trainer.optimizer.register_step_pre_hook(lambda *_: accumulated.extend(p.grad.clone() for p in model.parameters()))
    trainer.train_step()

    combined.train()
    counter = ExpertCounter() if combined.config.is_moe else None
    combined(input_ids=ids, labels=labels, expert_counter=counter).loss.backward()
    worst = max((a - p.grad).abs().max().item() for a, p in zip(accumulated, combined.parameters()))
    print(f"{preset}: targets {counts}, largest gradient difference {worst:.2e}")
    assert counts == [3, 54] and worst < 1e-6


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(shard_dir, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import nanoqwen.train.trainer as trainer
        from test_train import make_trainer
        real_save, calls = torch.save, []
        def slow_save(obj, path):  # the third checkpoint: half written, then the process is killed
            calls.append(path)
            if len(calls) == 3:
                open(path, "wb").write(b"partial")
                open({str(tmp_path / "writing")!r}, "w").close()
                time.sleep(60)
            real_save(obj, path)
        trainer.torch.save = slow_save
        make_trainer({shard_dir!r}, {str(out)!r}, steps=5, save_every=1).train()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=ENV, cwd=REPO)
    deadline = time.time() + 120
    while not (tmp_path / "writing").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / "writing").exists()
    assert latest_checkpoint(str(out)) == str(out / "step_000002")
    load_model(str(out / "step_000002"))
    assert torch.load(out / "step_000002" / "trainer_state.pt", weights_only=False)["step"] == 2
    resumed = make_trainer(shard_dir, str(out), steps=4, resume_from=latest_checkpoint(str(out)))
    resumed.train()
    assert latest_checkpoint(str(out)) == str(out / "step_000004")
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]  # the torn write was cleaned up


def test_resume_says_where_and_counts_each_step_once(shard_dir, tmp_path, capsys):
    """A run that went on past its checkpoint (then crashed) resumes from it: one line says where, and the records
    the crashed run wrote after it are dropped (metrics.jsonl, GRPO's rl_metrics.jsonl, a torn last line), the file
    replaced whole; compute totals restart from the checkpoint's."""
    out = tmp_path / "run"
    straight = make_metered_trainer(shard_dir, str(out), steps=4, save_every=2)
    straight.train()
    totals = dict(straight.compute.totals)
    with open(out / "rl_metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(dict(rl_step=k, step=2 * k)) + "\n" for k in (1, 2)) + '{"rl_step": 3, "st')
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by the crash
    inode = os.stat(out / "metrics.jsonl").st_ino
    capsys.readouterr()
    resumed = make_metered_trainer(shard_dir, str(out), steps=4, resume_from=str(out / "step_000002"))
    assert capsys.readouterr().out == f"resumed from step 2 (checkpoint {out / 'step_000002'})\n"
    steps = lambda name: [json.loads(line)["step"] for line in open(out / name)]  # noqa: E731
    assert steps("metrics.jsonl") == [1, 2] and steps("rl_metrics.jsonl") == [2]
    assert os.stat(out / "metrics.jsonl").st_ino != inode  # replaced (atomically), not cut in place
    assert resumed.compute.totals["steps"] == 2 and json.load(open(out / "compute.json"))["steps"] == 2
    resumed.train()
    assert steps("metrics.jsonl") == [1, 2, 3, 4]
    assert resumed.compute.totals == totals == json.load(open(out / "compute.json"))


def test_sft_resume_without_a_checkpoint_says_how_to_start_afresh(tiny, tmp_path):
    """It used to start afresh silently, counting the killed run's compute.json totals as its own."""
    from nanoqwen.train.sft import run_sft
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(FileNotFoundError, match=f"--resume: no checkpoint in {tmp_path} .*: rerun without --resume to "
                                                f"start it afresh$"):
        run_sft(tiny, records, str(tmp_path), steps=1, batch_size=1, lr=None, max_len=64, resume=True)


def make_metered_trainer(shard_dir, out, steps, **options):
    """make_trainer's model and data under the MeteredTrainer (compute accounting, as SFT, GRPO and distillation)."""
    resume_from = options.pop("resume_from", None)
    plain = make_trainer(shard_dir, out, steps=steps, **options)
    return MeteredTrainer(plain.raw_model, plain.config, plain.train_data, device="cpu", resume_from=resume_from,
                          compute=Compute(out))


@pytest.mark.parametrize("parallel,preset", [("fsdp", "nano-d2"), ("ddp", "nano-d2"), ("fsdp", "nano-next-d4")])
def test_two_process_run_matches_one_process(shard_dir, tmp_path, parallel, preset):
    """The hybrid (DeltaNet, MoE with global-batch load balancing) shards and matches too."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from nanoqwen.train.parallelize import init_distributed
        from test_train import make_trainer
        rank, world, _ = init_distributed()
        trainer = make_trainer({shard_dir!r}, {str(tmp_path / "out")!r}, {preset!r}, steps=4, batch_size=4 // world,
                               rank=rank, world_size=world, parallel={parallel!r})
        losses = [r["loss"] for r in trainer.train()]
        if rank == 0:
            print("LOSSES", json.dumps(losses))
    """))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    distributed = json.loads(run.stdout.split("LOSSES", 1)[1].splitlines()[0])
    single = [r["loss"] for r in make_trainer(shard_dir, str(tmp_path / "single"), preset, steps=4).train()]
    print(f"{parallel}: 2 ranks {distributed}\n       1 rank  {single}")
    assert np.allclose(distributed, single, rtol=0, atol=1e-5)
    load_model(latest_checkpoint(str(tmp_path / "out")))  # rank 0 gathered a full HF checkpoint


def nanoqwen(*args, env=ENV):
    return subprocess.run([sys.executable, "-m", "nanoqwen", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=180)


def test_held_out_share_of_a_corpus(tmp_path):
    """1% of the documents, at least 8, at most 256, fewer than half; every other document trains, none is lost."""
    for count, held in [(1, 0), (2, 1), (3, 1), (20, 8), (300, 8), (5000, 50), (30_000, 256)]:
        path = tmp_path / f"{count}.txt"
        path.write_text("".join(f"line {i}\n" for i in range(count)))
        corpus = pretrain.open_corpus(str(path), text_split="line")
        assert corpus.held == held, count
        test, train = list(corpus.split("test")), list(corpus.split("train"))
        assert len(test) == held and train and sorted(test + train) == sorted(f"line {i}" for i in range(count))
        if held > 1:  # spread over the corpus, not its first documents
            assert test[1] != "line 1"
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="blank.txt: no documents"):
        pretrain.open_corpus(str(tmp_path / "blank.txt"))


def test_pretrain_on_text_jsonl_and_parquet(tmp_path):
    """A folder of a 300-paragraph .txt, a .jsonl and a .parquet with the text under another name; and one document."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog near the river bank".split()
    paragraphs = [" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(300)]
    (corpus / "prose.txt").write_text("\n\n".join(paragraphs) + "\n")
    (corpus / "notes.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs[:50]))
    pq.write_table(pa.table({"body": paragraphs[:50]}), corpus / "rows.parquet")
    common = ["pretrain", "--stage", "1", "--preset", "nano-d2", "--steps", "2", "--vocab-size", "300",
              "--no-progress"]
    run = nanoqwen(*common, "--data", str(corpus), "--text-field", "body", "--out", str(tmp_path / "a"))
    assert run.returncode == 0, run.stderr
    assert f"data: {corpus}: 400 documents, 8 held out\n" in run.stdout
    assert re.search(r"data: train 392 documents, [\d,]+ tokens \| held out 8 documents, [\d,]+ tokens\n",
                     run.stdout), run.stdout
    (tmp_path / "one.txt").write_text(paragraphs[0] + "\n")
    run = nanoqwen(*common, "--data", str(tmp_path / "one.txt"), "--out", str(tmp_path / "b"))
    assert run.returncode == 0, run.stderr
    assert re.search(r"data: train 1 documents, \d+ tokens \(seen \d+\.\d times\) \| held out: none", run.stdout)


def test_bad_input_ends_in_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "nothing.txt").write_text("")
    base = ["pretrain", "--preset", "nano-d2", "--no-progress", "--vocab-size", "512"]
    cases = [(["--stage", "1", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a")], "no data at"),
             (["--stage", "1", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "b")], "empty"),
             (["--stage", "1", "--seq-len", "100000", "--out", str(tmp_path / "c")], "above the model's limit"),
             (["--stage", "2", "--out", str(tmp_path / "d")], "run --stage 1 first"),
             (["--stage", "1", "--resume", "--out", str(tmp_path / "f")], "rerun without --resume to start it afresh"),
             (["--stage", "1", "--data", "hf:someone/corpus", "--out", str(tmp_path / "g")], "pip install datasets")]
    blocked = tmp_path / "blocked" / "datasets"  # `datasets` as if not installed, wherever it is
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'datasets'\")\n")
    for args, message in cases:
        run = nanoqwen(*base, *args, env={**ENV, "PYTHONPATH": f"{tmp_path / 'blocked'}{os.pathsep}{REPO}"})
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    out = str(tmp_path / "e")
    assert nanoqwen(*base, "--stage", "1", "--steps", "2", "--out", out).returncode == 0
    run = nanoqwen("pretrain", "--preset", "nano-d4", "--stage", "1", "--resume", "--out", out, "--no-progress")
    assert run.returncode == 2 and "incompatible" in run.stderr and len(run.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# The three stages end to end

def task_accuracy(path, task, n=8):
    """Greedy completions of held-out questions of one family at difficulty 1 (English), verified by the task."""
    return evaluate.completion_accuracy(path, n=n, seed=123, max_new_tokens=64, device="cpu", tasks=[task],
                                        difficulty=1, languages=["en"])["accuracy"]


def unigram_entropy(data_dir) -> float:
    meta = data.read_meta(data_dir)
    tokens = np.concatenate([np.fromfile(f"{data_dir}/tokens_{n}.bin", dtype=meta["dtype"]) for n in meta["shards"]])
    p = np.bincount(tokens) / len(tokens)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


SLOW = pytest.mark.skipif(not os.environ.get("NANOQWEN_SLOW"), reason="the speedrun's check: NANOQWEN_SLOW=1")
BUDGET = dict(fast=(100, 30, 60), slow=(600, 200, 200))  # steps of stages 1, 2, 3 (slow: the speedrun's check)


@pytest.mark.parametrize("budget", ["fast", pytest.param("slow", marks=SLOW)])
def test_three_stages(tmp_path, budget):
    s1, s2, s3 = BUDGET[budget]
    out, common = str(tmp_path), ["--preset", "nano-d2", "--out", str(tmp_path), "--no-progress", "--log-every", "50"]
    started = time.time()
    cli.main(["pretrain", "--stage", "1", "--steps", str(s1), "--vocab-size", "1024", *common])
    stage1, stage1_seconds = latest_checkpoint(f"{out}/stage1"), time.time() - started
    final = [json.loads(line) for line in open(f"{out}/stage1/metrics.jsonl")][-1]
    entropy = unigram_entropy(f"{out}/stage1/data/train")
    print(f"stage 1: {stage1_seconds:.0f}s, loss {final['loss']:.3f}, held-out {final['val_loss']:.3f}, "
          f"unigram entropy {entropy:.3f}")
    assert final["val_loss"] < entropy - 1.0  # ~20 s on 2 idle cores (the budget is 100 steps of 4,096 tokens)

    cli.main(["pretrain", "--stage", "2", "--steps", str(s2), *common])
    stage2 = latest_checkpoint(f"{out}/stage2")
    # stage 2 is for the reasoning data: its held-out loss falls (accuracy rises only at the slow budget)
    reasoning = {name: evaluate.loss_at_lengths(path, f"{out}/stage2/data/test", [256])[256]
                 for name, path in (("stage 1", stage1), ("stage 2", stage2))}
    print(f"held-out loss on the stage-2 data: {reasoning}")
    assert reasoning["stage 2"] < reasoning["stage 1"]

    cli.main(["pretrain", "--stage", "3", "--steps", str(s3), *common])
    stage3 = latest_checkpoint(f"{out}/stage3")
    assert json.load(open(f"{stage3}/config.json"))["rope_theta"] == 1_000_000.0
    # stage 3 is for long context: at 4x the stage-1 length the loss falls, and is no worse than at 1x
    before = evaluate.loss_at_lengths(stage2, f"{out}/stage3/data/test", [1024])
    losses = evaluate.loss_at_lengths(stage3, f"{out}/stage3/data/test", [256, 1024])
    print(f"stage 3: loss at 1024 {before[1024]:.3f} before, {losses[1024]:.3f} after; at 256 {losses[256]:.3f}")
    assert losses[1024] < before[1024] and losses[1024] <= losses[256] + 0.01
    if budget == "slow":  # what a small budget cannot show: held-out accuracy and passkey retrieval
        families = ["word_problems", "units", "logic"]
        accuracy_before = {task: task_accuracy(stage1, task) for task in families}
        accuracy_after = {task: task_accuracy(stage2, task) for task in families}
        passkey = evaluate.passkey_accuracy(stage3, 2048, device="cpu")
        print(f"held-out accuracy after stage 1 {accuracy_before}, after stage 2 {accuracy_after}; passkey at 2048 "
              f"tokens: {passkey['exact']:.0%} exact, {passkey['digits']:.0%} digits (chance 10%)")
        assert sum(accuracy_after.values()) > sum(accuracy_before.values())
        assert passkey["digits"] > 0.2
