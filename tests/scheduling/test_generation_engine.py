"""The generation engine in process: continuous batching must not change what a sequence generates."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.transformers import TransformersBackend  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from server.devices import CPU, Device  # noqa: E402
from server.errors import BackendError, ConfigError, InvalidInput  # noqa: E402
from server.protocol.generation import GenerateRequest, GenerationOutput, SamplingParams  # noqa: E402
from server.scheduling.generation.engine import EngineLimits, GenerationEngine  # noqa: E402
from tests.scheduling.generation_engines import greedy, make_engine  # noqa: E402

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over",
    "What is",
    "Once upon a time there was a small robot who learned to paint and",
    "1 2 3",
    "ModelDock serves machine learning models from a folder",
    "Paris",
    "def main(): print(",
]


@pytest.fixture(scope="module")
def engine(causal_lm_dir: Path) -> Iterator[GenerationEngine]:
    engine = make_engine(causal_lm_dir)
    yield engine
    engine.stop()


async def collect(engine: GenerationEngine, prompt: str, sampling: SamplingParams) -> list[GenerationOutput]:
    return [o async for o in engine.generate(GenerateRequest("t", prompt=prompt, sampling=sampling))]


def tokens(outputs: list[GenerationOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


async def assert_prompts_match_generate(engine: GenerationEngine, reference, lengths: list[int]) -> None:
    """Every one of ``PROMPTS`` at once, each to its length in ``lengths``: each answer is transformers' alone."""
    results = await asyncio.gather(*(collect(engine, p, greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True)))
    for prompt, n, outputs in zip(PROMPTS, lengths, results, strict=True):
        assert tokens(outputs) == reference(prompt, n), prompt


async def test_greedy_under_continuous_batching_equals_generate_alone(engine: GenerationEngine, reference) -> None:
    """The request joins a running batch of 15 others of mixed prompt and output lengths, and leaves before them."""
    others = [
        asyncio.create_task(collect(engine, PROMPTS[i % len(PROMPTS)] + " " * (i % 3), greedy(10 + 7 * i)))
        for i in range(15)
    ]
    await asyncio.sleep(0.05)  # the others are running when the request of interest arrives
    target = await collect(engine, "Tell me a story about a robot", greedy(24))
    await asyncio.gather(*others)
    assert tokens(target) == reference("Tell me a story about a robot", 24)
    for i, task in enumerate(others):
        prompt = PROMPTS[i % len(PROMPTS)] + " " * (i % 3)
        assert tokens(task.result()) == reference(prompt, 10 + 7 * i), prompt


async def test_outputs_carry_counts_and_the_finish_reason(engine: GenerationEngine) -> None:
    outputs = await collect(engine, "Hello world", greedy(7))
    assert [o.finished for o in outputs] == [False] * 6 + [True]
    assert outputs[-1].finish_reason == "length"
    assert [o.completion_tokens for o in outputs] == list(range(1, 8))
    assert outputs[-1].prompt_tokens == len(engine.tokenizer.encode("Hello world"))
    assert "".join(o.text for o in outputs) == engine.tokenizer.decode(tokens(outputs), skip_special_tokens=True)


async def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(engine: GenerationEngine) -> None:
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tokens(await collect(engine, "Once upon a time", sampled))
    crowd = [asyncio.create_task(collect(engine, p, greedy(15))) for p in PROMPTS]
    beside = tokens(await collect(engine, "Once upon a time", sampled))
    await asyncio.gather(*crowd)
    other_seed = tokens(await collect(engine, "Once upon a time", sampled.model_copy(update={"seed": 99})))
    assert alone == beside
    assert other_seed != alone


