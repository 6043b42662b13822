"""`nanoqwen chat` through a pseudo-terminal, as a person types, and `nanoqwen generate` as a subprocess."""
import json
import os
import subprocess
import sys

import pexpect
import pytest

from nanoqwen import cli
from nanoqwen.checkpoint import save_model
from nanoqwen.tokenizer import load_tokenizer, train_tokenizer
from test_engine import random_model, scripted_model, thinker_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
DIM, RESET = "\x1b[2m", "\x1b[0m"


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory):
    """A checkpoint folder (no tokenizer files: the official vocabulary) of the scripted thinker of test_engine."""
    path = tmp_path_factory.mktemp("thinker")
    save_model(scripted_model(thinker_script(load_tokenizer())[0]), str(path))
    return str(path)


@pytest.fixture(scope="module")
def long_thinker_dir(tmp_path_factory):
    """The same thinker with a 64K context: its thinking outlasts any Ctrl-C however fast the machine decodes."""
    path = tmp_path_factory.mktemp("long_thinker")
    model = scripted_model(thinker_script(load_tokenizer())[0])
    model.config.max_position_embeddings = 65536
    save_model(model, str(path))
    return str(path)


def nanoqwen(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "nanoqwen", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=120)


def test_chat_session_in_a_terminal(long_thinker_dir):
    child = pexpect.spawn(sys.executable, ["-m", "nanoqwen", "chat", "--model", long_thinker_dir,
                                           "--max-new-tokens", "60000"], env=ENV, cwd=REPO, encoding="utf-8",
                          timeout=60)
    try:
        child.expect(">>> ")
        assert "/budget" in child.before  # the banner lists the commands
        child.sendline("hi there")
        child.expect_exact(DIM + " hmm hmm hmm")  # thinking streams, dimmed, and would go on for 60,000 tokens
        child.sendintr()  # Ctrl-C stops the answer, not the chat
        child.expect_exact("[interrupted]")
        child.expect(">>> ")

        child.sendline("/budget 8")
        child.expect("thinking budget: 8 tokens")
        child.expect(">>> ")
        child.sendline("and now?")
        child.expect(">>> ")
        reply = child.before
        assert reply.count("hmm") == 8 and "Considering the limited time by the user" in reply
        assert RESET + "\r\n\r\nHello" in reply and "<think>" not in reply  # tags hidden, answer not dimmed

        child.sendline("/no_think")
        child.expect("thinking off")
        child.expect(">>> ")
        child.sendline("quick answer please")
        child.expect(">>> ")
        assert child.before.split("\n", 1)[1].strip() == "Hello"  # no thinking at all

        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_keeps_history_with_reasoning(thinker_dir, monkeypatch, capsys):
    """Assistant turns are stored with reasoning_content (the template drops it from older turns)."""
    import nanoqwen.engine as engine
    seen, real_generate = [], engine.generate

    def recording_generate(model, tokenizer, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_generate(model, tokenizer, messages, **kwargs)

    lines = iter(["/budget 2", "first", "second", "/reset", "third", "/exit"])
    monkeypatch.setattr(engine, "generate", recording_generate)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    cli.main(["chat", "--model", thinker_dir, "--device", "cpu"])
    first, second, third = seen
    assert first == [{"role": "user", "content": "first"}]
    assistant = second[1]
    assert assistant["role"] == "assistant" and assistant["content"] == "Hello"
    assert assistant["reasoning_content"].startswith(" hmm hmm\n\nConsidering")
    assert second[2] == {"role": "user", "content": "second"}
    assert third == [{"role": "user", "content": "third"}]
    assert "Hello" in capsys.readouterr().out


def test_generate_prompt_flag_and_stdin(thinker_dir):
    out = nanoqwen("generate", "--model", thinker_dir, "--prompt", "hi", "--thinking-budget", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("<think> hmm hmm\n\nConsidering the limited time") and out.stdout.endswith("Hello\n")
    drafted = nanoqwen("generate", "--model", thinker_dir, "--prompt", "hi", "--thinking-budget", "2", "--speculative",
                       "ngram", "--num-speculative-tokens", "5")
    assert drafted.returncode == 0 and drafted.stdout == out.stdout, drafted.stderr
    out = nanoqwen("generate", "--model", thinker_dir, "--no-think", "--json", stdin="hi from stdin")
    result = json.loads(out.stdout)
    assert result["content"] == "Hello" and result["finish_reason"] == "stop"
    expected_prompt = load_tokenizer().apply_chat_template([{"role": "user", "content": "hi from stdin"}],
                                                           add_generation_prompt=True, enable_thinking=False)
    assert result["usage"] == {"prompt_tokens": len(expected_prompt), "completion_tokens": 2, "reasoning_tokens": 0}


def test_generate_raw_from_a_folder_with_its_own_tokenizer(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog\n\n" * 3, "hello world, hello there\n"] * 20
    tokenizer = train_tokenizer(texts, 300, str(tmp_path))
    save_model(random_model(vocab_size=tokenizer.vocab_size), str(tmp_path))
    out = nanoqwen("generate", "--model", str(tmp_path), "--raw", "--prompt", "the quick", "--max-new-tokens", "5",
                   "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("case", ["missing", "broken", "too_long", "bad_top_p", "bad_number", "bad_tokens",
                                  "bad_draft"])
def test_generate_errors_are_one_line(thinker_dir, tmp_path, case):
    (tmp_path / "config.json").write_text("{not json")
    args = {
        "missing": ["--model", str(tmp_path / "nowhere"), "--prompt", "hi"],
        "broken": ["--model", str(tmp_path), "--prompt", "hi"],
        "too_long": ["--model", thinker_dir, "--prompt", "word " * 1100],
        "bad_top_p": ["--model", thinker_dir, "--top-p", "1.5"],
        "bad_number": ["--model", thinker_dir, "--temperature", "warm"],
        "bad_tokens": ["--model", thinker_dir, "--max-new-tokens", "0"],
        "bad_draft": ["--model", thinker_dir, "--speculative", "eagle"],
    }[case]
    out = nanoqwen("generate", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("nanoqwen generate: error: ") and out.stderr.count("\n") == 1, out.stderr
    expected = {"missing": "no checkpoint folder", "broken": "not valid JSON", "too_long": "context",
                "bad_top_p": "--top-p", "bad_number": "expected a number", "bad_tokens": "--max-new-tokens",
                "bad_draft": "--speculative"}[case]
    assert expected in out.stderr
