"""Constrained decoding: JSON answers and tool calls enforced by a grammar, with xgrammar.

A request's `response_format` (OpenAI: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
...}}) or `tool_choice` ("required", or a named function) becomes a grammar over the answer: optional leading
whitespace, then the JSON value, or one `<tool_call>` block whose arguments follow the function's parameter schema.
It is compiled once per tokenizer and schema (cached) into a CompiledGrammar. Each constrained row holds a matcher:
before its next token is chosen, the matcher writes a bitmask of the tokens the grammar allows, the logits of the
others become -inf, and the chosen token advances the matcher. The grammar starts after `</think>`: the reasoning
stays free (while the model may still open a think block, `<think>` is allowed too).

xgrammar, not llguidance: bench/bench_grammar.py measures both on the Qwen3 vocabulary (mask time per token, compile
time); xgrammar's masks were cheaper on two of three schemas and its vocabulary setup 3x faster.
"""
from __future__ import annotations

import functools
import json
import re
import weakref

import torch

_TEXT_SPECIALS = ("<tool_call>", "</tool_call>")  # the special tokens a tool call's grammar writes
WHITESPACE = 'root ::= ([ \\n] ([ \\n] ([ \\n] [ \\n]?)?)?)?'  # up to 4: "\n\n" after </think>, never endless


def constraint(response_format: dict | None = None, tool_choice=None, tools: list | None = None) -> str | None:
    """The grammar key of what a request asks (JSON text of a small spec), or None when nothing is constrained.
    Bad requests raise ValueError naming the field."""
    kind = (response_format or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    functions = [t["function"] if "function" in t else t for t in tools or []]
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise ValueError(f"tool_choice names {name!r}, which is not in tools")
    elif tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs tools")
    elif tool_choice not in (None, "auto", "none"):
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}")
    if isinstance(tool_choice, dict) or tool_choice == "required":
        if kind != "text":
            raise ValueError("response_format and a required tool call cannot both constrain the answer")
        calls = [[f["name"], f.get("parameters") or {"type": "object"}] for f in functions]
        return json.dumps({"tool_calls": calls}, sort_keys=True)
    if kind == "json_object":
        return json.dumps({"json": {"type": "object"}, "strict": False})
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return json.dumps({"json": schema, "strict": True}, sort_keys=True)
    return None


class _Compiler:
    """xgrammar's compiler for one tokenizer (its vocabulary as bytes)."""

    def __init__(self, tokenizer):
        import xgrammar as xgr
        self.xgr = xgr
        vocab = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
        for text, token in tokenizer.special_tokens.items():  # control tokens are not text a grammar may spell
            if text not in _TEXT_SPECIALS and token < len(vocab):
                vocab[token] = b""
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                 stop_token_ids=sorted(tokenizer.stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)

    def grammar(self, key: str):
        xgr, spec = self.xgr, json.loads(key)
        if "json" in spec:
            body = _json_grammar(xgr, spec["json"], spec["strict"])
        else:
            calls = [xgr.Grammar.concat(_literal(xgr, f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": '),
                                        _json_grammar(xgr, parameters, True), _literal(xgr, "}\n</tool_call>"))
                     for name, parameters in spec["tool_calls"]]
            body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
        return self.compiler.compile_grammar(xgr.Grammar.concat(xgr.Grammar.from_ebnf(WHITESPACE), body))


_LOOSE_CHARACTER, _JSON_CHARACTER = r'[^\"\\\r\n]', r'[^\"\\\0-\x1f]'


def _json_grammar(xgr, schema: dict, strict: bool):
    """The grammar of a JSON schema, compact (no optional whitespace: a model cannot pad forever). xgrammar 0.2's
    strings with a maxLength/minLength let raw control characters through, which JSON forbids: the class is
    tightened to the one its other strings use."""
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARACTER, _JSON_CHARACTER)) if _LOOSE_CHARACTER in text \
        else grammar


def _literal(xgr, text: str):
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=256)
def _compiled(compiler: _Compiler, key: str):
    return compiler.grammar(key)


def compile_constraint(tokenizer, key: str):
    """The compiled grammar of a constraint key; a schema xgrammar cannot compile is a ValueError with its reason."""
    if tokenizer not in _COMPILERS:
        _COMPILERS[tokenizer] = _Compiler(tokenizer)
    try:
        return _compiled(_COMPILERS[tokenizer], key)
    except Exception as error:  # xgrammar raises RuntimeError, ValueError or its own errors
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1])  # without xgrammar's time and source line
        raise ValueError(f"cannot compile the constraint's JSON schema: {reason}") from None


class Matcher:
    """One row's position in its grammar."""

    def __init__(self, compiled):
        import xgrammar as xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.words = -(-compiled.tokenizer_info.vocab_size // 32)  # int32 words of its bitmask
        self.broken = False  # a token the grammar refused was fed (a forced one): the row goes on unconstrained

    def accept(self, token: int) -> None:
        if not self.broken and not self.matcher.is_terminated():
            self.broken = not self.matcher.accept_token(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def mask_logits(logits: torch.Tensor, rows: list, extra_tokens: list[list[int]]) -> torch.Tensor:
    """-inf on the logits (len(rows), vocab) of the tokens each row's grammar forbids; rows[i] is a Matcher or None
    (free), extra_tokens[i] the tokens allowed besides the grammar's (`<think>` while a think block may open)."""
    import xgrammar as xgr
    words = max(matcher.words for matcher in rows if matcher is not None)
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    for i, (matcher, extra) in enumerate(zip(rows, extra_tokens)):
        if matcher is not None:
            matcher.fill(bitmask, i)
            for token in extra:
                bitmask[i, token // 32] |= _bit(token % 32)
            if not bitmask[i].any():  # nothing allowed (cannot happen with a sound grammar): leave the row free
                bitmask[i] = -1
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[-1])
    return logits


def _bit(position: int) -> int:
    return (1 << position) - (1 << 32 if position == 31 else 0)  # int32: bit 31 is the sign