async def test_stop_string_ends_the_text_before_it(engine: GenerationEngine) -> None:
    full = "".join(o.text for o in await collect(engine, "The quick brown fox", greedy(30)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), f"no usable stop string in {full!r}"
    outputs = await collect(engine, "The quick brown fox", greedy(30, stop=[stop]))
    text = "".join(o.text for o in outputs)
    assert text == full[: full.index(stop)]
    assert outputs[-1].finish_reason == "stop"


async def test_stop_token_id_and_eos(engine: GenerationEngine) -> None:
    generated = tokens(await collect(engine, "Paris", greedy(12)))
    stop_id = generated[4]
    outputs = await collect(engine, "Paris", greedy(12, stop_token_ids=[stop_id]))
    assert tokens(outputs) == generated[: generated.index(stop_id) + 1]
    assert outputs[-1].finish_reason == "stop"
    # min_tokens holds the stop token back until enough tokens were generated.
    held = await collect(engine, "Paris", greedy(12, stop_token_ids=[stop_id], min_tokens=generated.index(stop_id) + 2))
    assert stop_id not in tokens(held)[: generated.index(stop_id) + 2]


async def test_a_new_request_does_not_wait_for_the_running_batch(engine: GenerationEngine) -> None:
    long_request = asyncio.create_task(collect(engine, "Hello world", greedy(150)))
    await asyncio.sleep(0.05)
    short = await collect(engine, "What is", greedy(3))
    assert len(tokens(short)) == 3
    assert not long_request.done(), "the short request waited for the long one to finish"
    assert len(tokens(await long_request)) == 150


async def test_a_request_arriving_while_others_decode_gets_its_first_token_from_the_next_step(
    causal_lm_dir: Path, reference
) -> None:
    """New arrivals are admitted at every step, their prompts mixed into the decoding batch (chunked prefill), not
    held until the running sequences finish or pause; the running ones keep their token a step."""
    engine = make_engine(causal_lm_dir)
    engine.stop()  # its steps run on this thread below, one at a time
    running = [
        engine.new_sequence(GenerateRequest("t", prompt=p, sampling=greedy(12)), engine.tokenizer.encode(p))
        for p in PROMPTS
    ]
    engine._waiting.extend(running)
    for _ in range(3):
        engine._step()
    late_prompt = "Tell me a story about a robot"
    late = engine.new_sequence(
        GenerateRequest("t", prompt=late_prompt, sampling=greedy(6)), engine.tokenizer.encode(late_prompt)
    )
    engine._waiting.append(late)
    engine._step()
    assert len(late.output_ids) == 1
    assert [len(s.output_ids) for s in running] == [4] * len(PROMPTS)
    while engine._running:
        engine._step()
    assert late.output_ids == reference(late_prompt, 6)
    for prompt, sequence in zip(PROMPTS, running, strict=True):
        assert sequence.output_ids == reference(prompt, 12), prompt


async def test_closing_the_stream_aborts_and_frees_the_sequence(engine: GenerationEngine) -> None:
    stats = engine.stats
    aborted_before = stats.aborted
    stream = engine.generate(GenerateRequest("t", prompt="Hello", sampling=greedy(200)))
    first = await anext(stream)
    assert not first.finished
    await stream.aclose()
    for _ in range(100):
        if stats.aborted > aborted_before and engine.blocks.used_blocks == 0 and not engine._running:
            break
        await asyncio.sleep(0.02)
    assert stats.aborted == aborted_before + 1
    assert engine.blocks.used_blocks == 0


async def test_lengths_are_checked_before_anything_runs(engine: GenerationEngine) -> None:
    limit = engine.limits.max_model_len
    with pytest.raises(InvalidInput, match="max_model_len"):
        await collect(engine, "Hello", greedy(limit))
    with pytest.raises(InvalidInput, match="at most"):
        await collect(engine, "word " * limit, greedy(1))
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        [o async for o in engine.generate(GenerateRequest("t", prompt_token_ids=[10**9], sampling=greedy(2)))]


async def test_a_full_cache_preempts_and_every_sequence_still_matches(causal_lm_dir: Path, reference) -> None:
    """Eight sequences that need ~6 blocks each share 12 blocks of 8 tokens: admission waits and decode preempts."""
    engine = make_engine(causal_lm_dir, kv_cache_blocks="12", kv_block_size="8", max_model_len="96")
    try:
        results = await asyncio.gather(*(collect(engine, p, greedy(40)) for p in PROMPTS))
        for prompt, outputs in zip(PROMPTS, results, strict=True):
            assert tokens(outputs) == reference(prompt, 40), prompt
        assert engine.stats.preempted > 0
        assert engine.blocks.used_blocks == 0
    finally:
        engine.stop()


async def test_chunked_prompts_mixed_into_decode_steps_still_match(causal_lm_dir: Path, reference) -> None:
    """A step budget of 6 tokens: prompts are prefilled in chunks, in the same steps as other sequences decode."""
    engine = make_engine(causal_lm_dir, max_num_batched_tokens="6")
    steps: list[tuple[int, int]] = []  # (decoding sequences, prompt tokens) of each step
    forward = engine.backend.forward

    def spy(batch):
        lengths = [len(t) for t in batch.token_ids]
        steps.append((lengths.count(1), sum(n for n in lengths if n > 1)))
        return forward(batch)

    engine.backend.forward = spy  # type: ignore[method-assign]
    try:
        first = asyncio.create_task(collect(engine, PROMPTS[1], greedy(30)))
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*(collect(engine, p, greedy(12)) for p in PROMPTS))
        assert tokens(await first) == reference(PROMPTS[1], 30)
        for prompt, outputs in zip(PROMPTS, results, strict=True):
            assert tokens(outputs) == reference(prompt, 12), prompt
    finally:
        engine.stop()
    assert all(prompt <= max(1, 6 - decoding) for decoding, prompt in steps), steps
    assert any(decoding and prompt for decoding, prompt in steps), "no step mixed decoding with a prompt"


