"""A reasoning model's thinking split from its answer, chosen by a model's ``parameters.reasoning_parser``.

DeepSeek-R1 and Qwen3 write their thinking between ``<think>`` and ``</think>`` before answering; the parser
named by the model's configuration (``deepseek_r1``, ``qwen3``, vLLM's names) puts it in ``reasoning_content`` so
the answer's ``content`` and any tool call are read from the rest, whole or as it streams. Part of the OpenAI front
end; imports only ``server.errors``.
"""

from server.frontends.openai.reasoning_parsers.think_tags import (
    REASONING_PARSERS,
    ReasoningDelta,
    ReasoningParser,
    ReasoningStreamer,
    reasoning_parser,
)

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "ReasoningStreamer", "reasoning_parser"]
