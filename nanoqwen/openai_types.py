"""The request bodies of the OpenAI API that the server accepts, as pydantic models (they make the OpenAPI schema).

Field names, types and ranges follow the OpenAI API; `top_k`, `min_p`, `repetition_penalty`, `chat_template_kwargs`
and `thinking_budget` are the extensions vLLM serves for Qwen3. Unknown fields are ignored, as vLLM does, so any
OpenAI client works; a known field of the wrong type or out of range is a 400 that names it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16
SEED_RANGE = dict(ge=-2 ** 63, le=2 ** 63 - 1)  # what torch.Generator.manual_seed takes (n > 1 adds the choice index)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's thinking (the template drops it when stale)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDefinition(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields both endpoints share."""
    model: str | None = None
    n: int = Field(1, ge=1, description="choices per prompt (at most the server's --max-batch)")
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    temperature: float | None = Field(None, ge=0, le=2, description="default: Qwen's recommendation for the mode")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="only 0 is supported")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="1: off")  # beyond: logits overflow
    stop: str | list[str] | None = Field(None, description=f"at most {MAX_STOP_STRINGS} non-empty strings")
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    thinking_budget: int | None = Field(None, ge=0, description="most thinking tokens before the answer is forced")


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: enforced by a "
                                                                      "grammar after the think block")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description='e.g. {"enable_thinking": false}')
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s) or token ids")
    logprobs: int | None = Field(None, ge=0, le=5, description="log probabilities of this many top tokens")
