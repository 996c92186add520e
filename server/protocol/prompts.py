"""A generation request's prompt as token ids, and how many tokens it leaves room for.

ModelDock's engine, vLLM and llama.cpp each tokenize a ``GenerateRequest`` themselves, but a client must see one
behaviour whichever backend serves the model: the same checks on given token ids, chat messages rendered with the
same template call, and a prompt that is too long refused with the same words (naming the limit the backend calls
it by) before it reaches the library.
"""

from __future__ import annotations

from typing import Any

from server.errors import InvalidInput
from server.protocol.chat_templates import render_chat
from server.protocol.generation import GenerateRequest


def prompt_token_ids(tokenizer: Any, request: GenerateRequest, model: str) -> list[int]:
    """The prompt's tokens (blocking: call it off the event loop); chat messages go through the chat template."""
    if request.prompt_token_ids is not None:
        vocab = len(tokenizer)
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInput(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return list(request.prompt_token_ids)
    if request.messages is not None:
        text = render_chat(tokenizer, request.messages, request.tools, request.chat_template_kwargs, model=model)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(request.prompt or ""))


def allowed_new_tokens(
    prompt_ids: list[int], max_tokens: int | None, max_model_len: int, model: str, limit_name: str = "max_model_len"
) -> int:
    """How many tokens the request may generate: ``max_tokens``, or all the room the prompt leaves; a prompt that
    leaves none, or a ``max_tokens`` past the room, is refused."""
    if not prompt_ids:
        raise InvalidInput("the prompt is empty")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise InvalidInput(
            f"the prompt has {len(prompt_ids)} tokens; model '{model}' takes at most {max_model_len} tokens in all "
            f"(prompt and output; {limit_name})"
        )
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise InvalidInput(
            f"max_tokens {max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds {limit_name} "
            f"{max_model_len} of model '{model}'"
        )
    return max_tokens
