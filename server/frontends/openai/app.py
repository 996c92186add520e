"""The ``/v1`` application: OpenAI's routes, its error shape, and the optional API key, mounted on the HTTP port."""

from __future__ import annotations

import hmac
import time
from typing import TypeVar

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.core import InferenceServer
from server.errors import ModelDockError, Unauthorized
from server.frontends.openai.errors import (
    OpenAIRequestError,
    error_response,
    field_error,
    plain_error_response,
)
from server.frontends.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
)
from server.frontends.openai.serving_audio import OpenAIServingAudio, SpeechRequest
from server.frontends.openai.serving_chat import OpenAIServingChat
from server.frontends.openai.serving_completions import OpenAIServingCompletion
from server.frontends.openai.serving_embeddings import OpenAIServingEmbedding
from server.frontends.openai.serving_engine import ModelNotFoundError
from server.frontends.openai.serving_images import ImageGenerationRequest, OpenAIServingImages
from server.frontends.openai.serving_responses import OpenAIServingResponses
from server.frontends.openai.serving_tokenization import OpenAIServingTokenization

API_KEY_ENV = "MODELDOCK_OPENAI_API_KEY"
LANGUAGE_TASKS = ("generate", "embed", "transcribe", "speak", "text-to-image")
Body = TypeVar("Body", bound=BaseModel)


async def _body(request: Request, model: type[Body]) -> Body:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise OpenAIRequestError(f"request body is not valid JSON: {exc.errors()[0]['msg']}") from None
        raise field_error(exc) from None


def create_openai_app(core: InferenceServer, api_key: str | None = None) -> FastAPI:
    """The routes under ``/v1``; with ``api_key`` every one of them wants ``Authorization: Bearer <api_key>``."""
    created = int(time.time())
    chat = OpenAIServingChat(core)
    completions = OpenAIServingCompletion(core)
    embeddings = OpenAIServingEmbedding(core)
    images = OpenAIServingImages(core)
    responses = OpenAIServingResponses(core)
    tokenization = OpenAIServingTokenization(core)
    audio = OpenAIServingAudio(core)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized("Incorrect or missing API key: send 'Authorization: Bearer <key>'")

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authorize)])

    @app.exception_handler(ModelDockError)
    async def _modeldock_error(_: Request, exc: ModelDockError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return plain_error_response(exc.status_code, str(exc.detail))

    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat.create(await _body(request, ChatCompletionRequest), request.receive)

    @app.post("/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create(await _body(request, CompletionRequest), request.receive)

    @app.post("/embeddings")
    async def create_embeddings(request: Request) -> Response:
        return await embeddings.create(await _body(request, EmbeddingRequest))

    @app.post("/images/generations")
    async def create_images(request: Request) -> Response:
        return await images.create(await _body(request, ImageGenerationRequest))

    @app.post("/responses")
    async def create_response(request: Request) -> Response:
        return await responses.create(await _body(request, ResponsesRequest), request.receive)

    @app.get("/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Response:
        return Response(responses.retrieve(response_id).model_dump_json(), media_type="application/json")

    @app.delete("/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        responses.delete(response_id)
        body = {"id": response_id, "object": "response", "deleted": True}
        return Response(orjson.dumps(body), media_type="application/json")

    # vLLM's tokenizer routes (vLLM serves them beside /v1; here they are under it, with the rest of the API).
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await tokenization.tokenize(await _body(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await tokenization.detokenize(await _body(request, DetokenizeRequest))

    @app.post("/audio/transcriptions")
    async def create_transcription(request: Request) -> Response:
        return await audio.transcribe(request, "transcribe")

    @app.post("/audio/translations")
    async def create_translation(request: Request) -> Response:
        return await audio.transcribe(request, "translate")

    @app.post("/audio/speech")
    async def create_speech(request: Request) -> Response:
        return await audio.speak(await _body(request, SpeechRequest))

    def card(name: str) -> ModelCard | None:
        try:
            task = core.model_task(name)
        except ModelDockError:
            return None
        return ModelCard(id=name, created=created) if task in LANGUAGE_TASKS else None

    @app.get("/models")
    async def list_models() -> Response:
        names = sorted({row["name"] for row in core.repository_index(ready_only=True)})
        # LoRA adapters are models of their own to OpenAI clients, after the models that serve them.
        names += [name for name in core.adapter_models() if name not in names]
        cards = [c for c in (card(name) for name in names) if c is not None]
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    @app.get("/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        found = card(model)
        if found is None:
            # Unknown, not ready, or not a language model: OpenAI has no model of that name either way.
            raise ModelNotFoundError(model)
        return Response(found.model_dump_json(), media_type="application/json")

    return app
