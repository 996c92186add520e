"""Chat messages rendered to prompt text with a model's own chat template, the same way for every engine.

ModelDock's engine, vLLM and llama.cpp all take a ``GenerateRequest`` whose ``messages`` must become the text the
model was trained on; the tools and template options travel with them (``tools=`` and the extra keyword arguments
of ``apply_chat_template``), so a model sees its tools exactly as its template writes them. Keeping the rendering
here means an engine cannot forget the tools or word template errors differently.
"""

from __future__ import annotations

from typing import Any

from server.errors import InvalidInput

# Template options a request may not override: the engine needs text, not token ids or a dict.
_RESERVED_KWARGS = frozenset({"tokenize", "return_dict", "conversation", "messages", "tools", "chat_template"})


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    model: str = "",
) -> str:
    """The prompt text for ``messages`` with the generation prompt added (blocking: call it off the event loop).

    ``chat_template_kwargs`` reach the template as variables (``enable_thinking`` for Qwen3, say) and may turn
    ``add_generation_prompt`` off or ``continue_final_message`` on. A template that fails on the messages is the
    request's fault (a role or content shape the model does not take), so it is refused as ``InvalidInput``.
    """
    if any(
        isinstance(message.get("content"), list) and any(part.get("type") == "image_url" for part in message["content"])
        for message in messages
    ):
        raise InvalidInput(f"model '{model}' reads text only: it cannot take image_url content parts")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(f"model '{model}' has no chat template; use a completion prompt instead")
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_KWARGS.intersection(kwargs))
    if reserved:
        raise InvalidInput(f"chat_template_kwargs may not set {', '.join(reserved)}")
    kwargs.setdefault("add_generation_prompt", not kwargs.get("continue_final_message", False))
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kwargs)
    except Exception as exc:  # a template error is the messages' fault (roles, content shapes)
        raise InvalidInput(f"messages cannot be rendered with the chat template: {exc}") from None
    if not isinstance(text, str):
        raise InvalidInput("the chat template did not render to text")
    return text