async def test_decode_steps_padded_to_graph_shapes_still_match(causal_lm_dir: Path, reference) -> None:
    """The padding and bucketing of CUDA-graph decode steps, run eagerly on the CPU: batches of 1-8 sequences padded
    to 1, 2, 4 or 8 rows and contexts to 128 or 256 keys, the padding rows on the scratch slot."""
    from backends.transformers.cuda_graphs import DecodeGraphs

    engine = make_engine(causal_lm_dir, max_num_batched_tokens="16", max_num_seqs="8")
    backend = engine.backend
    scratch = backend._cache.slots - 1
    backend._graphs = DecodeGraphs(backend._run_model, backend._cache, scratch, 8, 256, backend.torch_device)
    backend._graphs.capture_all()
    try:
        await assert_prompts_match_generate(engine, reference, [6 + 5 * i for i in range(len(PROMPTS))])
    finally:
        engine.stop()
    assert backend._graphs.captured == 4 * 2


def test_decode_keys_read_in_place_or_gathered_give_the_same_logits(causal_lm_dir: Path) -> None:
    """On the CPU a decoding sequence's keys are read by the decode kernel through its block table; without the
    kernel, in place, a slice per run of consecutive blocks (merged by their log-sum-exp when there are several, as
    for a sequence sharing a cached start), and gathered when the runs are many. Every way must match the padded
    batch that CUDA graphs use."""
    from backends.base import StepBatch
    from backends.transformers.paged_attention import MAX_DECODE_RUNS, StepTensors

    engine = make_engine(causal_lm_dir, kv_block_size="2")
    engine.stop()
    backend = engine.backend
    kernel = backend._cache.decode_kernel
    assert kernel is not None  # float32 on the CPU, with a compiler at hand
    prompt = [(7 * i + 3) % 50 + 1 for i in range(10)]
    tables = {
        "consecutive": [4, 5, 6, 7, 8, 9],
        "two runs": [20, 21, 22, 4, 5, 6],
        "scattered": [9, 1, 6, 3, 12, 15],
    }
    logits = {}
    for name, table in tables.items():
        backend.forward(StepBatch([prompt], [0], [table], 2, [0], [0]))
        step = StepBatch([[prompt[-1]]], [10], [table], 2, [0], [0])
        assert StepTensors.build(step, backend._cache, backend.torch_device).decode_rows is not None
        logits[f"{name} kernel"] = backend.forward(step).logits[0]
        backend._cache.decode_kernel = None
        try:
            spans = StepTensors.build(step, backend._cache, backend.torch_device).decode_spans
            assert spans is not None
            expected_runs = {"consecutive": 1, "two runs": 2}.get(name)
            if expected_runs is None:
                assert isinstance(spans[0], torch.Tensor) and 6 > MAX_DECODE_RUNS  # gathered
            else:
                assert isinstance(spans[0], list) and len(spans[0]) == expected_runs
                assert sum(count for _, count in spans[0]) == 11
            logits[name] = backend.forward(step).logits[0]
        finally:
            backend._cache.decode_kernel = kernel
        padded = StepTensors.build(step, backend._cache, backend.torch_device, padded_decode=True)
        logits[f"{name} padded"] = backend._run_model(padded)[0]
    reference = logits["consecutive padded"]
    for name, values in logits.items():
        assert torch.allclose(values, reference, atol=1e-5), name


