"""A GGUF model's tokenizer and chat template, with the methods the front ends call on a ``transformers`` tokenizer.

A GGUF file carries its vocabulary and its chat template (``tokenizer.chat_template``) in its metadata, so llama.cpp
needs no tokenizer files beside it. The front ends tokenize for ``/v1/tokenize`` and for echoing prompts, and
``server.protocol.chat_templates.render_chat`` renders chat messages through ``apply_chat_template``; this class
gives them both from llama.cpp's vocabulary. The template is rendered with Jinja2 as ``transformers`` renders it
(sandboxed, ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson``
that keeps non-ASCII text), which is also how llama-cpp-python's own ``Jinja2ChatFormatter`` does it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class GGUFTokenizer:
    """llama.cpp's tokenizer for one loaded model. Tokenizing only reads the vocabulary, so any thread may call it
    while the model generates on its own thread."""

    def __init__(self, llama: Any) -> None:
        self._llama = llama
        self._model = llama._model
        self.vocab_size: int = llama.n_vocab()
        self.chat_template: str | None = llama.metadata.get(CHAT_TEMPLATE_KEY) or None
        self.bos_token = self._token_text(llama.token_bos())
        self.eos_token = self._token_text(llama.token_eos())
        self._template: jinja2.Template | None = None

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._model.token_get_text(token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def add_bos(self) -> bool:
        """Whether the model wants its beginning-of-sequence token before a plain prompt (GGUF metadata)."""
        return bool(self._model.add_bos_token())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|user|>``) are parsed as such, as llama.cpp's
        completion does."""
        return self._llama.tokenize(text.encode(), add_bos=add_special_tokens and self.add_bos, special=True)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.piece_bytes(token_ids, special=not skip_special_tokens).decode("utf-8", errors="replace")

    def piece_bytes(self, token_ids: list[int], special: bool = False) -> bytes:
        """The bytes of ``token_ids`` (control tokens as nothing unless ``special``), concatenated as llama.cpp
        writes them."""
        return self._model.detokenize(token_ids, special=special)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered with the GGUF's chat template, as ``transformers`` renders one."""
        if self.chat_template is None:
            raise ValueError("this GGUF file has no tokenizer.chat_template")
        if self._template is None:
            environment = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            environment.filters["tojson"] = _tojson
            environment.globals["raise_exception"] = _raise_exception
            environment.globals["strftime_now"] = _strftime_now
            self._template = environment.from_string(self.chat_template)
        text = self._template.render(
            messages=conversation,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )
        if continue_final_message and conversation:
            # The answer goes on from the last message's own text, not from an end-of-turn after it.
            final = conversation[-1].get("content")
            if isinstance(final, str) and final and final in text:
                text = text[: text.rindex(final) + len(final)]
        return self.encode(text, add_special_tokens=False) if tokenize else text
