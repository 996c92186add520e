"""The chat messages of a vision-language model, with or without images, rendered by vLLM's own renderer, as
``LLM.chat`` and vLLM's OpenAI server render them (the chat template of such a model is often its processor's only,
which the tokenizer-based rendering of text models would not find).

The images are decoded once, under the operator's limits, by ``server.protocol.chat_images`` (the same code and
limits as ``backend: transformers``' vision engine), and handed to vLLM as ``image_pil`` content parts, so vLLM never
fetches a URL itself. vLLM's renderer then applies the model's chat template (its processor's, where the tokenizer
has none), tokenizes without adding special tokens (the template writes them), and runs the model's multi-modal
processor, which expands each image placeholder into the image's tokens. The result is an engine input that
``AsyncLLM.generate`` takes as it is, with the prompt's final token ids (image tokens included) for ModelDock's
length checks and usage counts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import InvalidInput
from server.protocol.chat_images import ImageLimits, decode_message_images
from server.protocol.generation import GenerateRequest

# Template options a request may not set: the renderer needs text back, with the request's own messages and tools.
_RESERVED_KWARGS = frozenset({"tokenize", "return_dict", "conversation", "messages", "tools", "chat_template"})


async def render_vision_chat(renderer: Any, request: GenerateRequest, limits: ImageLimits, model: str) -> Any:
    """vLLM's engine input for ``request.messages``: ``prompt_token_ids`` (image tokens included) and, where the
    messages carry images, their processed tensors."""
    from vllm.renderers import ChatParams, merge_kwargs
    from vllm.utils.mistral import is_mistral_tokenizer

    assert request.messages is not None
    template_kwargs = dict(request.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_KWARGS.intersection(template_kwargs))
    if reserved:
        raise InvalidInput(f"chat_template_kwargs may not set {', '.join(reserved)}")
    messages, _ = await asyncio.to_thread(decode_message_images, request.messages, limits, model)
    conversation = [
        {
            **message,
            "content": [
                {"type": "image_pil", "image_pil": part["image"]} if part["type"] == "image" else part
                for part in message["content"]
            ]
            if isinstance(message["content"], list)
            else message["content"],
        }
        for message in messages
    ]
    continue_final = bool(template_kwargs.get("continue_final_message", False))
    # The same arguments as ``LLM.chat`` gives its renderer.
    chat_params = ChatParams(
        chat_template_kwargs=merge_kwargs(
            template_kwargs,
            {
                "add_generation_prompt": template_kwargs.get("add_generation_prompt", not continue_final),
                "continue_final_message": continue_final,
                "tools": request.tools or None,
                "tokenize": is_mistral_tokenizer(renderer.tokenizer),
            },
        )
    )
    tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
    try:
        _, (engine_input,) = await renderer.render_chat_async([conversation], chat_params, tok_params)
    except Exception as exc:  # the template or the processor refusing these messages and images
        raise InvalidInput(
            f"model '{model}': the messages and their images cannot be rendered: {type(exc).__name__}: {exc}"
        ) from None
    return engine_input