async def test_greedy_without_the_decode_kernel_equals_generate_alone(causal_lm_dir: Path, reference) -> None:
    """``decode_attention_kernel: false``: PyTorch's attention, the same answers."""
    engine = make_engine(causal_lm_dir, decode_attention_kernel="false")
    try:
        assert engine.backend._cache.decode_kernel is None
        await assert_prompts_match_generate(engine, reference, [6 + 3 * i for i in range(len(PROMPTS))])
    finally:
        engine.stop()


@pytest.mark.parametrize("setting", ["true", "false"])
async def test_a_single_streams_dense_layers_follow_dense_row_kernel(
    causal_lm_dir: Path, reference, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One prompt alone: with ``dense_row_kernel`` on (the default) its one-row steps run every dense layer and
    the output head through the one-row kernel, off they stay on oneDNN; transformers' greedy answer either way."""
    from backends.transformers import dense_kernel, packed_linear

    kernel = dense_kernel.load()
    assert kernel is not None
    calls: list[int] = []
    project = kernel.project
    monkeypatch.setattr(kernel, "project", lambda *args: calls.append(1) or project(*args))
    engine = make_engine(causal_lm_dir, dense_row_kernel=setting)
    try:
        head = engine.backend.model.get_output_embeddings()
        assert isinstance(head, packed_linear.RowKernelHead) == (setting == "true")
        assert tokens(await collect(engine, PROMPTS[0], greedy(8))) == reference(PROMPTS[0], 8)
        assert bool(calls) == (setting == "true")
    finally:
        engine.stop()


async def test_steps_attend_without_the_cudnn_kernel(causal_lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model switches PyTorch's cuDNN attention off (it builds a plan per new shape, and prompt steps
    are new shapes: 40-500 ms a step on a GPU); every attention call of a step then runs with it off."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    engine = make_engine(causal_lm_dir)
    seen: list[bool] = []
    attend = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return attend(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    try:
        assert len(tokens(await collect(engine, PROMPTS[0], greedy(3)))) == 3
    finally:
        engine.stop()
    assert seen and not any(seen)


async def test_the_model_in_a_worker_process_generates_the_same_tokens(causal_lm_dir: Path, reference) -> None:
    """parameters.model_process: the forward passes run in a child process; mixed, chunked and sampled steps."""
    engine = make_engine(causal_lm_dir, model_process="true", max_num_batched_tokens="8")
    try:
        assert engine.backend._worker is not None and engine.backend.model is None
        await assert_prompts_match_generate(engine, reference, [6 + 5 * i for i in range(len(PROMPTS))])
        seeded = SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True, repetition_penalty=1.3)
        assert tokens(await collect(engine, "Hello", seeded)) == tokens(await collect(engine, "Hello", seeded))
    finally:
        engine.stop()
        engine.backend.unload()
    assert engine.backend._worker._process is None


async def test_a_dead_model_process_fails_its_sequences_and_is_replaced(causal_lm_dir: Path, reference) -> None:
    engine = make_engine(causal_lm_dir, model_process="true")
    try:
        worker = engine.backend._worker
        stream = engine.generate(GenerateRequest("t", prompt="Hello world", sampling=greedy(200)))
        await anext(stream)
        worker._process.kill()
        with pytest.raises(BackendError, match="model process"):
            async for _ in stream:
                pass
        # The next request gets a fresh worker, with a fresh cache, and the right tokens.
        assert tokens(await collect(engine, "Paris", greedy(10))) == reference("Paris", 10)
        assert engine.blocks.used_blocks == 0
    finally:
        engine.stop()
        engine.backend.unload()


async def test_max_num_seqs_bounds_the_running_batch(causal_lm_dir: Path) -> None:
    engine = make_engine(causal_lm_dir, max_num_seqs="2")
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(len(engine._running))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(collect(engine, p, greedy(20)) for p in PROMPTS[:5]))
    finally:
        watcher.cancel()
        engine.stop()
    assert max(seen) == 2


