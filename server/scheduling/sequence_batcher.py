"""Sequence batching with Triton's semantics, for stateful models: every request names its sequence.

A sequence (Triton's correlation id, the request parameter ``sequence_id``) starts with a request that sets
``sequence_start`` and ends with one that sets ``sequence_end``. Its first request gets it a batch slot on one
instance, which it keeps until it ends or stays idle longer than ``max_sequence_idle_microseconds``; sequences that
find every slot taken wait in a backlog, in arrival order, for one to free. A sequence's requests run one at a time
and in order, so each one sees the state its predecessor left.

Each instance has its own slots and forms its own batches: one row per sequence, never two requests of the same
sequence in one batch. ``direct`` lays rows out by slot (a sequence keeps its row for its lifetime; slots with
nothing to run are padded with zeros and ``CONTROL_SEQUENCE_READY`` false), ``oldest`` takes the sequences whose
waiting request is oldest, up to the largest preferred batch size, waiting at most ``max_queue_delay_microseconds``
for that many. Control inputs are written by the server for every row, and implicit state (``state``) is kept per
sequence: its input is the initial state on a request with ``sequence_start`` and the sequence's last state output
otherwise, so neither is a tensor clients send or see.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.config import CONFIG_FILENAME, ControlKind, ModelConfig, SequenceControl, SequenceState
from server.errors import BackendError, ConfigError, InvalidInput, ModelDockError
from server.extensions.statistics import FailureReason, ModelStats
from server.protocol.datatypes import numpy_dtype
from server.protocol.tensor_codec import deserialize_raw, element_count
from server.protocol.types import InferRequest
from server.scheduling.instances import InstancePool, ModelInstance
from server.scheduling.scheduler import (
    BatchOutcome,
    PendingRequest,
    Scheduler,
    merge_inputs,
    requested_output_names,
    split_outputs,
)

log = logging.getLogger(__name__)

SequenceId = int | str
# Triton keeps data files for initial states in this folder of the model folder.
INITIAL_STATE_FOLDER = "initial_state"

_INTEGER_RANGES = {
    "TYPE_UINT64": (0, 2**64 - 1),
    "TYPE_INT64": (-(2**63), 2**63 - 1),
    "TYPE_UINT32": (0, 2**32 - 1),
    "TYPE_INT32": (-(2**31), 2**31 - 1),
}


@dataclass(slots=True, eq=False)
class SequenceStep:
    """One request of a sequence, with the flags it arrived with."""

    pending: PendingRequest
    start: bool
    end: bool


@dataclass(slots=True, eq=False)
class Sequence:
    id: SequenceId
    steps: deque[SequenceStep] = field(default_factory=deque)
    # The last state output per state input name (one row, no batch dimension); empty means "initial state".
    state: dict[str, np.ndarray] = field(default_factory=dict)
    batcher: InstanceSlots | None = None
    position: int = -1
    busy: bool = False
    idle_since_ns: int = field(default_factory=time.monotonic_ns)


@dataclass(slots=True, eq=False)
class InstanceSlots:
    """One instance's batch slots and the signal that wakes the task forming its batches."""

    instance: ModelInstance
    slots: list[Sequence | None]
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def free(self) -> int:
        return sum(1 for s in self.slots if s is None)


@dataclass(slots=True)
class BatchRow:
    """A row of a batch: a sequence's step, or padding (``step`` None) for a direct slot with nothing to run."""

    sequence: Sequence | None
    step: SequenceStep | None


def initial_states(config: ModelConfig, model_dir: Path | None) -> dict[str, np.ndarray]:
    """Each state's value on a sequence's first request, read once when the model loads.

    Without ``initial_state`` the state starts as zeros (Triton leaves it uninitialized), with 1 for each variable
    dimension, as in Triton; the model then usually resets it on ``CONTROL_SEQUENCE_START``.
    """
    assert config.sequence_batching is not None
    source = model_dir / CONFIG_FILENAME if model_dir is not None else Path(f"model '{config.name}'")
    states: dict[str, np.ndarray] = {}
    for position, state in enumerate(config.sequence_batching.state):
        dtype = numpy_dtype(state.wire_datatype)
        if not state.initial_state:
            states[state.input_name] = _zeros([d if d > 0 else 1 for d in state.dims], dtype)
            continue
        initial = state.initial_state[0]
        if initial.zero_data:
            states[state.input_name] = _zeros(initial.dims, dtype)
            continue
        where = f"{source}: field 'sequence_batching.state[{position}].initial_state[0].data_file'"
        if model_dir is None:
            raise ConfigError(f"{where}: a data file needs the model's folder")
        assert initial.data_file is not None
        path = model_dir / INITIAL_STATE_FOLDER / initial.data_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        if state.wire_datatype != "BYTES":
            needed = element_count(initial.dims) * dtype.itemsize
            if len(data) < needed:
                raise ConfigError(
                    f"{where}: {state.data_type} dims {initial.dims} need {needed} bytes, {path} has {len(data)}"
                )
            data = data[:needed]
        try:
            states[state.input_name] = deserialize_raw(state.wire_datatype, initial.dims, data, state.input_name)
        except InvalidInput as exc:
            raise ConfigError(f"{where}: {path}: {exc.message}") from None
    return states


