"""A text pre-processor for the Python backend: the kind of step that usually runs before a tokenizer model.

TEXT [batch, 1] BYTES -> NORMALIZED [batch, 1] BYTES (NFKC, lower case, single spaces) and TOKEN_COUNT [batch, 1]
INT32 (number of word tokens, punctuation split off).
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from server.errors import InvalidInput

TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args["model_name"]

    def execute(self, requests: list) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:
            texts = request.get_input("TEXT")
            normalized = np.empty(texts.shape, dtype=np.object_)
            counts = np.zeros(texts.shape, dtype=np.int32)
            for index, raw in np.ndenumerate(texts):
                try:
                    text = normalize(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
                except UnicodeDecodeError as exc:
                    # A client mistake, reported as one (HTTP 400 / INVALID_ARGUMENT) rather than a model failure.
                    raise InvalidInput(f"input 'TEXT' element {list(index)} is not UTF-8 text: {exc.reason}") from None
                normalized[index] = text.encode("utf-8")
                counts[index] = len(TOKEN.findall(text))
            responses.append({"NORMALIZED": normalized, "TOKEN_COUNT": counts})
        return responses

    def finalize(self) -> None:
        pass
