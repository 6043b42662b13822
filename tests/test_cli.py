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
    import nanoqwen.generation.api as api
    seen, real_generate = [], api.generate

    def recording_generate(model, tokenizer, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_generate(model, tokenizer, messages, **kwargs)

    lines = iter(["/budget 2", "first", "second", "/reset", "third", "/exit"])
    monkeypatch.setattr(api, "generate", recording_generate)
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


def test_chat_shows_the_commands_for_an_unknown_one(thinker_dir, monkeypatch, capsys):
    """An unknown /command (or a known one with stray words) is not sent to the model; soft switches and lines that
    only start with a slash are messages."""
    import nanoqwen.generation.api as engine
    seen, real_generate = [], engine.generate

    def recording_generate(model, tokenizer, messages, **kwargs):
        seen.append(messages[-1]["content"])
        return real_generate(model, tokenizer, messages, **kwargs)

    lines = iter(["/thnik", "/reset everything", "/no_think hi", "/usr/bin is a folder", "/exit"])
    monkeypatch.setattr(engine, "generate", recording_generate)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    cli.main(["chat", "--model", thinker_dir, "--device", "cpu", "--max-new-tokens", "4"])
    assert seen == ["/no_think hi", "/usr/bin is a folder"]
    out = capsys.readouterr().out
    assert f"unknown command '/thnik'; {cli.CHAT_HELP}\n" in out
    assert f"unknown command '/reset everything'; {cli.CHAT_HELP}\n" in out


def test_hidden_think_blocks_leave_no_blank_line_runs(tok, monkeypatch, capsys):
    """Thinking that starts and ends with newlines, then an answer after more: shown as dimmed thinking, one blank
    line, the answer (no tags, no runs of blank lines); an empty think block shows nothing at all."""
    from nanoqwen.generation import generate
    newline, blank, blank3, blank4 = (tok.encode(s)[0] for s in ("\n", "\n\n", "\n\n\n", "\n\n\n\n"))
    word, answer = tok.encode(" hmm")[0], tok.encode("Hello")[0]
    thinks = {newline: tok.think_start_id, tok.think_start_id: blank, blank: word, word: blank3,
              blank3: tok.think_end_id, tok.think_end_id: blank4, blank4: answer, answer: tok.eos_token_id}
    empty = {newline: tok.think_start_id, tok.think_start_id: blank, blank: tok.think_end_id,
             tok.think_end_id: blank4, blank4: answer, answer: tok.eos_token_id}
    shown = []
    for script in (thinks, empty):
        stream = generate(scripted_model(script), tok, [{"role": "user", "content": "hi"}], stream=True,
                          max_new_tokens=20)
        result = cli._print_stream(stream, color=True)
        shown.append(capsys.readouterr().out)
        assert result.content == "Hello"
    assert shown == [DIM + " hmm" + RESET + "\n\nHello", "Hello"]
    cli._print_stream(generate(scripted_model(thinks), tok, [{"role": "user", "content": "hi"}], stream=True,
                               max_new_tokens=20), color=False)
    assert capsys.readouterr().out == "<think>\n\n hmm\n\n\n</think>\n\n\n\nHello"  # not a terminal: as generated


def test_generate_prompt_flag_and_stdin(thinker_dir):
    out = nanoqwen("generate", "--model", thinker_dir, "--prompt", "hi", "--thinking-budget", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("<think> hmm hmm\n\nConsidering the limited time") and out.stdout.endswith("Hello\n")
    drafted = nanoqwen("generate", "--model", thinker_dir, "--prompt", "hi", "--thinking-budget", "2", "--speculative",
                       "ngram", "--num-speculative-tokens", "5")
    assert drafted.returncode == 0 and drafted.stdout == out.stdout, drafted.stderr
    paged = nanoqwen("generate", "--model", thinker_dir, "--prompt", "hi", "--thinking-budget", "2", "--block-size",
                     "4", "--kv-cache-memory-bytes", "1MiB", "--no-enable-prefix-caching")
    assert paged.returncode == 0 and paged.stdout == out.stdout, paged.stderr
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


def test_generate_json_schema(tmp_path):
    """--json-schema FILE: a random model's answer is JSON of that schema (checked by jsonschema); a schema file
    that is not JSON, or that cannot compile, is one line."""
    import jsonschema
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog\n\n" * 3, "hello world\n"] * 20, 300,
                                str(tmp_path))
    save_model(random_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=1024), str(tmp_path))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "w": {"enum": ["yes", "no"]}}, "required": ["n", "w"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = nanoqwen("generate", "--model", str(tmp_path), "--prompt", "hi", "--no-think", "--temperature", "1",
                   "--seed", "0", "--max-new-tokens", "60", "--json-schema", str(tmp_path / "schema.json"), "--json")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(json.loads(out.stdout)["content"]), schema)
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "typo.json").write_text('{"type": "strnig"}')
    for name, words in (("bad.json", "is not JSON"), ("typo.json", "strnig"), ("absent.json", "absent.json")):
        out = nanoqwen("generate", "--model", str(tmp_path), "--prompt", "hi", "--json-schema", str(tmp_path / name))
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr


@pytest.mark.parametrize("case", ["missing", "broken", "too_long", "bad_top_p", "bad_number", "bad_tokens",
                                  "bad_draft", "empty_stdin", "blank_prompt", "bad_block", "tiny_cache"])
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
        "empty_stdin": ["--model", thinker_dir],
        "blank_prompt": ["--model", thinker_dir, "--prompt", " \n"],
        "bad_block": ["--model", thinker_dir, "--block-size", "12"],
        "tiny_cache": ["--model", thinker_dir, "--prompt", "hi", "--block-size", "4", "--num-blocks", "3"],
    }[case]
    out = nanoqwen("generate", *args, stdin="")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("nanoqwen generate: error: ") and out.stderr.count("\n") == 1, out.stderr
    expected = {"missing": "no checkpoint folder", "broken": "not valid JSON", "too_long": "context",
                "bad_top_p": "--top-p", "bad_number": "expected a number", "bad_tokens": "--max-new-tokens",
                "bad_draft": "--speculative", "empty_stdin": "the prompt is empty", "blank_prompt": "the prompt is empty",
                "bad_block": "--block-size", "tiny_cache": "exceed the cache"}[case]
    assert expected in out.stderr


def test_init_writes_a_folder_every_command_opens(tmp_path, capsys):
    """The official tokenizer (the vocabulary grown to fit it), or the one named with --tokenizer (the preset's
    vocabulary when it fits): either way generate opens the folder and the tokenizer is saved beside the weights."""
    from nanoqwen.checkpoint import load
    own = train_tokenizer(["the quick brown fox jumps over the lazy dog\n"] * 20, 300, str(tmp_path / "own"))
    cli.main(["init", "nano-d2", "--out", str(tmp_path / "official")])
    assert "vocab_size 8,192 -> 151,680 to fit the official Qwen3 tokenizer (151,669 tokens)" in capsys.readouterr().out
    cli.main(["init", "nano-d2", "--out", str(tmp_path / "named"), "--tokenizer", str(tmp_path / "own")])
    for name, vocab_size, tokenizer in (("official", 151680, load_tokenizer()), ("named", 8192, own)):
        model, loaded = load(str(tmp_path / name), device="cpu")
        assert model.config.vocab_size == vocab_size and loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode("the quick fox") == tokenizer.encode("the quick fox")
    out = nanoqwen("generate", "--model", str(tmp_path / "named"), "--prompt", "the", "--max-new-tokens", "3",
                   "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["usage"]["completion_tokens"] == 3, out.stderr
    with pytest.raises(SystemExit):
        cli.main(["init", "nano-d2", "--out", str(tmp_path / "small"), "--vocab-size", "256", "--tokenizer",
                  str(tmp_path / "own")])
    assert capsys.readouterr().err == (f"nanoqwen init: error: --vocab-size 256 is smaller than the tokenizer at "
                                       f"{tmp_path / 'own'} (300 tokens)\n")
    assert not os.path.exists(tmp_path / "small")
