"""The classification extension: top-k strings from a score output, unit-tested and through both front ends."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from server.extensions.classification import top_k
from server.repository.validate import validate_model
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess

LABELS = [f"class-{chr(ord('a') + i)}" for i in range(10)]


def test_top_k_orders_scores_and_formats_like_triton() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    result = top_k(scores, 2, batched=True, labels=["cat", "dog", "eel"])
    assert result.shape == (2, 2)
    assert result.tolist() == [[b"0.700000:1:dog", b"0.200000:2:eel"], [b"0.500000:0:cat", b"0.250000:1:dog"]]


def test_top_k_without_batch_labels_or_enough_classes() -> None:
    integers = np.array([3, 9, 1], dtype=np.int32)
    assert top_k(integers, 5, batched=False, labels=[]).tolist() == [b"9:1", b"3:0", b"1:2"]
    # Labels shorter than the class count leave the rest unlabelled, as a short label file does in Triton.
    assert top_k(integers, 2, batched=False, labels=["x"]).tolist() == [b"9:1", b"3:0:x"]


@pytest.fixture(scope="module")
def labelled_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory):
    """The bundled MLP with a label file on its probabilities output, plus a copy whose label file is missing."""
    root = tmp_path_factory.mktemp("labelled")
    for name, label_file in (("classifier", "labels.txt"), ("unlabelled", "missing.txt")):
        model = root / name
        shutil.copytree(BUNDLED_REPOSITORY / "mlp_classifier" / "1", model / "1")
        config = {
            "backend": "onnxruntime",
            "max_batch_size": 8,
            "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [256]}],
            "output": [
                {"name": "logits", "data_type": "TYPE_FP32", "dims": [10]},
                {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10], "label_filename": label_file},
            ],
        }
        (model / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "classifier" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root, start_server(root)


def reference(features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(BUNDLED_REPOSITORY / "mlp_classifier" / "1" / "model.onnx"))
    return session.run(["probabilities"], {"features": features})[0]


def check_top3(result: np.ndarray, features: np.ndarray) -> None:
    probabilities = reference(features)
    assert result.shape == (len(features), 3)
    for row, entries in zip(probabilities, result, strict=True):
        # tritonclient hands JSON BYTES back as str and binary BYTES as bytes.
        parsed = [(entry.decode() if isinstance(entry, bytes) else entry).split(":") for entry in entries]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [LABELS[i] for i in indices]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], row[indices], atol=1e-6)


@pytest.mark.parametrize("binary", [False, True])
def test_http_class_count(labelled_server, binary: bool) -> None:
    _, server = labelled_server
    features = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        infer_input = httpclient.InferInput("features", list(features.shape), "FP32")
        infer_input.set_data_from_numpy(features)
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
            httpclient.InferRequestedOutput("logits", binary_data=binary),
        ]
        result = client.infer("classifier", [infer_input], outputs=outputs)
    finally:
        client.close()
    assert result.get_output("probabilities")["datatype"] == "BYTES"
    check_top3(result.as_numpy("probabilities"), features)
    assert result.as_numpy("logits").shape == (4, 10)  # outputs not asked to classify are left alone


def test_grpc_class_count(labelled_server) -> None:
    _, server = labelled_server
    features = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        infer_input = grpcclient.InferInput("features", list(features.shape), "FP32")
        infer_input.set_data_from_numpy(features)
        outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=3)]
        result = client.infer("classifier", [infer_input], outputs=outputs)
        check_top3(result.as_numpy("probabilities"), features)
        with pytest.raises(InferenceServerException) as error:
            bad = [grpcclient.InferRequestedOutput("probabilities", class_count=-1)]
            client.infer("classifier", [infer_input], outputs=bad)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'classification' must be a positive integer" in error.value.message()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("value", "message"), [(0, "positive integer"), (-2, "positive integer"), ("three", "positive integer")]
)
def test_bad_class_count_is_400(labelled_server, value: object, message: str) -> None:
    _, server = labelled_server
    body = {
        "inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": [0.0] * 256}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": value}}],
    }
    reply = httpx.post(server.url + "/v2/models/classifier/infer", json=body)
    assert reply.status_code == 400
    assert "output 'probabilities'" in reply.json()["error"] and message in reply.json()["error"]


def test_text_outputs_cannot_be_classified(server: ServerProcess) -> None:
    body = {
        "inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["Hello"]}],
        "outputs": [{"name": "NORMALIZED", "parameters": {"classification": 1}}],
    }
    reply = httpx.post(server.url + "/v2/models/text_preprocessor/infer", json=body)
    assert reply.status_code == 400 and "cannot classify a BYTES output" in reply.json()["error"]


def test_missing_label_file_is_a_load_error_naming_the_field(labelled_server) -> None:
    root, server = labelled_server
    index = {m["name"]: m for m in httpx.post(server.url + "/v2/repository/index").json()}
    assert index["classifier"]["state"] == "READY"
    assert index["unlabelled"]["state"] == "UNAVAILABLE"
    assert "output[1].label_filename" in index["unlabelled"]["reason"]
    [problem] = validate_model(root / "unlabelled")
    assert "output[1].label_filename" in problem.reason and "missing.txt" in problem.reason
