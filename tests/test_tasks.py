"""The task families: every (task, language, difficulty) verifies its own answer, rejects wrong ones, parses
malformed text without raising, splits train/test disjointly and deterministically; countdown never evaluates code."""
import random
import re

import pytest

from nanoqwen.tasks import (LANGUAGES, TASKS, answer_line, format_document, general_text, get_task, is_test,
                            iter_examples, sample_examples, to_messages)
from nanoqwen.tasks.countdown import evaluate

CASES = [(name, lang, d) for name in TASKS for lang in TASKS[name].languages for d in range(1, 6)]
HAN = re.compile(r"[\u4e00-\u9fff]")


def examples(name, lang, difficulty, n=20, seed=0):
    rng = random.Random(f"{name}/{lang}/{difficulty}/{seed}")
    return [TASKS[name].generate(rng, difficulty, lang) for _ in range(n)]


def test_at_least_six_families_in_three_languages():
    assert len(TASKS) >= 6
    assert all(set(task.languages) >= {"en", "zh"} for task in TASKS.values())
    assert LANGUAGES[:2] == ("en", "zh")


@pytest.mark.parametrize("name,lang,difficulty", CASES)
def test_examples_verify_themselves(name, lang, difficulty):
    task = TASKS[name]
    for ex in examples(name, lang, difficulty):
        assert (ex.task, ex.language, ex.difficulty) == (name, lang, difficulty)
        assert ex.question and ex.steps and ex.answer and "key" in ex.meta
        assert task.verify(answer_line(ex.answer, ex.language), ex), ex
        assert task.verify(format_document(ex), ex), ex
        for thinking in (True, False):
            messages = to_messages(ex, thinking=thinking)
            assert messages[0] == {"role": "user", "content": ex.question}
            assert ("reasoning_content" in messages[1]) == thinking
            assert task.verify(messages[1]["content"], ex)
        assert not task.verify(answer_line("12345678987", ex.language), ex)
        assert not task.verify("I don't know.", ex)
        assert bool(HAN.search(ex.question + "".join(ex.steps))) == (lang == "zh")  # each language its own script


def wrong_answer(ex):
    if ex.task == "countdown":
        return ex.answer + "+1"
    if ex.task == "lists":
        return ex.answer.replace("]", ", 1]") if "[" in ex.answer else "-1"
    if ex.task == "logic":
        return next(name for name in ex.meta["names"] if name != ex.answer)
    return str(int(ex.answer) + 1)


@pytest.mark.parametrize("name", list(TASKS))
def test_wrong_answers_fail(name):
    task = TASKS[name]
    for ex in examples(name, "en", 3, n=30):
        wrong = wrong_answer(ex)
        assert not task.verify(answer_line(wrong), ex), (ex, wrong)
        assert task.verify(f"Answer: {wrong}\nWait, let me redo it.\nAnswer: {ex.answer}", ex)  # the last line wins
        assert not task.verify(f"Answer: {ex.answer}\nNo.\nAnswer: {wrong}", ex)


@pytest.mark.parametrize("text,expected", [
    ("Answer: 42", "42"), ("answer: 42.", "42"), ("答案：42", "42"), ("答案: 42。", "42"), ("Réponse : 42", "42"),
    ("Final answer: **42**", "42"), ("The answer is \\boxed{42}", "42"), ("Answer:\n42", "42"),
    ("Answer: 1\nAnswer: 2", "2"), ("so we get\n42", "42"), ("blah\n(8-2)*4", "(8-2)*4"), ("x\n[1, 3, 7]", "[1, 3, 7]"),
])
def test_extract_answer_formats(text, expected):
    assert get_task("arithmetic").extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "Answer:", "no answer here", "The answer is", None, 42, "\x00\ufffd",
                                  "答案："])
def test_extract_answer_malformed(text):
    for task in TASKS.values():
        assert task.extract_answer(text) is None
        ex = task.generate(random.Random(0))
        assert task.verify(text, ex) is False


def test_answer_line_and_bare_fallback():
    assert answer_line(42) == "Answer: 42" and answer_line(42, "zh") == "答案：42"
    ex = get_task("arithmetic").generate(random.Random(1), 1)
    assert get_task("arithmetic").verify(f"Let me think.\n{ex.answer}", ex)
    assert get_task("arithmetic").verify(f"The sum is {ex.answer}.\nAnswer: {int(ex.answer):,}", ex)


