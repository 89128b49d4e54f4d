"""A phase's batches, made ahead on a background thread: host data -> device arrays, with the
token accounting that decides each batch's size and the phase's end.

    with PhaseBatches(phase, index, objective, tokenizer, mesh, position) as batches:
        for batch in batches:               # PreparedBatch: device arrays + where the run stands
            state, metrics = step_fn(state, batch.arrays)

The host must know every batch's real (non-padding) token count without asking the device:
batch-size warmup sizes the next batch from the tokens seen, and a phase budgeted in tokens ends
on the step that reaches its budget. Each process counts its own rows when it builds them; with
several processes the counts are summed through the coordination service's key-value store
(`distributed.HostSum`): host to host, no device collective, so it runs on this thread while the
device computes. The device keeps its own count of the same tokens for the learning rate
(`TrainState.phase_tokens`).

Why a thread of our own and not grain's prefetch: what runs ahead is more than reading data:
cutting full batches into the growing batches of batch-size warmup (whose size depends on the
tokens of the batches before), agreeing on token counts across processes, and the transfer to
the devices. Batches are made in order, `depth` ahead; each carries the data state just after
it, so a checkpoint stores exactly where the data continues, however far ahead the thread is.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import jax
import numpy as np

from data_pipelines.microbatches import MicrobatchQueue
from data_pipelines.pipeline import make_batch_iterator
from ettin_jax.config import PhaseConfig
from ettin_jax.models.config import Objective
from ettin_jax.training.batch_sizing import phase_data_seed
from ettin_jax.training.distributed import HostSum
from ettin_jax.training.mesh import batch_sharding
from ettin_jax.training.phases import phase_done
from ettin_jax.training.schedules import batch_size_schedule

# Batches made ahead of the step being run: one in flight to the device, one being built.
PREFETCH_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """One step's batch on the devices and where the phase stands after it.

    arrays: global arrays (rows over every device); data_state: the data iterator's state just
    after this batch (what a checkpoint of its step stores); rows: global rows; tokens: real
    tokens of the whole global batch; phase_step / phase_tokens: the phase's steps and real
    tokens once this batch is trained on; last: the phase's budget is reached with it.
    """

    arrays: dict[str, jax.Array]
    data_state: dict[str, Any]
    rows: int
    tokens: int
    phase_step: int
    phase_tokens: int
    last: bool


_END = object()


class PhaseBatches:
    """The batches of phase `index` from (`phase_step`, `phase_tokens`) and `data_state` to the
    phase's end, made `depth` ahead on a daemon thread; iterate, and close (or use as a context
    manager) to stop the thread. The same rows for both members; each process builds its own
    rows; each phase its own stream (seed + phase index: a phase reading its predecessor's
    sources does not replay them). An error on the thread is raised by the iteration."""

    def __init__(self, phase: PhaseConfig, index: int, objective: Objective, tokenizer, mesh, *,
                 phase_step: int, phase_tokens: int, data_state: dict | None,
                 label: str, depth: int = PREFETCH_DEPTH):
        train = phase.train
        stream = make_batch_iterator(
            phase.data, seq_len=train.seq_len, global_batch_size=train.global_batch_size,
            seed=train.seed + index, data_seed=phase_data_seed(train, index),
            objective=objective, tokenizer=tokenizer,
            process_index=jax.process_index(), process_count=jax.process_count())
        self._train = train
        self._microbatch = train.microbatch_size or train.global_batch_size
        self._queue = MicrobatchQueue(stream, train.global_batch_size // self._microbatch)
        if data_state is not None:
            self._queue.set_state(data_state)
        self._rows_after = batch_size_schedule(train)
        self._sharding = batch_sharding(mesh)
        self._start = (phase_step, phase_tokens)
        self._token_sum = HostSum(f"ettin-jax/batch-tokens/{label}/{index}/{phase_step}")
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=f"batches {label}",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> PhaseBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> PhaseBatches:
        return self

    def __next__(self) -> PreparedBatch:
        item = self._ready.get()
        if item is _END:
            self._ready.put(_END)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self._ready.put(item)
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (it may be blocked on a full queue) and waits for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._ready.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _produce(self) -> None:
        try:
            step, tokens = self._start
            while not phase_done(self._train, step, tokens) and not self._stop.is_set():
                rows = self._rows_after(tokens)
                local = self._queue.take(rows // self._microbatch)
                data_state = self._queue.get_state()
                try:
                    batch_tokens = self._token_sum(
                        int(np.count_nonzero(local["segment_ids"])), stop=self._stop)
                except InterruptedError:
                    return
                # The batch is the one host-to-device transfer of a step: allowed whatever
                # guard the user set (`jax.transfer_guard`, e.g. to find stalls).
                with jax.transfer_guard("allow"):
                    arrays = {k: jax.make_array_from_process_local_data(self._sharding, v)
                              for k, v in local.items()}
                step, tokens = step + 1, tokens + batch_tokens
                self._put(PreparedBatch(arrays, data_state, rows, batch_tokens, step, tokens,
                                        last=phase_done(self._train, step, tokens)))
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._put(error)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return
            except queue.Full:
                pass
