"""The Qwen3 chat template in plain Python: rendering, secure tokenization, loss masks, output parsing.

`render_parts` reproduces the official Jinja template (QWEN3_CHAT_TEMPLATE) byte for byte, but returns the text as
parts that remember who wrote them: the template (its special tokens are control tokens) or the caller (message
content, reasoning, tool arguments and schemas: always plain text, so `<|im_start|>` in a user message stays text).
Templates shipped by other checkpoints run in a sandboxed Jinja environment with transformers' conventions.
"""
import datetime
import functools
import importlib.resources
import json
import unicodedata
import uuid
from typing import NamedTuple

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The official Qwen3 hybrid-thinking template, byte for byte (4168 bytes, sha256 a55ee1b1...74d8).
# The official Qwen3 hybrid template, byte for byte: written into saved tokenizer_config.json files, and what a
# checkpoint's own template is compared with to pick the built-in renderer.
QWEN3_CHAT_TEMPLATE = importlib.resources.files(__package__).joinpath("qwen3_chat_template.jinja").read_text("utf-8")

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
# transformers copies reasoning given under these names into `reasoning_content`, the one the template reads
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Part(NamedTuple):
    text: str
    from_template: bool  # written by the template: its special-token surface forms are control tokens
    learned: bool  # an assistant token the model must learn to produce (loss mask 1)


def tojson(value) -> str:
    """transformers' chat-template `tojson`: json.dumps without ASCII escaping, default separators."""
    return json.dumps(value, ensure_ascii=False)


def is_official_template(source: str | None) -> bool:
    # trim_blocks eats one newline after the last tag, so a trailing newline renders the same
    return source in (QWEN3_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE + "\n")


class _PartWriter:
    def __init__(self):
        self.parts: list[Part] = []
        self.learning = False

    def template(self, text: str):
        self.parts.append(Part(text, True, self.learning))

    def data(self, text: str):
        self.parts.append(Part(text, False, self.learning))


def _prepare(messages: list[dict]) -> list[dict]:
    """Drop None values (as transformers does: APIs send content=None) and alias reasoning field names."""
    prepared = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        prepared.append(message)
    return prepared


def _last_query_index(messages: list[dict]) -> int:
    """Index of the last real user query; tool results pasted as user text do not count."""
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index].get("content")
        is_tool_result = isinstance(content, str) and content.startswith("<tool_response>") and content.endswith(
            "</tool_response>"
        )
        if messages[index].get("role") == "user" and isinstance(content, str) and not is_tool_result:
            return index
    return len(messages) - 1


def _system_text(message: dict) -> str:
    if not isinstance(message.get("content"), str):
        raise TypeError("the Qwen3 template needs a string system message content")  # the Jinja template fails too
    return message["content"]


def _render_system(out: _PartWriter, first: dict, tools: list | None):
    has_system = first.get("role") == "system"
    if tools:
        out.template("<|im_start|>system\n")
        if has_system:
            out.data(_system_text(first))
            out.template("\n\n")
        out.template(TOOLS_PREAMBLE)
        for tool in tools:
            out.template("\n")
            out.data(tojson(tool))
        out.template(TOOLS_POSTAMBLE)
    elif has_system:
        out.template("<|im_start|>system\n")
        out.data(_system_text(first))
        out.template("<|im_end|>\n")


def _render_tool_call(out: _PartWriter, call: dict):
    if call.get("function"):  # OpenAI wraps name and arguments in "function"
        call = call["function"]
    out.template('<tool_call>\n{"name": "')
    out.data(str(call["name"]) if "name" in call else "")
    out.template('", "arguments": ')
    arguments = call.get("arguments")
    out.data(arguments if isinstance(arguments, str) else tojson(arguments))
    out.template("}\n</tool_call>")


