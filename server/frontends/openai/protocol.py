"""OpenAI's request and response bodies for the routes served here, as pydantic models.

Requests accept the fields the official client sends plus vLLM's extras (``top_k``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``structured_outputs``, ``prompt_logprobs``,
``chat_template_kwargs``), so clients written for either server work unchanged. Unknown fields are ignored as
OpenAI does; every declared field is either honoured or, when set to something this server does not do, refused
with a 400 naming it (``REFUSED`` on each request model says which and why): a field that would change the answer
is never dropped in silence.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol.generation import StructuredOutputsParams


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- errors --------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests ------------------------------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ResponseFormatJsonSchema(OpenAIModel):
    name: str = "response"
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute; the wire name is kept by the alias.
    json_schema: dict[str, Any] = Field(alias="schema", default_factory=dict)
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: ResponseFormatJsonSchema | None = None


class SamplingFields(OpenAIModel):
    """The sampling fields chat and completions share; ``SamplingParams`` checks their ranges."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Token id (as a string, OpenAI's keys) -> bias added to its logit, -100..100.
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's JSON modes; vLLM's ``structured_outputs`` for regex, choice and grammar.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's extras.
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's older spellings of ``structured_outputs``, still sent by its clients.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM options this server does not have: refused when set, not ignored.
    min_p: float | None = None
    use_beam_search: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None

    REFUSED: ClassVar[dict[str, str]] = {
        "min_p": "min_p sampling is not offered",
        "use_beam_search": "beam search is not offered",
        "include_stop_str_in_output": "stop strings are always left out of the output",
        "skip_special_tokens": "special tokens are always skipped",
        "truncate_prompt_tokens": "prompts are refused when too long, never truncated",
    }
    # Values of refused fields that say what this server does anyway, so sending them is no reason to refuse.
    KEPT_VALUES: ClassVar[dict[str, Any]] = {
        "use_beam_search": False,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "modalities": ["text"],
    }


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(OpenAIModel):
    name: str
    # JSON text, as OpenAI sends it.
    arguments: str


class ChatMessageToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: str
    # A string, or a list of content parts ({"type": "text", "text": ...}); None for an assistant's tool call.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # An assistant's earlier calls, and a tool message's answer to one of them.
    tool_calls: list[ChatMessageToolCall] | None = None
    tool_call_id: str | None = None
    # An earlier answer's thinking; chat templates drop it from the prompt, as vLLM does.
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Reaches the chat template as a variable (gpt-oss and others read it), as vLLM passes it.
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's spellings of two template options.
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # Fields that do not change the answer.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    # OpenAI features this server does not have.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    best_of: int | None = None
    echo: bool | None = None

    REFUSED: ClassVar[dict[str, str]] = {
        **SamplingFields.REFUSED,
        "functions": "the deprecated 'functions' are not offered; send 'tools'",
        "function_call": "the deprecated 'function_call' is not offered; send 'tool_choice'",
        "audio": "audio output is not offered",
        "web_search_options": "web search is not offered",
        "verbosity": "verbosity is not offered",
        "best_of": "best_of is not offered for chat",
        "echo": "echo is not offered for chat",
        "modalities": "only text output is offered",
    }


class CompletionRequest(SamplingFields):
    model: str
    # A string, a list of strings, a list of token ids or a list of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for completions.
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    REFUSED: ClassVar[dict[str, str]] = {
        **SamplingFields.REFUSED,
        "suffix": "'suffix' (insertion) is not offered",
    }


class EmbeddingRequest(OpenAIModel):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


# -- responses -----------------------------------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _omit_none(value: Any) -> bool:
    return value is None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCallMessage(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # Present only when the model's reasoning parser found thinking, or the model called tools.
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[ToolCallMessage] | None = Field(default=None, exclude_if=_omit_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class PromptLogprob(BaseModel):
    """vLLM's shape of one prompt token's candidates (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(default=None, exclude_if=_omit_none)


class ToolCallFunctionDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=_omit_none)
    arguments: str = ""


class ToolCallDeltaMessage(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_omit_none)
    function: ToolCallFunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[ToolCallDeltaMessage] | None = Field(default=None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(default=None, exclude_if=_omit_none)


class CompletionResponse(BaseModel):
    """Both the whole answer and each streamed chunk: OpenAI uses the same ``text_completion`` shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # A list of floats, or base64 of their little-endian float32 bytes.
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modeldock"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- the Responses API (POST /v1/responses) -------------------------------------------------------------------------
class ResponsesFunctionTool(OpenAIModel):
    """A function tool as the Responses API writes it: flat, without chat's ``function`` wrapper."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedTool(OpenAIModel):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponsesText(OpenAIModel):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None


class ResponsesReasoning(OpenAIModel):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(OpenAIModel):
    model: str
    # Text (one user message) or a list of input items: messages, function calls and their outputs.
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    # Checked one by one: only function tools are served, and another type is refused by its index.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    # OpenAI's default: kept, so ``previous_response_id`` can continue from it (in memory here, see the serving).
    store: bool = True
    previous_response_id: str | None = None
    # Its effort reaches the chat template as ``reasoning_effort``; thinking comes back as a reasoning item.
    reasoning: ResponsesReasoning | None = None
    # Fields that do not change the answer.
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    stream_options: dict[str, Any] | None = None
    # Features this server does not have.
    include: list[str] | None = None
    truncation: str | None = None
    background: bool | None = None
    max_tool_calls: int | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    top_logprobs: int | None = None

    REFUSED: ClassVar[dict[str, str]] = {
        "include": "no extra output data is offered",
        "truncation": "an input too long is refused, never truncated",
        "background": "background responses are not offered",
        "max_tool_calls": "a limit on tool calls is not offered",
        "prompt": "stored prompt templates are not offered",
        "conversation": "conversations are not offered; use previous_response_id",
        "top_logprobs": "logprobs are offered on /v1/chat/completions and /v1/completions",
    }
    KEPT_VALUES: ClassVar[dict[str, Any]] = {"include": [], "truncation": "disabled", "background": False}


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ResponseReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ResponseReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ResponseReasoningText] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


ResponseOutputItem = ResponseOutputMessage | ResponseFunctionCall | ResponseReasoningItem


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class ResponseIncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponsesResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=_now)
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ErrorInfo | None = None
    incomplete_details: ResponseIncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[ResponseOutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ResponsesReasoning = Field(default_factory=ResponsesReasoning)
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponsesUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


# -- vLLM's /tokenize and /detokenize -------------------------------------------------------------------------------
class TokenizeRequest(OpenAIModel):
    """Either ``prompt`` (raw text) or ``messages`` (rendered with the chat template, as a chat request would be)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- images --------------------------------------------------------------------------------------------------------
class ImageGenerationRequest(OpenAIModel):
    """OpenAI's ``images.generate`` body, with the diffusion settings clients of other servers send as extensions
    (``seed``, ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``)."""

    model: str
    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(default=None, ge=1, lt=2**31)
    guidance_scale: float | None = Field(default=None, ge=0.0)
    negative_prompt: str | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=_now)
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str
