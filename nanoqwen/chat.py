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
import re
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


TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _parse_tool_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


def _split_reasoning(text: str) -> tuple[str | None, str]:
    if "</think>" in text:  # the <think> opener may be missing: some templates write it into the prompt
        thought, _, answer = text.partition("</think>")
        return thought.split("<think>", 1)[-1].strip("\n"), answer
    if "<think>" in text:  # generation stopped inside the think block: all of it is reasoning
        return text.split("<think>", 1)[1].strip("\n"), ""
    return None, text


def parse_output(text: str) -> dict:
    """Split generated text into OpenAI message fields; malformed tool calls stay in the content."""
    for stop in ("<|im_end|>", "<|endoftext|>"):
        text = text.removesuffix(stop)
    reasoning, answer = _split_reasoning(text)
    tool_calls, kept, position = [], [], 0
    for match in TOOL_CALL_RE.finditer(answer):
        call = _parse_tool_call(match.group(1))
        kept.append(answer[position:match.start()] if call else answer[position:match.end()])
        position = match.end()
        if call:
            tool_calls.append(call)
    kept.append(answer[position:])
    return {"reasoning_content": reasoning, "content": "".join(kept).strip(), "tool_calls": tool_calls}