def _render_assistant(out: _PartWriter, message: dict, content: str, after_query: bool, is_last: bool, enable_thinking):
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:  # reasoning inlined in the content, as in raw model output
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    out.template("<|im_start|>assistant\n")
    out.learning = True
    # Turns before the last user query lose their reasoning; later ones keep it, and the last always has a block
    if after_query and (is_last or reasoning):
        thought = reasoning.strip("\n")
        # with enable_thinking=False the generation prompt writes the empty block, so it is prompt, not target
        out.learning = bool(thought) or enable_thinking is not False
        out.template("<think>\n")
        out.data(thought)
        out.template("\n</think>\n\n")
        out.learning = True
        out.data(content.lstrip("\n"))
    else:
        out.data(content)
    for position, call in enumerate(message.get("tool_calls") or []):
        if position > 0 or content:
            out.template("\n")
        _render_tool_call(out, call)
    out.template("<|im_end|>")
    out.learning = False
    out.template("\n")


def _render_tool_result(out: _PartWriter, messages: list[dict], index: int, content: str):
    # consecutive tool results share one user turn
    if index == 0 or messages[index - 1].get("role") != "tool":
        out.template("<|im_start|>user")
    out.template("\n<tool_response>\n")
    out.data(content)
    out.template("\n</tool_response>")
    if index == len(messages) - 1 or messages[index + 1].get("role") != "tool":
        out.template("<|im_end|>\n")


def render_parts(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                 enable_thinking: bool | None = None) -> list[Part]:
    """Render OpenAI-style messages exactly as the official Qwen3 template does, as attributed parts."""
    messages = _prepare(messages)
    if not messages:
        raise ValueError("cannot render an empty conversation")
    out = _PartWriter()
    _render_system(out, messages[0], tools)
    last_query = _last_query_index(messages)
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        content = content if isinstance(content, str) else ""  # the template renders non-string content as ""
        if role == "user" or (role == "system" and index > 0):
            out.template(f"<|im_start|>{role}\n")
            out.data(content)
            out.template("<|im_end|>\n")
        elif role == "assistant":
            _render_assistant(out, message, content, index > last_query, index == len(messages) - 1, enable_thinking)
        elif role == "tool":
            _render_tool_result(out, messages, index, content)
    if add_generation_prompt:
        out.template("<|im_start|>assistant\n")
        if enable_thinking is False:
            out.template("<think>\n\n</think>\n\n")
    return out.parts


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
           enable_thinking: bool | None = None) -> str:
    return "".join(part.text for part in render_parts(messages, tools, add_generation_prompt, enable_thinking))


def _encode_run(tokenizer, run: list[tuple[str, bool]], ids: list[int], mask: list[int]):
    """Encode text between two control tokens in one piece (as transformers does) and mask it by byte overlap."""
    if not run:
        return
    run_ids = tokenizer.encode("".join(text for text, _ in run))
    ids += run_ids
    flags = {learned for text, learned in run if text}
    if len(flags) <= 1:
        mask += [int(any(flags))] * len(run_ids)
        return
    learned_spans, start = [], 0
    for text, learned in run:
        end = start + len(unicodedata.normalize("NFC", text).encode())
        if learned:
            learned_spans.append((start, end))
        start = end
    start = 0
    for token_id in run_ids:  # a token straddling the header/answer boundary counts as answer
        end = start + len(tokenizer.decode_bytes([token_id]))
        mask.append(int(any(lo < end and start < hi for lo, hi in learned_spans)))
        start = end