def test_determinism_and_split_disjointness():
    first = sample_examples(200, seed=7)
    assert first == sample_examples(200, seed=7)
    assert first != sample_examples(200, seed=8)
    train = sample_examples(3000, split="train", seed=0)
    test = sample_examples(300, split="test", seed=0)
    assert not any(is_test(ex) for ex in train) and all(is_test(ex) for ex in test)
    assert not {ex.question for ex in train} & {ex.question for ex in test}
    assert not {(ex.task, ex.meta["key"]) for ex in train} & {(ex.task, ex.meta["key"]) for ex in test}
    assert {ex.task for ex in test} == set(TASKS) and {ex.language for ex in test} == set(LANGUAGES)


def test_filters_and_held_out_difficulty():
    train = sample_examples(500, seed=1, difficulty=(1, 4), tasks=["countdown", "lists"], languages=["zh"])
    assert {ex.difficulty for ex in train} == {1, 2, 3, 4}
    assert {ex.task for ex in train} == {"countdown", "lists"} and {ex.language for ex in train} == {"zh"}
    assert {ex.difficulty for ex in sample_examples(50, split="test", difficulty=5)} == {5}
    stream = iter_examples(seed=3)
    assert len([next(stream) for _ in range(100)]) == 100
    with pytest.raises(ValueError, match="arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError):
        sample_examples(1, difficulty=6)
    with pytest.raises(ValueError):
        sample_examples(1, languages=["xx"])


@pytest.mark.parametrize("name", list(TASKS))
def test_difficulty_grows_the_problem(name):
    sizes = [sum(len(format_document(ex)) for ex in examples(name, "en", d, n=40)) for d in range(1, 6)]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes


def test_arithmetic_sizes():
    assert all(len(ex.meta["key"]) == 5 and "+" in ex.meta["key"] for ex in examples("arithmetic", "en", 1))
    assert any(ex.meta["op"] == "×" for ex in examples("arithmetic", "en", 5))


def test_countdown_accepts_alternatives_and_rejects_cheats():
    task = get_task("countdown")
    ex = task.generate(random.Random(0), 3)
    ex.meta.update(numbers=[8, 2, 4, 1], target=24)
    for good in ["(8-2)*4*1", "4*(8-2)/1", "1*4*(8-2) = 24", "24 = (8 - 2) × 4 × 1", "((8-2))*(4*1)", "(8+4)*2*1",
                 "`(8+4)*2/1`"]:
        assert task.verify(answer_line(good), ex), good
    for bad in ["(8-2)*4", "8*2+4*1+0", "(8-2)*4*1+0", "24", "8*3*1", "__import__('os').system('ls')", "2**4+8*1",
                "(8-2)*4*True", "8//2*4+1", "-(8-2)*-4*1", "(8-2)*4*1.0", "x=1", "", "1/0+8*2*4"]:
        assert not task.verify(answer_line(bad), ex), bad
    assert evaluate("__import__('os')", [1]) is None and evaluate("2**10", [2, 10]) is None
    assert evaluate("(8-2)*4", [8, 2, 4]) == 24 and evaluate("7/2", [7, 2]) * 2 == 7


def test_logic_accepts_a_sentence_naming_one_person():
    task = get_task("logic")
    ex = task.generate(random.Random(2), 2)
    other = next(n for n in ex.meta["names"] if n != ex.answer)
    assert task.verify(f"Answer: {ex.answer} is the one.", ex)
    assert not task.verify(f"Answer: {ex.answer} or {other}", ex)
    assert task.verify(f"So it must be\n{ex.answer}", ex)


@pytest.mark.parametrize("lang", ["en", "zh", "fr"])
def test_general_text(lang):
    rng = random.Random(0)
    docs = [general_text(rng, lang) for _ in range(50)]
    assert all(20 < len(doc) < 2500 for doc in docs) and len(set(docs)) > 40
    assert all(bool(HAN.search(doc)) == (lang == "zh") for doc in docs)
    assert [general_text(random.Random(5), lang) for _ in range(2)] == [general_text(random.Random(5), lang)] * 2


def test_documents_are_short():
    docs = [format_document(ex) for ex in sample_examples(600, seed=2)]
    lengths = sorted(len(doc) for doc in docs)
    assert lengths[len(lengths) // 2] < 800 and lengths[-1] < 4000  # ~chars; digits are one token each in Qwen3
