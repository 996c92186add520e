"""Writes docs/reference/config.md, the reference of every ``config.yaml`` field, from the pydantic models in
``server/config.py``: names, types, defaults, bounds and enum values come from the models themselves, the prose
from each class's docstring, from the comments beside a field in the source, and from ``NOTES`` below.

``tests/docs/test_config_reference.py`` fails when the committed page differs from what this writes (so a field
added, removed or changed in the schema shows up as a failing test until the page is regenerated) and when a note
names a field that no longer exists. Regenerate with ``python docs/config_reference.py``.
"""

from __future__ import annotations

import ast
import enum
import inspect
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server import config as schema  # noqa: E402  (the path above makes the repository importable)

PAGE = ROOT / "docs" / "reference" / "config.md"

# What a field means, where neither the schema's docstrings nor its comments say: "Class.field" -> Markdown.
NOTES: dict[str, str] = {
    "ModelConfig.name": "The model's name; defaults to its folder's name, and must match it when given.",
    "ModelConfig.platform": "Triton's platform name (`onnxruntime_onnx`, `pytorch_libtorch`, `tensorrt_plan`, "
    "`ensemble`); `backend` is the usual way to choose the runtime.",
    "ModelConfig.backend": "The runtime: `onnxruntime`, `pytorch`, `python`, `tensorrt`, `transformers`, another "
    "installed plugin's name, or `package.module:Class`. Guessed from the model file when left out.",
    "ModelConfig.max_batch_size": "Largest batch the model takes; 0: the model has no batch dimension.",
    "ModelConfig.input": "The input tensors. Left out, they are read from the model file where the backend can.",
    "ModelConfig.output": "The output tensors. Left out, they are read from the model file where the backend can.",
    "ModelConfig.instance_group": "How many copies of the model run, and where.",
    "ModelConfig.dynamic_batching": "Merge concurrent requests into batches (needs `max_batch_size > 0`).",
    "ModelConfig.sequence_batching": "Stateful models: requests of one sequence reach one slot in order.",
    "ModelConfig.version_policy": "Which of the numbered version folders are served.",
    "ModelConfig.parameters": "Backend options, as strings (numbers and booleans are accepted and converted); each "
    "backend's page lists its own.",
    "ModelConfig.default_model_filename": "The model file's name inside a version folder, when not the backend's "
    "default (`model.onnx`, `model.pt2`, ...).",
    "ModelConfig.model_warmup": "Requests run on every instance before a version is READY.",
    "ModelConfig.batch_input": "Tensors the server builds per batch for ragged inputs.",
    "ModelConfig.model_transaction_policy": "Whether the model streams several responses per request.",
    "ModelConfig.ensemble_scheduling": "The steps of an ensemble (`platform: ensemble`).",
    "ModelConfig.response_cache": "Answer identical requests from the server's response cache (`--cache-config`).",
    "TensorConfig.name": "The tensor's name, as the model and clients know it.",
    "TensorConfig.data_type": "Triton's type name: `TYPE_FP32`, `TYPE_INT64`, `TYPE_STRING`, ...",
    "TensorConfig.dims": "The shape without the batch dimension when batching is on; -1 for a variable size.",
    "TensorConfig.reshape": "The shape the model sees, when it differs from `dims` (same number of elements).",
    "TensorConfig.optional": "A request may leave the input out.",
    "TensorConfig.allow_ragged_batch": "Requests whose shapes differ are batched as one 1-D tensor.",
    "TensorConfig.label_filename": "A file in the model folder with one label per line, for the classification "
    "extension.",
    "InstanceGroup.name": "A name for the group, shown in logs.",
    "InstanceGroup.count": "Instances in the group (per listed GPU for `KIND_GPU`).",
    "InstanceGroup.kind": "Where the instances run.",
    "InstanceGroup.gpus": "The GPUs of `KIND_GPU` instances.",
    "QueuePolicy.timeout_action": "What happens to a request whose queue timeout expires.",
    "QueuePolicy.default_timeout_microseconds": "Queue timeout of a request that sets none; 0: none.",
    "QueuePolicy.allow_timeout_override": "A request's `timeout` parameter may set its own.",
    "QueuePolicy.max_queue_size": "Most requests waiting; beyond it a request is refused at once (503 / "
    "UNAVAILABLE); 0: unbounded.",
    "DynamicBatching.preferred_batch_size": "Batch sizes worth waiting for.",
    "DynamicBatching.max_queue_delay_microseconds": "Longest a request waits for others to batch with.",
    "DynamicBatching.preserve_ordering": "Responses leave in the order the batches were formed.",
    "DynamicBatching.priority_levels": "Number of priority levels (1 is the highest); 0: no priorities.",
    "DynamicBatching.default_priority_level": "The level of a request that sets no `priority`.",
    "DynamicBatching.default_queue_policy": "The queue policy of every level not listed below.",
    "DynamicBatching.priority_queue_policy": "Queue policies by priority level.",
    "SequenceBatching.max_sequence_idle_microseconds": "A sequence with nothing to do for this long is ended; "
    "0: Triton's default, one second.",
    "SequenceBatching.direct": "Each sequence keeps its own batch row.",
    "SequenceBatching.oldest": "The sequences whose waiting request is oldest are batched together.",
    "SequenceBatching.control_input": "Inputs the server fills in for every request (start, end, ready, id).",
    "SequenceBatching.state": "Implicit state: an output the server feeds back as an input on the next request.",
    "SequenceBatching.iterative_sequence": "Not supported; must stay false.",
    "ModelTransactionPolicy.decoupled": "The model may send any number of responses per request (streaming).",
    "EnsembleStep.model_name": "The step's model.",
    "EnsembleStep.model_version": "Its version; -1: the newest ready one.",
    "ResponseCacheSettings.enable": "Cache this model's responses.",
    "ModelWarmup.name": "A name for the warm-up request, shown in errors.",
    "ModelWarmup.batch_size": "Rows of the warm-up batch.",
    "ModelWarmup.inputs": "Each input's data, by input name.",
    "ModelWarmup.count": "Times the request is run.",
}