def test_engine_limits_that_cannot_hold_a_sequence_are_config_errors(causal_lm_dir: Path) -> None:
    with pytest.raises(ConfigError, match="kv_cache_blocks"):
        make_engine(causal_lm_dir, kv_cache_blocks="2", max_model_len="128")
    with pytest.raises(ConfigError, match="max_model_len"):
        make_engine(causal_lm_dir, max_model_len="100000")


def test_the_default_step_budget_follows_the_device(causal_lm_dir: Path) -> None:
    """Steps of 512 tokens on the CPU, where a step costs in proportion to its tokens; 2,048 (or the model's whole
    length) on a GPU. A budget in the config wins on either."""
    config = TransformersBackend.auto_complete_config(ModelConfig(name="lm", backend="transformers"), causal_lm_dir)
    backend = TransformersBackend(config, causal_lm_dir, CPU)
    assert EngineLimits.from_config(config, backend).max_num_batched_tokens == 512
    backend.device = Device("gpu", 0)  # the limits read only the kind of device
    assert EngineLimits.from_config(config, backend).max_num_batched_tokens == max(2048, backend.max_model_len)
    config.parameters["max_num_batched_tokens"] = "100"
    assert EngineLimits.from_config(config, backend).max_num_batched_tokens == 100


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "graphs", "process"),
    [
        ("float32", "true", "false"),
        ("float32", "false", "false"),
        ("bfloat16", "true", "false"),
        ("float32", "true", "auto"),
    ],
)
async def test_greedy_on_the_gpu_under_continuous_batching_equals_generate_alone(
    causal_lm_dir: Path, reference, dtype: str, graphs: str, process: str
) -> None:
    """The engine on CUDA, mixed prompt chunks and decoding (a step budget of 16 tokens), against the CPU reference:
    token for token in float32; in bfloat16, whose rounding flips close calls after a few tokens, the first token
    and the counts. Decode steps replay CUDA graphs (several batch sizes pass by as sequences finish)."""
    engine = make_engine(
        causal_lm_dir,
        Device("gpu", 0),
        dtype=dtype,
        max_num_batched_tokens="16",
        cuda_graphs=graphs,
        max_num_seqs="8",
        model_process=process,
    )
    try:
        assert engine.backend.torch_device.type == "cuda"
        assert (engine.backend._worker is not None) == (process == "auto")  # auto: a worker process on a GPU
        if graphs == "true" and process == "false":  # batch sizes 1, 2, 4, 8; contexts 128 and 256 (the model's)
            assert engine.backend._graphs.captured == 4 * 2 and not engine.backend._graphs.disabled
        lengths = [6 + 5 * i for i in range(len(PROMPTS))]
        results = await asyncio.gather(*(collect(engine, p, greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True)))
        for prompt, n, outputs in zip(PROMPTS, lengths, results, strict=True):
            expected, got = reference(prompt, n), tokens(outputs)
            if dtype == "float32":
                assert got == expected, prompt
            else:
                assert len(got) == n and got[:1] == expected[:1], prompt
        assert engine.blocks.used_blocks == 0
    finally:
        engine.stop()
        engine.backend.unload()
