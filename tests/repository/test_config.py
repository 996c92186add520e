"""Config parsing: good files load with Triton's field names, bad ones name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import DEFAULT_LOAD_TIMEOUT_S, ConfigError, InstanceKind, TimeoutAction, load_model_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text(text)
    return model_dir


def test_full_triton_style_config(tmp_path: Path) -> None:
    model_dir = write(
        tmp_path,
        "resnet",
        """
name: resnet
platform: onnxruntime_onnx
max_batch_size: 32
input:
  - {name: image, data_type: TYPE_FP32, dims: [3, -1, -1]}
output:
  - {name: label, data_type: TYPE_STRING, dims: [1]}
instance_group:
  - {count: 2, kind: KIND_GPU, gpus: [0, 1]}
  - {count: 1, kind: KIND_CPU}
dynamic_batching:
  preferred_batch_size: [8, 16]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy: {max_queue_size: 10, timeout_action: DELAY, default_timeout_microseconds: 5000}
  priority_queue_policy:
    1: {max_queue_size: 4, allow_timeout_override: true}
version_policy: {specific: {versions: [1, 3]}}
parameters:
  intra_op_thread_count: {string_value: "2"}
  enable_mem_pattern: false
model_warmup:
  - name: zeros
    batch_size: 4
    inputs:
      image: {data_type: TYPE_FP32, dims: [3, 8, 8], zero_data: true}
""",
    )
    config = load_model_config(model_dir)
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert config.input[0].dims == [3, -1, -1]
    assert config.input[0].wire_datatype == "FP32"
    assert config.output[0].wire_datatype == "BYTES"
    assert [g.kind for g in config.instance_group] == [InstanceKind.KIND_GPU, InstanceKind.KIND_CPU]
    assert config.instance_group[0].gpus == [0, 1]
    assert config.dynamic_batching is not None
    assert config.dynamic_batching.default_queue_policy.timeout_action == TimeoutAction.DELAY
    assert config.dynamic_batching.priority_queue_policy[1].max_queue_size == 4
    assert config.version_policy.select([1, 2, 3, 4]) == [3, 1]
    assert config.parameters == {"intra_op_thread_count": "2", "enable_mem_pattern": "false"}
    assert config.model_warmup[0].inputs["image"].zero_data is True
    assert config.to_json()["parameters"]["intra_op_thread_count"] == {"string_value": "2"}


def test_defaults_when_file_is_missing(tmp_path: Path) -> None:
    model_dir = tmp_path / "bare"
    model_dir.mkdir()
    config = load_model_config(model_dir)
    assert config.name == "bare"
    assert config.max_batch_size == 0
    assert config.version_policy.select([1, 5, 2]) == [5]


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("max_batchsize: 4\n", "max_batchsize", "unknown field"),
        ("max_batch_size: lots\n", "max_batch_size", "integer"),
        ("max_batch_size: -1\n", "max_batch_size", "greater than or equal"),
        ("input:\n  - {name: x, data_type: TYPE_FLOAT, dims: [1]}\n", "input[0].data_type", "unknown data_type"),
        ("input:\n  - {name: x, data_type: TYPE_FP32}\n", "input[0].dims", "required"),
        ("input:\n  - {name: x, data_type: TYPE_FP32, dims: [-2]}\n", "input[0].dims", "-1"),
        ("instance_group:\n  - {kind: KIND_TPU}\n", "instance_group[0].kind", "KIND_CPU"),
        ("instance_group:\n  - {count: 0}\n", "instance_group[0].count", "greater than or equal"),
        ("version_policy: {latest: {num_versions: 1}, all: {}}\n", "version_policy", "choose one"),
        (
            "dynamic_batching: {priority_levels: 2, default_priority_level: 3}\n",
            "dynamic_batching.default_priority_level",
            "between 1",
        ),
        ("name: other\n", "name", "does not match"),
        ("input:\n  - {name: x, data_type: TYPE_FP32, dims: [4, 0]}\n", "input[0].dims", ">= 1"),
        (
            "max_batch_size: 8\ndynamic_batching: {preferred_batch_size: [4, 16]}\n",
            "dynamic_batching.preferred_batch_size",
            "[16] larger than max_batch_size (8)",
        ),
        (
            "input:\n  - {name: x, data_type: TYPE_FP32, dims: [1]}\n  - {name: x, data_type: TYPE_FP32, dims: [1]}\n",
            "input",
            "duplicate input names: ['x']",
        ),
        (
            "input:\n  - {name: x, data_type: TYPE_FP32, dims: [1]}\n"
            "output:\n  - {name: y, data_type: TYPE_FP32, dims: [1]}\n  - {name: x, data_type: TYPE_FP32, dims: [1]}\n",
            "output[1].name",
            "'x' is also the name of an input",
        ),
        (
            "dynamic_batching: {priority_levels: 0, default_priority_level: 2}\n",
            "dynamic_batching.default_priority_level",
            "needs priority_levels > 0",
        ),
        ("parameters: {load_timeout_secs: soon}\n", "parameters.load_timeout_secs", "whole number of seconds"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    model_dir = write(tmp_path, "m", text)
    with pytest.raises(ConfigError) as info:
        load_model_config(model_dir)
    message = str(info.value)
    assert str(model_dir / "config.yaml") in message
    assert f"field '{field}'" in message
    assert words in message


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    model_dir = write(tmp_path, "m", "max_batch_size: 4\ninput: [\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not valid YAML at line \d+"):
        load_model_config(model_dir)


def test_config_must_be_a_mapping(tmp_path: Path) -> None:
    model_dir = write(tmp_path, "m", "- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_config(model_dir)


def test_binary_config_is_a_config_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError, match=r"config.yaml: not UTF-8 text"):
        load_model_config(model_dir)


def test_load_timeout_parameter(tmp_path: Path) -> None:
    assert load_model_config(write(tmp_path, "default", "")).load_timeout_s == DEFAULT_LOAD_TIMEOUT_S
    assert load_model_config(write(tmp_path, "set", "parameters: {load_timeout_secs: 7}\n")).load_timeout_s == 7
