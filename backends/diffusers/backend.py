"""Text-to-image pipelines from ``diffusers`` (Stable Diffusion and the other families ``AutoPipelineForText2Image``
knows), served as an ordinary batching model.

A version folder holds what ``pipeline.save_pretrained`` writes (``model_index.json`` and one folder per
component), or ``parameters.model_path`` names such a folder. Nothing is downloaded.

Each row of a batch is one image: ``prompt`` (BYTES), optionally ``negative_prompt``, ``seed`` (INT64),
``num_inference_steps`` (INT32), ``guidance_scale`` (FP32), ``width`` and ``height`` (INT32). Out come ``image``
(UINT8, [height, width, 3]) and ``png`` (BYTES, the same image encoded). Rows that share their step count and
guidance run through the pipeline as one call, each with its own ``torch.Generator`` seeded from its row, so an
image is the one the pipeline makes alone for that prompt and seed. A row without a seed gets a random one. The
same settings may come as request parameters (and ``n`` images per prompt): ``image_parameters.py`` turns them
into these inputs when the request is admitted, for KServe v2 and the OpenAI images route alike.

One model serves one image size (``parameters.width``/``height``, by default the pipeline's native size): the
batcher merges requests by their tensors' shapes, not their values, so rows of one batch must make images of one
shape. Serve another size as a second model whose ``parameters.model_path`` points at the same folder.

An image can take seconds to minutes, so the model gets a dynamic batcher with a bounded queue unless its config
sets one (``max_queue_size`` 16 by default): a full queue answers at once (503) instead of piling work up. Every
denoising step is timed into ``server.extensions.diffusion_metrics`` (step time, progress, images).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from backends.base import Backend, model_folder, tensor
from backends.diffusers.image_parameters import apply_image_parameters
from backends.framework_lock import FRAMEWORK_LOCK
from server.config import DynamicBatching, ModelConfig, QueuePolicy
from server.devices import Device
from server.errors import ConfigError, InvalidInput, ModelLoadError
from server.extensions.diffusion_metrics import DENOISING
from server.protocol.types import InferRequest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TASK = "text-to-image"
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_QUEUE = 16
DEFAULT_STEPS = 50
DEFAULT_MAX_STEPS = 500
# ``from_pretrained`` builds modules through process-wide state; loads run one at a time (as the transformers
# backend's do) so two models loading at once cannot see each other's half-built modules.
# Shared with every backend (see backends/framework_lock.py): torch's lazy imports cross backends.
_LOAD_LOCK = FRAMEWORK_LOCK


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path}: not found; a diffusers model folder holds what pipeline.save_pretrained writes"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def native_size(folder: Path) -> tuple[int, int]:
    """``(width, height)`` the pipeline makes by default: the denoiser's sample size times the VAE's scale factor,
    read from the component configs so that filling in a config needs neither torch nor diffusers."""
    _read_json(folder / "model_index.json")
    denoiser = next((folder / name for name in ("unet", "transformer") if (folder / name).is_dir()), None)
    if denoiser is None:
        raise ModelLoadError(f"{folder}: no 'unet' or 'transformer' folder; is this a text-to-image pipeline?")
    sample = _read_json(denoiser / "config.json").get("sample_size")
    vae = _read_json(folder / "vae" / "config.json")
    scale = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
    if isinstance(sample, list):
        height, width = int(sample[0]) * scale, int(sample[1]) * scale
    elif isinstance(sample, int):
        height = width = sample * scale
    else:
        raise ModelLoadError(f"{denoiser / 'config.json'}: no 'sample_size'; set parameters.width and height")
    return width, height


INPUTS = [
    tensor("prompt", "TYPE_STRING", [1]),
    tensor("negative_prompt", "TYPE_STRING", [1], optional=True),
    tensor("seed", "TYPE_INT64", [1], optional=True),
    tensor("num_inference_steps", "TYPE_INT32", [1], optional=True),
    tensor("guidance_scale", "TYPE_FP32", [1], optional=True),
    tensor("width", "TYPE_INT32", [1], optional=True),
    tensor("height", "TYPE_INT32", [1], optional=True),
]


def encode_png(image: np.ndarray) -> bytes:
    """An [H, W, 3] uint8 image as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class DiffusersBackend(Backend):
    default_model_filename: ClassVar[str] = "model_index.json"
    supports_gpu: ClassVar[bool] = True
    reads_request_parameters: ClassVar[bool] = True

    @classmethod
    def apply_request_parameters(cls, config: ModelConfig, request: InferRequest) -> None:
        """Image settings sent as request parameters become inputs (``image_parameters.py``)."""
        apply_image_parameters(config, request)

    @classmethod
    def model_path(cls, config: ModelConfig, version_dir: Path) -> Path:
        return model_folder(config, version_dir) / "model_index.json"

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        """The image inputs and outputs, the size, a batch limit and a bounded queue, unless the config sets them."""
        folder = model_folder(config, version_dir)
        config = config.model_copy(deep=True)
        task = config.parameters.get("task", TASK)
        if task != TASK:
            raise ConfigError(f"field 'parameters.task': the diffusers backend serves '{TASK}', got '{task}'")
        dtype = config.parameters.get("dtype", "")
        if dtype and dtype not in DTYPES:
            raise ConfigError(f"field 'parameters.dtype': expected one of {list(DTYPES)}, got '{dtype}'")
        config.parameters["task"] = TASK
        width, height = native_size(folder)
        for key, default in (("width", width), ("height", height)):
            value = config.int_parameter(key, minimum=8)
            config.parameters[key] = str(value if value is not None else default)
        for key, default in (("num_inference_steps", DEFAULT_STEPS), ("max_inference_steps", DEFAULT_MAX_STEPS)):
            value = config.int_parameter(key, minimum=1)
            config.parameters[key] = str(value if value is not None else default)
        if not config.max_batch_size:
            config.max_batch_size = DEFAULT_MAX_BATCH
        if config.dynamic_batching is None and config.sequence_batching is None:
            config.dynamic_batching = DynamicBatching(
                default_queue_policy=QueuePolicy(max_queue_size=DEFAULT_MAX_QUEUE)
            )
        if not config.input:
            config.input = [t.model_copy() for t in INPUTS]
        if not config.output:
            size = [int(config.parameters["height"]), int(config.parameters["width"]), 3]
            config.output = [tensor("image", "TYPE_UINT8", size), tensor("png", "TYPE_STRING", [1])]
        return config

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        native_size(model_folder(config, version_dir))

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        import torch
        from diffusers import AutoPipelineForText2Image

        self._torch = torch
        folder = model_folder(config, version_dir)
        self.torch_device = torch.device("cuda", device.index) if device.is_gpu else torch.device("cpu")
        default_dtype = "float16" if device.is_gpu else "float32"
        dtype = getattr(torch, config.parameters.get("dtype") or default_dtype)
        with _LOAD_LOCK:
            try:
                pipeline = AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
            except Exception as exc:
                raise ModelLoadError(
                    f"{folder}: diffusers cannot load the pipeline: {type(exc).__name__}: {exc}"
                ) from None
            pipeline.to(self.torch_device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.width = int(config.parameters["width"])
        self.height = int(config.parameters["height"])
        self.default_steps = int(config.parameters["num_inference_steps"])
        self.max_steps = int(config.parameters["max_inference_steps"])
        guidance = config.parameters.get("guidance_scale")
        self.default_guidance = float(guidance) if guidance else None
        self._version = version_dir.name
        self.stats = DENOISING.acquire(config.name, self._version)

    # -- one batch ----------------------------------------------------------------------------------------------
    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        rows = self._rows(inputs)
        images: list[np.ndarray | None] = [None] * len(rows)
        groups: dict[tuple[int, float | None], list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault((row["steps"], row["guidance"]), []).append(index)
        for (steps, guidance), members in groups.items():
            made = self._generate([rows[i] for i in members], steps, guidance)
            for i, image in zip(members, made, strict=True):
                images[i] = image
        stacked = np.stack(images)  # type: ignore[arg-type]
        outputs: dict[str, np.ndarray] = {}
        if "image" in output_names:
            outputs["image"] = stacked
        if "png" in output_names:
            outputs["png"] = np.array([[encode_png(image)] for image in stacked], dtype=np.object_)
        return outputs

    def _rows(self, inputs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """Each row's settings, checked, with the model's defaults where an input is absent."""
        count = len(inputs["prompt"])

        def column(name: str) -> list[Any] | None:
            array = inputs.get(name)
            return None if array is None else [item for item in array.reshape(count, -1)[:, 0]]

        prompts = [self._text(item, "prompt") for item in column("prompt") or []]
        negatives = column("negative_prompt")
        seeds = column("seed")
        steps = column("num_inference_steps")
        guidance = column("guidance_scale")
        for name, expected in (("width", self.width), ("height", self.height)):
            values = column(name)
            if values is not None and any(int(v) != expected for v in values):
                raise InvalidInput(
                    f"input '{name}': model '{self.config.name}' makes {self.width}x{self.height} images "
                    f"(width x height), got {name} {int(next(v for v in values if int(v) != expected))}"
                )
        rows = []
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise InvalidInput("input 'prompt' is empty")
            row_steps = int(steps[i]) if steps is not None else self.default_steps
            if not 1 <= row_steps <= self.max_steps:
                raise InvalidInput(
                    f"input 'num_inference_steps': expected 1 to {self.max_steps} (parameters.max_inference_steps), "
                    f"got {row_steps}"
                )
            row_guidance = float(guidance[i]) if guidance is not None else self.default_guidance
            if row_guidance is not None and not (np.isfinite(row_guidance) and row_guidance >= 0):
                raise InvalidInput(f"input 'guidance_scale': expected a number >= 0, got {row_guidance}")
            rows.append(
                {
                    "prompt": prompt,
                    "negative_prompt": self._text(negatives[i], "negative_prompt") if negatives is not None else None,
                    # Seeds are taken modulo 2**64 as torch.Generator.manual_seed takes them.
                    "seed": int(seeds[i]) % 2**64 if seeds is not None else secrets.randbits(63),
                    "steps": row_steps,
                    "guidance": row_guidance,
                }
            )
        return rows

    @staticmethod
    def _text(item: Any, name: str) -> str:
        if isinstance(item, bytes):
            try:
                return item.decode()
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{name}' is not valid UTF-8") from None
        return str(item)

    def _generate(self, rows: list[dict[str, Any]], steps: int, guidance: float | None) -> list[np.ndarray]:
        """One pipeline call for rows that share their steps and guidance: images as [H, W, 3] uint8 arrays."""
        torch = self._torch
        generators = [torch.Generator(self.torch_device).manual_seed(row["seed"]) for row in rows]
        negatives = [row["negative_prompt"] or "" for row in rows]
        arguments: dict[str, Any] = {
            "prompt": [row["prompt"] for row in rows],
            "negative_prompt": negatives if any(negatives) else None,
            "num_inference_steps": steps,
            "width": self.width,
            "height": self.height,
            "generator": generators,
            "output_type": "np",
        }
        if guidance is not None:
            arguments["guidance_scale"] = guidance
        stats = self.stats
        stats.start_batch(len(rows), steps)
        steps_run = 0
        last = time.perf_counter()

        def step_done(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal last, steps_run
            now = time.perf_counter()
            stats.record_step(now - last)
            steps_run += 1
            last = now
            return tensors

        succeeded = False
        try:
            with torch.inference_mode():
                result = self.pipeline(callback_on_step_end=step_done, **arguments)
            succeeded = True
        finally:
            stats.finish_batch(len(rows), steps, steps_run, succeeded)
        # What the pipeline's own PIL output holds: [0, 1] floats scaled, rounded and cast as ``numpy_to_pil`` does.
        pixels = (np.asarray(result.images) * 255).round().astype(np.uint8)
        return list(pixels)

    def unload(self) -> None:
        DENOISING.release(self.config.name, self._version)
        self.pipeline = None
        if self.torch_device.type == "cuda":
            self._torch.cuda.empty_cache()