def encode_parts(tokenizer, parts: list[Part]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask; only special tokens written by the template become control tokens."""
    ids, mask, run = [], [], []
    for text, from_template, learned in parts:
        for piece in tokenizer.split_special(text) if from_template else [text]:
            if isinstance(piece, int):
                _encode_run(tokenizer, run, ids, mask)
                run = []
                ids.append(piece)
                mask.append(int(learned))
            else:
                run.append((piece, learned))
    _encode_run(tokenizer, run, ids, mask)
    return ids, mask


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}` blocks (assistant-mask markers) and render their body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson_filter(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """A checkpoint's template in a sandbox (templates from the Hub are untrusted code), as transformers sets it up."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson_filter
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def render_jinja(source: str, messages: list[dict], tools: list[dict] | None = None,
                 add_generation_prompt: bool = False, enable_thinking: bool | None = None, **variables) -> str:
    variables.update(messages=_prepare(messages), tools=tools, add_generation_prompt=add_generation_prompt)
    if enable_thinking is not None:  # left undefined otherwise, which templates test with `is defined`
        variables["enable_thinking"] = enable_thinking
    return compile_template(source).render(**variables)


def apply_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                        add_generation_prompt: bool = False, enable_thinking: bool | None = None,
                        tokenize: bool = True) -> list[int] | str:
    if is_official_template(tokenizer.chat_template):
        parts = render_parts(messages, tools, add_generation_prompt, enable_thinking)
        return encode_parts(tokenizer, parts)[0] if tokenize else "".join(part.text for part in parts)
    # Custom template: spans cannot be tracked, so specials are parsed in the whole text, as transformers does
    text = render_jinja(tokenizer.chat_template, messages, tools, add_generation_prompt, enable_thinking,
                        eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    return tokenizer.encode(text, allow_special=True) if tokenize else text


def render_for_training(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                        enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a finished conversation; ids equal apply_chat_template(tokenizer, messages).

    The mask is 1 on what each assistant turn must produce: think block, answer, tool calls and the closing
    <|im_end|>; 0 on the `<|im_start|>assistant\\n` header, the newline after <|im_end|> and all other turns.
    An empty think block is learned (the model must emit it after /no_think) unless enable_thinking=False,
    where the generation prompt writes it.
    """
    if not is_official_template(tokenizer.chat_template):
        raise NotImplementedError("loss masks need the Qwen3 template; this tokenizer has a custom chat template")
    return encode_parts(tokenizer, render_parts(messages, tools, False, enable_thinking))


THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE = "<think>", "</think>", "<tool_call>", "</tool_call>"
END_MARKERS = ("<|im_end|>", "<|endoftext|>")  # a stop token left at the end of the text is not content
_HELD_TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, *END_MARKERS)  # a text ending with the start of one waits


def tool_call(value) -> dict | None:
    """The {"name", "arguments"} of the JSON value in a `<tool_call>` block, or None when it is not a call. The
    arguments are always JSON text (a string value stays a JSON string); "parameters" is read as "arguments", as
    SGLang does."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value["arguments"] if "arguments" in value else value.get("parameters", {})
    return {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


_DECODER = json.JSONDecoder()


def _call_block(text: str, start: int, final: bool) -> tuple[int, dict | None] | None:
    """(end, call) of the `<tool_call>` block opened at text[start]: a call ends after its JSON value's
    `</tool_call>` (so the tag may appear inside its strings); a malformed block (call None) at the first
    `</tool_call>`. None while the text so far cannot tell (and, when final, for an unclosed block)."""
    body = start + len(CALL_OPEN)
    value_start = body + len(text[body:]) - len(text[body:].lstrip())
    try:
        value, value_end = _DECODER.raw_decode(text, value_start)
    except (ValueError, RecursionError):
        value_end = None
    if value_end is not None:
        after = text[value_end:].lstrip()
        if after.startswith(CALL_CLOSE) and tool_call(value):
            return len(text) - len(after) + len(CALL_CLOSE), tool_call(value)
        if not final and CALL_CLOSE.startswith(after):
            return None  # the closing tag may still come
    elif not final:
        return None  # an incomplete value, or an invalid one: told apart at the end
    close = text.find(CALL_CLOSE, body)
    return None if close < 0 else (close + len(CALL_CLOSE), None)


def _held_back(text: str) -> str:
    """Text without its end when that may be the start of a tag (it waits for the next text) or a stop token."""
    for marker in END_MARKERS:
        text = text.removesuffix(marker)
    held = max((k for tag in _HELD_TAGS for k in range(min(len(tag) - 1, len(text)), 0, -1)
                if text.endswith(tag[:k])), default=0)
    return text[:len(text) - held]


class OutputParser:
    """Parses a model's output as it grows into OpenAI message fields, and the stream deltas between them.

    Reasoning is the text of a think block that opens the output (or that the prompt opened: `thinking=True`) up
    to the first `</think>`, stray `<think>` tags dropped; the answer is the rest. A `<tool_call>` block holding a
    call's JSON followed by `</tool_call>` becomes a tool call; a malformed or unclosed one stays content. Text that may
    still change meaning (a partial tag, an open block, trailing whitespace the message strips) is held back, so
    the deltas add up to exactly the finished message: a tool call is sent when its block closes, first its name
    then its arguments, as OpenAI deltas."""

    def __init__(self, thinking: bool | None = False):
        self.text, self.thinking = "", thinking  # None: guess at the end (a </think> with no <think> before it)
        self.sent = {"reasoning_content": "", "content": ""}
        self.calls: list[dict] = []  # OpenAI tool calls of the closed blocks, in order
        self.resolved = 0  # how far self.text's call blocks are resolved
        self.resolved_content = ""  # the answer's content up to self.resolved
        self.sent_calls = 0

    def feed(self, text: str) -> list[dict]:
        """Add generated text; returns the deltas it releases (possibly none)."""
        self.text += text
        return self._deltas(*self._visible(final=False))

    def finish(self) -> tuple[list[dict], dict]:
        """The last deltas and the finished message: {"reasoning_content", "content", "tool_calls"}."""
        reasoning, content = self._visible(final=True)
        deltas = self._deltas(reasoning, content)
        return deltas, {"reasoning_content": reasoning, "content": content, "tool_calls": list(self.calls)}

    def _split(self, final: bool) -> tuple[str | None, str | None]:
        """(reasoning text so far or None, answer text or None while still in the think block)."""
        text = self.text
        for marker in END_MARKERS if final else ():
            text = text.removesuffix(marker)
        thinking = self.thinking
        if thinking is None:
            thinking = final and THINK_CLOSE in text and THINK_OPEN not in text.partition(THINK_CLOSE)[0]
        if not thinking and not text.startswith(THINK_OPEN):
            if not final and THINK_OPEN.startswith(text):
                return "", None  # may still open a think block
            return None, text
        thought, closed, answer = text.partition(THINK_CLOSE)
        if not closed and not final:
            return _held_back(thought), None
        return thought, answer if closed else ""

    def _visible(self, final: bool) -> tuple[str | None, str]:
        """Reasoning and content as far as they are certain (all of them when final); outer newlines (reasoning)
        and whitespace (content) stripped, as the finished message has them."""
        thought, answer = self._split(final)
        reasoning = None if thought is None else thought.replace(THINK_OPEN, "").strip("\n")
        return reasoning, self._content(answer or "", final).strip()

    def _content(self, answer: str, final: bool) -> str:
        """The answer's content so far: closed call blocks resolved (calls out, malformed ones kept), an open block
        and a partial tag held back until final."""
        while True:
            start = answer.find(CALL_OPEN, self.resolved)
            block = None if start < 0 else _call_block(answer, start, final)
            if block is None:
                break
            end, call = block
            self.resolved_content += answer[self.resolved:start] if call else answer[self.resolved:end]
            self.resolved = end
            if call:
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call})
        rest = answer[self.resolved:]
        if not final:
            rest = _held_back(rest.split(CALL_OPEN, 1)[0])
        return self.resolved_content + rest

    def _deltas(self, reasoning: str | None, content: str) -> list[dict]:
        delta = {}
        for key, text in (("reasoning_content", reasoning or ""), ("content", content)):
            if len(text) > len(self.sent[key]):
                delta[key] = text[len(self.sent[key]):]
                self.sent[key] = text
        deltas = [delta] if delta else []
        for index in range(self.sent_calls, len(self.calls)):
            call = self.calls[index]
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
        self.sent_calls = len(self.calls)
        return deltas


def parse_output(text: str, thinking: bool | None = None) -> dict:
    """Split generated text into OpenAI message fields; malformed tool calls stay in the content. thinking: whether
    the prompt opened the think block (None: guessed, a `</think>` with no `<think>` before it)."""
    parser = OutputParser(thinking)
    parser.text = text
    return parser.finish()[1]
