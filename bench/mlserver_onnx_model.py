"""The bench's ONNX model as an MLServer custom runtime: what ``bench_triton.py`` runs as the ``mlserver`` peer.

MLServer ships no ONNX Runtime runtime of its own, so this is the smallest one: the session is built once in
``load`` with the same intra-op threads as the other servers (``FLOOR_THREADS``), and ``predict`` runs it on the
batch MLServer's adaptive batcher hands over, decoding and encoding with MLServer's own ``NumpyCodec``, as
MLServer's documentation writes a custom runtime. It is loaded by MLServer (``implementation:
mlserver_onnx_model.OnnxModel`` in ``model-settings.json``), from its own venv, never by ModelDock.
"""

from __future__ import annotations

import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    """``INPUT0`` through the ONNX file the model settings' ``uri`` names, answered as ``OUTPUT0``."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("FLOOR_THREADS", "1"))
        uri = self.settings.parameters.uri if self.settings.parameters else None
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        (y,) = self._session.run(["OUTPUT0"], {"INPUT0": x})
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[NumpyCodec.encode_output("OUTPUT0", y)])
