"""``POST /v1/embeddings``: texts through an embedding model's ordinary batched infer path.

An embedding model (``parameters.task: embed``) takes ``text_input`` (BYTES, one text per batch row) and returns
``embedding`` (FP32, L2-normalised) and ``token_count``; a long input list is split into batches the model accepts,
which the dynamic batcher may then merge with other clients' requests.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi.responses import Response

from server.core import InferenceServer
from server.errors import ModelNotFound
from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo
from server.frontends.openai.serving_engine import ModelNotFoundError, request_id
from server.protocol.types import InferRequest, RequestedOutput

TEXT_INPUT = "text_input"
EMBEDDING_OUTPUT = "embedding"
TOKEN_COUNT_OUTPUT = "token_count"


def input_texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise OpenAIRequestError("'input' must not be empty", "input")
    if not all(isinstance(text, str) for text in value):
        raise OpenAIRequestError("'input' as token ids is not supported; send text", "input")
    return list(value)  # type: ignore[arg-type]


def encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's base64 format: the little-endian float32 bytes of the vector.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class OpenAIServingEmbedding:
    def __init__(self, core: InferenceServer) -> None:
        self.core = core

    def _max_batch(self, model: str) -> int:
        try:
            task = self.core.model_task(model)
        except ModelNotFound:
            raise ModelNotFoundError(model) from None
        if task != "embed":
            kind = "a text generation model" if task == "generate" else "not a language model"
            raise OpenAIRequestError(f"model '{model}' does not support embeddings ({kind})", "model")
        return int(self.core.model_config(model).get("max_batch_size", 0)) or 1

    async def create(self, request: EmbeddingRequest) -> Response:
        max_batch = self._max_batch(request.model)
        texts = input_texts(request.input)
        batches = [texts[start : start + max_batch] for start in range(0, len(texts), max_batch)]
        prefix = request_id("embd")
        responses = await asyncio.gather(
            *(self.core.infer(self._infer_request(request.model, f"{prefix}-{i}", b)) for i, b in enumerate(batches))
        )
        vectors = np.concatenate([r.outputs[EMBEDDING_OUTPUT] for r in responses]).astype(np.float32)
        tokens = int(sum(int(r.outputs[TOKEN_COUNT_OUTPUT].sum()) for r in responses))
        if request.dimensions is not None:
            if request.dimensions > vectors.shape[1]:
                raise OpenAIRequestError(
                    f"'dimensions' {request.dimensions} exceeds the model's {vectors.shape[1]}", "dimensions"
                )
            # Shortened as OpenAI's text-embedding-3 models are: truncated, then normalised again.
            vectors = vectors[:, : request.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        response = EmbeddingResponse(
            data=[
                EmbeddingData(index=i, embedding=encoded(vector, request.encoding_format))
                for i, vector in enumerate(vectors)
            ],
            model=request.model,
            usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    @staticmethod
    def _infer_request(model: str, id_: str, texts: list[str]) -> InferRequest:
        batch = np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)
        return InferRequest(
            model_name=model,
            id=id_,
            inputs={TEXT_INPUT: batch},
            input_datatypes={TEXT_INPUT: "BYTES"},
            outputs=[RequestedOutput(EMBEDDING_OUTPUT), RequestedOutput(TOKEN_COUNT_OUTPUT)],
        )