def _model_classes() -> list[type[BaseModel]]:
    """Every model reachable from ``ModelConfig``, in the order a reader meets them (breadth first)."""
    seen: list[type[BaseModel]] = []
    queue: list[type[BaseModel]] = [schema.ModelConfig]
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            queue.extend(_models_in(field.annotation))
    return seen


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" (optional)" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{member.value}`" for member in annotation)
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, str(annotation))  # type: ignore[call-overload]


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "see the type"
        return f"`{value!r}`" if value not in ([], {}) else "empty"
    value = field.default
    if value is PydanticUndefined or value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value!r}`"


def _bounds(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for name, text in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, name, None) is not None:
                words.append(f"{text} {getattr(item, name)}")
        if getattr(item, "min_length", None):
            words.append("not empty" if item.min_length == 1 else f"at least {item.min_length} items")
        if getattr(item, "max_length", None) is not None:
            words.append(f"at most {item.max_length} item(s)")
    return ", ".join(words)


def _source_comments() -> dict[str, str]:
    """``Class.field`` -> the ``#`` comment lines right above the field in server/config.py."""
    path = Path(inspect.getsourcefile(schema) or "")
    lines = path.read_text().splitlines()
    comments: dict[str, str] = {}
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above: list[str] = []
                row = item.lineno - 2
                while row >= 0 and lines[row].strip().startswith("#"):
                    above.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                if above:
                    comments[f"{node.name}.{item.target.id}"] = " ".join(above)
    return comments


def _docstring(model: type[BaseModel]) -> str:
    own = model.__dict__.get("__doc__")
    return inspect.cleandoc(own) if own else ""


def render() -> str:
    comments = _source_comments()
    out = [
        "# config.yaml reference",
        "",
        "<!-- Generated by docs/config_reference.py from server/config.py; do not edit by hand. -->",
        "",
        "Every field a model's `config.yaml` may hold. The names are those of Triton's `config.pbtxt`, so a",
        "Triton config translates field for field (Triton's `{key: {string_value: ...}}` form of `parameters` is",
        "accepted too). An unknown field or a wrong type makes the model `UNAVAILABLE`, with the file and the field",
        "in its reason; every other model keeps serving. See [the model repository](../model-repository.md) for",
        "the layout around it.",
        "",
    ]
    for model in _model_classes():
        out += [f"## {model.__name__}", ""]
        doc = _docstring(model)
        if doc:
            out += [doc.replace("\n", " "), ""]
        out += ["| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            key = f"{model.__name__}.{name}"
            meaning = field.description or comments.get(key) or NOTES.get(key, "")
            bounds = _bounds(field)
            if bounds:
                meaning = f"{meaning} ({bounds})" if meaning else bounds.capitalize()
            row = [f"`{field.alias or name}`", _type_name(field.annotation), _default(field), meaning]
            out.append(
                "| " + " | ".join(cell.replace("|", "\\|") if i != 1 else cell for i, cell in enumerate(row)) + " |"
            )
        out.append("")
    return "\n".join(out)


def stale_notes() -> list[str]:
    """Notes whose field is no longer in the schema."""
    fields = {f"{m.__name__}.{n}" for m in _model_classes() for n in m.model_fields}
    return sorted(set(NOTES) - fields)


if __name__ == "__main__":
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)}")
