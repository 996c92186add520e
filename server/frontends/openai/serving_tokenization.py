"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: a language model's tokenizer without generating, so a client
can count a prompt's tokens (a chat rendered exactly as a chat request would be) or read token ids back."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import Response

from server.errors import ModelNotFound
from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.frontends.openai.serving_chat import message_dicts
from server.frontends.openai.serving_engine import ModelNotFoundError
from server.protocol.chat_templates import render_chat


class OpenAIServingTokenization:
    def __init__(self, core: Any) -> None:
        self.core = core

    def _tokenizer(self, model: str) -> tuple[Any, int]:
        try:
            return self.core.language_model(model)  # type: ignore[no-any-return]
        except ModelNotFound:
            raise ModelNotFoundError(model) from None

    async def tokenize(self, request: TokenizeRequest) -> Response:
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIRequestError("send exactly one of 'prompt' and 'messages'", "prompt")
        tokenizer, max_model_len = self._tokenizer(request.model)
        if request.messages is not None:
            tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
            kwargs = dict(request.chat_template_kwargs or {})
            kwargs.setdefault("add_generation_prompt", request.add_generation_prompt)
            kwargs.setdefault("continue_final_message", request.continue_final_message)
            messages = message_dicts(request.messages)
            text = await asyncio.to_thread(render_chat, tokenizer, messages, tools, kwargs, request.model)
            # The engine encodes a rendered chat without adding special tokens: the template wrote them.
            ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)
        else:
            ids = await asyncio.to_thread(
                tokenizer.encode, request.prompt, add_special_tokens=request.add_special_tokens
            )
        body = TokenizeResponse(
            count=len(ids),
            max_model_len=max_model_len,
            tokens=list(ids),
            token_strs=tokenizer.convert_ids_to_tokens(list(ids)) if request.return_token_strs else None,
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def detokenize(self, request: DetokenizeRequest) -> Response:
        tokenizer, _ = self._tokenizer(request.model)
        vocab = len(tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIRequestError(f"'tokens' {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens")
        text = await asyncio.to_thread(tokenizer.decode, request.tokens)
        return Response(DetokenizeResponse(prompt=text).model_dump_json(), media_type="application/json")