def _zeros(dims: list[int], dtype: np.dtype) -> np.ndarray:
    if dtype == np.object_:
        return np.full(dims, b"", dtype=object)
    return np.zeros(dims, dtype=dtype)


class SequenceBatcher(Scheduler):
    def __init__(
        self,
        config: ModelConfig,
        version: str,
        pool: InstancePool,
        stats: ModelStats | None = None,
        model_dir: Path | None = None,
    ) -> None:
        super().__init__(config, version, pool, stats)
        if config.sequence_batching is None:
            raise ValueError("SequenceBatcher needs a sequence_batching section")
        settings = config.sequence_batching
        self._initial = initial_states(config, model_dir)
        self._states: list[SequenceState] = list(settings.state)
        self._controls: list[tuple[str, SequenceControl]] = [
            (item.name, control) for item in settings.control_input for control in item.control
        ]
        self._corrid = next((c for _, c in self._controls if c.kind == ControlKind.CONTROL_SEQUENCE_CORRID), None)
        self._max_rows = max(1, config.max_batch_size)
        self._oldest = settings.oldest
        slot_count = self._max_rows
        if self._oldest is not None:
            if self._oldest.max_candidate_sequences > 0:
                slot_count = self._oldest.max_candidate_sequences
            preferred = [s for s in self._oldest.preferred_batch_size if s <= self._max_rows]
            self._target_rows = max(preferred) if preferred else self._max_rows
            self._delay_ns = self._oldest.max_queue_delay_microseconds * 1000
        else:
            direct = settings.direct
            self._delay_ns = direct.max_queue_delay_microseconds * 1000 if direct is not None else 0
            utilization = direct.minimum_slot_utilization if direct is not None else 0.0
            self._target_rows = max(1, math.ceil(utilization * slot_count))
        self._batchers = [InstanceSlots(instance, [None] * slot_count) for instance in pool.instances]
        self._idle_ns = settings.idle_microseconds * 1000
        # Sequences that still take requests, by id; one that got its END request is no longer here.
        self._sequences: dict[SequenceId, Sequence] = {}
        # Every sequence holding a slot or waiting for one, ended or not.
        self._live: set[Sequence] = set()
        self._backlog: deque[Sequence] = deque()
        self._queued: dict[PendingRequest, Sequence] = {}
        self._reaper_wake = asyncio.Event()
        self._tasks_started = False

    # -- accepting requests -------------------------------------------------------------------------------
    def enqueue(self, pending: PendingRequest) -> None:
        request = pending.request
        sequence_id = request.parameters.get("sequence_id", 0)
        name = self.config.name
        if sequence_id == 0 or sequence_id == "":
            raise InvalidInput(
                f"inference request to model '{name}' must specify a non-zero or non-empty sequence_id: it is a "
                "sequence model (sequence_batching)"
            )
        if self.config.batching and request.batch_size != 1:
            raise InvalidInput(
                f"inference request to model '{name}' must have batch size 1 (got {request.batch_size}): the "
                "sequence batcher runs one row per request"
            )
        self._check_corrid(sequence_id)
        start = request.parameters.get("sequence_start", False) is True
        end = request.parameters.get("sequence_end", False) is True
        sequence = self._sequences.get(sequence_id)
        if sequence is None and not start:
            raise InvalidInput(
                f"inference request for sequence {sequence_id!r} to model '{name}' must specify sequence_start on "
                "the first request of the sequence: the sequence was never started, has ended, or was idle longer "
                f"than max_sequence_idle_microseconds ({self._idle_ns // 1000})"
            )
        if sequence is None:
            sequence = Sequence(sequence_id)
            self._sequences[sequence_id] = sequence
            self._live.add(sequence)
            self._assign(sequence)
        elif start:
            log.warning(
                "sequence %r of model '%s' started again before it ended; its earlier requests run first, then the "
                "new start resets its state",
                sequence_id,
                name,
            )
        sequence.steps.append(SequenceStep(pending, start, end))
        self._queued[pending] = sequence
        if end:
            # As in Triton, the id is free at once: a later request must start a new sequence.
            del self._sequences[sequence_id]
        self._start_tasks()
        if sequence.batcher is not None:
            sequence.batcher.wake.set()

    def _check_corrid(self, sequence_id: SequenceId) -> None:
        if self._corrid is None or self._corrid.data_type == "TYPE_STRING":
            return
        assert self._corrid.data_type is not None
        low, high = _INTEGER_RANGES[self._corrid.data_type]
        if isinstance(sequence_id, str) or not low <= sequence_id <= high:
            raise InvalidInput(
                f"sequence_id {sequence_id!r} does not fit the CONTROL_SEQUENCE_CORRID input "
                f"({self._corrid.data_type}) of model '{self.config.name}'"
            )

    def _assign(self, sequence: Sequence) -> None:
        """Give a new sequence a free slot on the instance with the most free slots, else a place in the backlog."""
        batcher = max(self._batchers, key=lambda b: b.free)
        if not batcher.free:
            self._backlog.append(sequence)
            return
        self._place(sequence, batcher, batcher.slots.index(None))

    def _place(self, sequence: Sequence, batcher: InstanceSlots, position: int) -> None:
        batcher.slots[position] = sequence
        sequence.batcher, sequence.position = batcher, position
        batcher.wake.set()

    def _release(self, sequence: Sequence) -> None:
        """Free a sequence's slot (or backlog place) and hand the slot to the oldest sequence in the backlog."""
        self._live.discard(sequence)
        if self._sequences.get(sequence.id) is sequence:
            del self._sequences[sequence.id]
        batcher = sequence.batcher
        if batcher is None:
            if sequence in self._backlog:
                self._backlog.remove(sequence)
            return
        batcher.slots[sequence.position] = None
        sequence.batcher = None
        if self._backlog:
            self._place(self._backlog.popleft(), batcher, sequence.position)

    def _withdraw(self, pending: PendingRequest) -> bool:
        sequence = self._queued.pop(pending, None)
        if sequence is None:
            return False
        sequence.steps = deque(step for step in sequence.steps if step.pending is not pending)
        sequence.idle_since_ns = time.monotonic_ns()
        self._reaper_wake.set()
        return True

    def _start_tasks(self) -> None:
        if self._tasks_started:
            return
        self._tasks_started = True
        for batcher in self._batchers:
            self._spawn(self._serve(batcher))
        self._spawn(self._reap())

    async def close(self) -> None:
        self._closed = True
        self._wake_all()
        await super().close()

    def _wake_all(self) -> None:
        for batcher in self._batchers:
            batcher.wake.set()
        self._reaper_wake.set()

    # -- idle sequences -----------------------------------------------------------------------------------
    async def _reap(self) -> None:
        """End sequences idle (nothing queued nor running) for longer than ``max_sequence_idle_microseconds``.

        Once the scheduler closes, idle sequences end at once, so that sequences in the backlog still get a slot
        for the requests they were accepted with.
        """
        while True:
            if self._closed and not self._queued:
                return
            idle_ns = 0 if self._closed else self._idle_ns
            now = time.monotonic_ns()
            next_expiry: int | None = None
            for sequence in list(self._live):
                if sequence.steps or sequence.busy:
                    continue
                expiry = sequence.idle_since_ns + idle_ns
                if expiry <= now:
                    if not self._closed:
                        log.info(
                            "sequence %r of model '%s' was idle for %d us; its slot is free",
                            sequence.id,
                            self.config.name,
                            self._idle_ns // 1000,
                        )
                    self._release(sequence)
                else:
                    next_expiry = expiry if next_expiry is None else min(next_expiry, expiry)
            self._reaper_wake.clear()
            timeout = None if next_expiry is None else (next_expiry - now) / 1e9
            try:
                await asyncio.wait_for(self._reaper_wake.wait(), timeout)
            except TimeoutError:
                pass

    # -- forming and running batches ----------------------------------------------------------------------
    async def _serve(self, batcher: InstanceSlots) -> None:
        """Form and run this instance's batches, one at a time, until the scheduler closes with nothing queued."""
        while True:
            try:
                await self._serve_until_closed(batcher)
                return
            except Exception:  # a bug here must fail the waiting requests, not leave them hanging
                log.exception("sequence batcher of model '%s' failed", self.config.name)
                self._fail_waiting(batcher)

    def _fail_waiting(self, batcher: InstanceSlots) -> None:
        error = BackendError(f"model '{self.config.name}': the sequence batcher failed; see the server log")
        for sequence in batcher.slots:
            if sequence is None:
                continue
            sequence.busy = False
            while sequence.steps:
                pending = sequence.steps.popleft().pending
                self._queued.pop(pending, None)
                self.stats.dequeued()
                self.stats.record_failure([pending.arrival_ns], FailureReason.OTHER)
                pending.fail(error)

    async def _serve_until_closed(self, batcher: InstanceSlots) -> None:
        while True:
            ready = self._ready(batcher)
            if not ready:
                if self._closed and not self._queued:
                    return
                batcher.wake.clear()
                await batcher.wake.wait()
                continue
            head = min(ready, key=lambda s: s.steps[0].pending.arrival_ns)
            signature = self._signature(head)
            compatible = [s for s in ready if self._signature(s) == signature]
            ready_at = head.steps[0].pending.arrival_ns + self._delay_ns
            now = time.monotonic_ns()
            if len(compatible) < self._target_rows and now < ready_at and not self._closed:
                batcher.wake.clear()
                try:
                    await asyncio.wait_for(batcher.wake.wait(), (ready_at - now) / 1e9)
                except TimeoutError:
                    pass
                continue
            await self._run(batcher, self._rows(compatible))

    def _ready(self, batcher: InstanceSlots) -> list[Sequence]:
        return [s for s in batcher.slots if s is not None and s.steps and not s.busy]

    def _rows(self, compatible: list[Sequence]) -> list[BatchRow]:
        """The batch's rows: oldest first (``oldest``), or by slot with padding in between (``direct``)."""
        if self._oldest is not None or not self.config.batching:
            chosen = sorted(compatible, key=lambda s: s.steps[0].pending.arrival_ns)[: self._target_rows]
            if not self.config.batching:
                chosen = chosen[:1]
            return [BatchRow(s, s.steps[0]) for s in chosen]
        by_position = {s.position: s for s in compatible}
        return [
            BatchRow(by_position[p], by_position[p].steps[0]) if p in by_position else BatchRow(None, None)
            for p in range(max(by_position) + 1)
        ]

    def _signature(self, sequence: Sequence) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """What rows must share to be stacked: each input's dtype and shape and each state's shape."""
        step = sequence.steps[0]
        inputs = tuple(
            (name, array.dtype.str, tuple(array.shape[1:] if self.config.batching else array.shape))
            for name, array in sorted(step.pending.request.inputs.items())
        )
        states = tuple((s.input_name, "", tuple(self._state_of(sequence, s, step.start).shape)) for s in self._states)
        return inputs + states

    def _state_of(self, sequence: Sequence, state: SequenceState, start: bool) -> np.ndarray:
        if start:
            return self._initial[state.input_name]
        return sequence.state.get(state.input_name, self._initial[state.input_name])

    async def _run(self, batcher: InstanceSlots, rows: list[BatchRow]) -> None:
        real = [row for row in rows if row.step is not None]
        for row in real:
            assert row.sequence is not None and row.step is not None
            row.sequence.steps.popleft()
            self._queued.pop(row.step.pending, None)
            row.sequence.busy = True
            if row.step.start:
                row.sequence.state = {}
        batch = [row.step.pending for row in real if row.step is not None]
        outcome = await self._execute_rows(batcher.instance, rows, batch)
        now = time.monotonic_ns()
        for row in real:
            assert row.sequence is not None and row.step is not None
            row.sequence.busy = False
            row.sequence.idle_since_ns = now
            if row.step.end and not row.sequence.steps:
                self._release(row.sequence)
        self._reaper_wake.set()
        self._deliver(batch, outcome)
        if self._closed:
            self._wake_all()

    async def _execute_rows(
        self, instance: ModelInstance, rows: list[BatchRow], batch: list[PendingRequest]
    ) -> BatchOutcome:
        start = time.monotonic_ns()
        self.stats.dequeued(len(batch))
        try:
            reference = batch[0].request
            requests = [row.step.pending.request if row.step is not None else _padding(reference) for row in rows]
            inputs = merge_inputs(self.config, requests)
            inputs.update(self._control_tensors(rows))
            reference_row = next(row for row in rows if row.step is not None)
            for state in self._states:
                inputs[state.input_name] = self._stack(
                    [self._row_state(row, reference_row, state) for row in rows], state.input_name
                )
            output_names = requested_output_names(self.config, [p.request for p in batch])
            output_names += [s.output_name for s in self._states]
            merged = time.monotonic_ns()
            outputs = await instance.execute(inputs, output_names)
            executed = time.monotonic_ns()
            real_rows = [i for i, row in enumerate(rows) if row.step is not None]
            new_states = {s.input_name: self._state_rows(s, outputs, len(rows)) for s in self._states}
            kept = {s.output_name for s in self._states}
            client_outputs = {name: array for name, array in outputs.items() if name not in kept}
            if len(real_rows) != len(rows) and self.config.batching:
                client_outputs = {name: np.asarray(array)[real_rows] for name, array in client_outputs.items()}
            responses = split_outputs(self.config, self.version, batch, client_outputs)
            for index in real_rows:
                sequence = rows[index].sequence
                assert sequence is not None
                for input_name, states in new_states.items():
                    sequence.state[input_name] = states[index]
            return BatchOutcome(responses, None, (start, merged, executed, time.monotonic_ns()))
        except ModelDockError as exc:
            return BatchOutcome([], exc)
        except Exception as exc:  # a backend bug fails this batch, not the server
            return BatchOutcome([], BackendError(f"model '{self.config.name}': {type(exc).__name__}: {exc}"))

    def _row_state(self, row: BatchRow, reference: BatchRow, state: SequenceState) -> np.ndarray:
        if row.step is not None and row.sequence is not None:
            return self._state_of(row.sequence, state, row.step.start)
        assert reference.sequence is not None and reference.step is not None
        shape = self._state_of(reference.sequence, state, reference.step.start).shape
        return _zeros(list(shape), numpy_dtype(state.wire_datatype))

    def _stack(self, rows: list[np.ndarray], name: str) -> np.ndarray:
        if not self.config.batching:
            return rows[0]
        return np.stack(rows)

    def _state_rows(self, state: SequenceState, outputs: dict[str, np.ndarray], count: int) -> list[np.ndarray]:
        """A state output split into one owned copy per row, after checking it is what the config declares."""
        if state.output_name not in outputs:
            raise BackendError(f"model '{self.config.name}' did not produce state output '{state.output_name}'")
        array = np.asarray(outputs[state.output_name])
        expected = numpy_dtype(state.wire_datatype)
        matches = array.dtype.kind in ("O", "S", "U") if expected == np.object_ else array.dtype == expected
        if not matches:
            raise BackendError(
                f"model '{self.config.name}': state output '{state.output_name}' has dtype {array.dtype}, but the "
                f"config declares {state.data_type}"
            )
        if not self.config.batching:
            return [array.copy()]
        if array.ndim == 0 or array.shape[0] != count:
            raise BackendError(
                f"model '{self.config.name}': state output '{state.output_name}' has shape {list(array.shape)} for "
                f"a batch of {count}"
            )
        return [array[i].copy() for i in range(count)]

    def _control_tensors(self, rows: list[BatchRow]) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {}
        shape = [len(rows), 1] if self.config.batching else [1]
        for name, control in self._controls:
            values: list[object] = []
            for row in rows:
                step, sequence = row.step, row.sequence
                if control.kind == ControlKind.CONTROL_SEQUENCE_CORRID:
                    sequence_id: SequenceId = sequence.id if step is not None and sequence is not None else 0
                    if control.data_type == "TYPE_STRING":
                        values.append(str(sequence_id).encode() if sequence_id != 0 else b"")
                    else:
                        values.append(sequence_id)
                    continue
                flag = step is not None and (
                    (control.kind == ControlKind.CONTROL_SEQUENCE_START and step.start)
                    or (control.kind == ControlKind.CONTROL_SEQUENCE_END and step.end)
                    or control.kind == ControlKind.CONTROL_SEQUENCE_READY
                )
                values.append(control.value(flag))
            tensors[name] = np.array(values, dtype=numpy_dtype(control.wire_datatype)).reshape(shape)
        return tensors


def _padding(reference: InferRequest) -> InferRequest:
    """A stand-in request for a slot with nothing to run: zeros shaped like a real request of the batch."""
    inputs = {name: _zeros(list(array.shape), array.dtype) for name, array in reference.inputs.items()}
    return InferRequest(model_name=reference.model_name, inputs=inputs)
