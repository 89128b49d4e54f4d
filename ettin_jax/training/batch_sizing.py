"""Batches sized in real tokens: rows from `train.global_batch_tokens`, and a phase's steps.

Ettin did not pack: a step was 4608 rows of one chunk each, padding removed inside the model,
so its batch is best stated in real tokens (~2.83M per step in pre-training, ~2.5M later). Here
rows are packed to a fixed length, so the same real tokens per step take
rows = global_batch_tokens / (seq_len x fill) rows, fill being the fraction of row slots that
packing fills on the phase's data (`data_pipelines.packing_fill`, measured when training
starts). Rows are rounded to whole microbatches (at least one), so the tokens per step are
within half a microbatch of the target. A phase sized in rows (`global_batch_size`) is left as
it is.

Where the data cannot be read yet (a dry run before `data prepare`), the fill is
ASSUMED_PACKING_FILL and every figure derived from it is reported as an estimate.
"""

from __future__ import annotations

import dataclasses
import math

from data_pipelines.packing_fill import measure_packing_fill
from data_pipelines.sources import SourceError
from data_pipelines.tokenizers import TokenizerError
from ettin_jax.config import PhaseConfig, Recipe, TrainConfig
from ettin_jax.training.schedules import batch_size_schedule

# First-fit packing with 4 open rows on documents of typical lengths fills ~96% of the slots
# (docs/benchmarks.md, data pipeline table); only used until the data can be measured.
ASSUMED_PACKING_FILL = 0.96


@dataclasses.dataclass(frozen=True)
class BatchSize:
    """How a phase's batch is sized: rows per full batch, the packing fill they were sized
    with (measured on the data, or assumed), and the real tokens a full batch holds."""

    rows: int
    packing_fill: float
    fill_measured: bool
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        """Real tokens in a full batch at this fill."""
        return round(self.rows * self.seq_len * self.packing_fill)


def batch_size(train: TrainConfig, *, packing_fill: float | None,
               row_multiple: int = 1) -> BatchSize:
    """The full batch of `train`: global_batch_size rows, or, for a batch sized in tokens,
    global_batch_tokens / (seq_len x packing_fill) rounded to a multiple of the microbatch
    (else of `row_multiple`, e.g. the device count), at least one. `packing_fill` None: not
    measured, ASSUMED_PACKING_FILL. Without microbatches the rows depend on the device count,
    so a run resumed on another mesh may need other rows (its data state then refuses to
    load); with train.microbatch_size they do not."""
    fill = ASSUMED_PACKING_FILL if packing_fill is None else packing_fill
    if train.global_batch_tokens is None:
        return BatchSize(train.global_batch_size, fill, packing_fill is not None, train.seq_len)
    quantum = train.microbatch_size or row_multiple
    wanted = train.global_batch_tokens / (train.seq_len * fill)
    rows = quantum * max(1, round(wanted / quantum))
    return BatchSize(rows, fill, packing_fill is not None, train.seq_len)


def sized_phase(phase: PhaseConfig, size: BatchSize) -> PhaseConfig:
    """`phase` with train.global_batch_size = size.rows: what its batches, steps and
    compiled shapes use. (global_batch_tokens stays, as the record of what was asked.)"""
    return dataclasses.replace(phase, train=dataclasses.replace(phase.train,
                                                                global_batch_size=size.rows))


def estimated_steps(train: TrainConfig, size: BatchSize) -> int:
    """Optimizer steps of a phase: train.steps, or the steps that reach train.tokens at
    size.packing_fill real tokens per row slot, through the batch-size warmup (smaller
    batches, more steps), whichever ends the phase first."""
    if train.tokens is None:
        return train.steps
    sized = dataclasses.replace(train, global_batch_size=size.rows)
    rows_after = batch_size_schedule(sized)
    per_row = size.seq_len * size.packing_fill
    tokens, steps = 0.0, 0
    if train.batch_warmup_tokens and size.rows > train.microbatch_size:
        # Stage by stage: k microbatches per step until the tokens where k grows.
        growths = size.rows // train.microbatch_size - 1
        while tokens < train.tokens:
            rows = rows_after(int(tokens))
            if rows == size.rows:
                break
            k = rows // train.microbatch_size
            boundary = min(math.ceil(k * train.batch_warmup_tokens / growths), train.tokens)
            count = max(1, math.ceil((boundary - tokens) / (rows * per_row)))
            tokens, steps = tokens + count * rows * per_row, steps + count
    if tokens < train.tokens:
        steps += math.ceil((train.tokens - tokens) / (size.rows * per_row))
    return steps if train.steps is None else min(steps, train.steps)


def phase_batch_sizes(recipe: Recipe, *, tokenizer=None, row_multiple: int = 1,
                      measure: str = "tokens") -> list[BatchSize]:
    """The BatchSize of every phase of `recipe` (`Recipe.run_phases` order); see
    `phase_batch_size`."""
    return [phase_batch_size(phase, index, tokenizer=tokenizer, row_multiple=row_multiple,
                             measure=measure)
            for index, phase in enumerate(recipe.run_phases())]


def phase_batch_size(phase: PhaseConfig, index: int, *, tokenizer=None, row_multiple: int = 1,
                     measure: str = "tokens") -> BatchSize:
    """The BatchSize of `phase`, the `index`-th of its run (which sets its data seed).

    measure: "tokens" measures the packing fill of a phase sized in tokens (training: its data
    must be readable; raises what reading it raises); "all" measures it for any phase whose
    data can be read and assumes ASSUMED_PACKING_FILL where it cannot (a dry run: nothing is
    required to exist). `tokenizer` None: the data's own (`load_data_tokenizer`)."""
    from data_pipelines.pipeline import load_data_tokenizer

    fill = None
    if measure == "all" or phase.train.global_batch_tokens is not None:
        try:
            fill = measure_packing_fill(phase.data, seq_len=phase.train.seq_len,
                                        seed=phase_data_seed(phase.train, index),
                                        tokenizer=tokenizer or load_data_tokenizer(phase.data))
        except (SourceError, TokenizerError):
            if measure != "all":
                raise
    return batch_size(phase.train, packing_fill=fill, row_multiple=row_multiple)


def sized_recipe(recipe: Recipe, sizes: list[BatchSize]) -> Recipe:
    """`recipe` with every phase's train.global_batch_size set to its size's rows (the top-level
    train when the recipe lists no phases): the recipe a run trains with."""
    phases = [sized_phase(phase, size) for phase, size in zip(recipe.run_phases(), sizes)]
    if not recipe.phases:
        return dataclasses.replace(recipe, train=phases[0].train)
    return dataclasses.replace(recipe, phases=tuple(phases))


def phase_data_seed(train: TrainConfig, index: int) -> int:
    """The seed of phase `index`'s document order: train.data_seed (else train.seed) plus the
    phase index, so a phase reading its predecessor's sources does not replay them."""
    return (train.seed if train.data_seed is None else train.data_seed) + index
