"""The recipe: one tree of frozen, typed dataclasses describing an Ettin pair.

A recipe holds what encoder and decoder share (architecture, data, training, optimizer,
schedule, mesh, checkpoints, logging, phases); the only objective-specific field is where
Ettin differs: `data.mlm_mask_ratio`. The data section's dataclasses live with the data
pipelines (`data_pipelines.config`). Each section validates its own values in
`__post_init__` (ValueError naming the field); the loader adds the file and key path.

Public contract (scripts and docs rely on these names): train.steps, train.global_batch_size,
train.seq_len, train.seed, checkpoint.every_steps, mesh.data, mesh.fsdp, model.preset.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from data_pipelines.config import DataConfig, SourceConfig
from ettin_jax.models.config import (
    OBJECTIVES,
    PHASE_MODEL_FIELDS,
    RUNTIME_MODEL_FIELDS,
    ModelConfig,
    Objective,
    model_differences,
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run shared by both members.

    steps: optimizer updates; tokens: the budget in real (non-padding) tokens. The run ends at
    whichever is reached first (the step that reaches `tokens` is the last); either may be
    null, not both. The learning-rate schedule spans `tokens` when set, else steps x
    global_batch_size x seq_len token slots (an upper bound of the real tokens).
    The batch is sized in rows or in real tokens, one of the two (setting one in a recipe
    section or override clears the other there):
    global_batch_size: rows per update over all hosts;
    global_batch_tokens: real (non-padding) tokens per update, as Ettin's batches are best
      described (4608 unpacked rows held ~2.83M real tokens in pre-training, ~2.5M later): the
      rows are derived at the start of the phase from the packing fill measured on the phase's
      own data, rows = tokens / (seq_len x fill) rounded to whole microbatches
      (`ettin_jax.training.batch_sizing`).
    seq_len: tokens per row; seed: the seed of init, dropout and masking (Ettin used 21);
    data_seed: the seed of the document order (null: `seed`; Ettin's cross-objective runs used
    seed 210 with shuffle seed 21); objectives: which members of the pair to train;
    microbatch_size: rows per gradient accumulation microbatch (None = no accumulation), and
    the step by which batch warmup grows the batch; max_microbatch_size: the most rows a
    microbatch may hold (what the chips hold at once; None = microbatch_size): each batch then
    runs as the fewest whole microbatches of a multiple of microbatch_size rows, so the full
    batch after warmup takes large pieces while warmup still grows by small ones (the update is
    the same however the batch is split);
    batch_warmup_tokens: Ettin's batch-size warmup, the batch grows linearly in real tokens
    seen from one microbatch to the full batch over this many tokens, in whole microbatches
    (0 = off; needs microbatch_size); max_nonfinite_steps: updates in a row skipped for a
    non-finite loss or gradient before the run saves and stops.
    """

    # Fields of which a recipe section sets at most one; setting one clears the other.
    EXCLUSIVE: ClassVar[tuple[tuple[str, str], ...]] = (("global_batch_size",
                                                         "global_batch_tokens"),)

    steps: int | None = 1000
    tokens: int | None = None
    global_batch_size: int | None = 8
    global_batch_tokens: int | None = None
    seq_len: int = 1024
    seed: int = 21
    data_seed: int | None = None
    objectives: tuple[Objective, ...] = OBJECTIVES
    microbatch_size: int | None = None
    max_microbatch_size: int | None = None
    batch_warmup_tokens: int = 0
    max_nonfinite_steps: int = 8

    def __post_init__(self) -> None:
        _require(self.steps is not None or self.tokens is not None,
                 "steps and tokens are both null: set at least one to end the run")
        _require(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.tokens is None or self.tokens >= 1,
                 f"tokens must be >= 1 or null, got {self.tokens}")
        _require(self.batch_warmup_tokens >= 0,
                 f"batch_warmup_tokens must be >= 0, got {self.batch_warmup_tokens}")
        _require(not self.batch_warmup_tokens or self.microbatch_size is not None,
                 f"batch_warmup_tokens={self.batch_warmup_tokens} needs microbatch_size: the "
                 f"batch grows by whole microbatches")
        _require(self.global_batch_size is not None or self.global_batch_tokens is not None,
                 "global_batch_size and global_batch_tokens are both null: size the batch in "
                 "rows or in real tokens")
        _require(self.global_batch_size is None or self.global_batch_size >= 1,
                 f"global_batch_size must be >= 1, got {self.global_batch_size}")
        _require(self.global_batch_tokens is None or self.global_batch_tokens >= self.seq_len,
                 f"global_batch_tokens must be >= seq_len ({self.seq_len}), got "
                 f"{self.global_batch_tokens}")
        _require(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        _require(len(self.objectives) >= 1 and len(set(self.objectives)) == len(self.objectives),
                 f"objectives must name mlm and/or clm once each, got {list(self.objectives)}")
        _require(self.max_nonfinite_steps >= 1,
                 f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        _require(self.microbatch_size is None or self.microbatch_size >= 1,
                 f"microbatch_size must be >= 1 or null, got {self.microbatch_size}")
        _require(self.max_microbatch_size is None or (
            self.microbatch_size is not None and self.max_microbatch_size >= self.microbatch_size),
                 f"max_microbatch_size={self.max_microbatch_size} needs microbatch_size set and "
                 f"at most max_microbatch_size (got {self.microbatch_size}): microbatches are "
                 f"whole multiples of microbatch_size")
        if self.microbatch_size is not None and self.global_batch_size is not None:
            _require(self.global_batch_size % self.microbatch_size == 0,
                     f"microbatch_size {self.microbatch_size} must divide global_batch_size "
                     f"{self.global_batch_size}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """StableAdamW (Ettin) or AdamW; peak learning rate, betas, eps, decoupled weight decay.

    clip_grad_norm: optional global-norm clipping (StableAdamW's update clipping replaces it).
    """

    name: Literal["stable_adamw", "adamw"] = "stable_adamw"
    learning_rate: float = 8e-4
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 1e-5
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("b1", "b2"):
            _require(0.0 <= getattr(self, name) < 1.0,
                     f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.eps > 0, f"eps must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0,
                 f"clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, timed in real (non-pad) tokens.

    warmup_stable_decay: linear warmup over warmup_tokens to start x peak, constant, then
    `decay` ("1-sqrt" or "linear") over the last decay_tokens (null: the whole phase) down to
    floor x peak.
    constant: start x peak throughout. `start` < 1 restarts a new phase at a fraction of the
    peak (Ettin's decay phase: 0.5, with floor 0.02).
    """

    kind: Literal["warmup_stable_decay", "constant"] = "warmup_stable_decay"
    warmup_tokens: int = 0
    decay: Literal["1-sqrt", "linear"] = "1-sqrt"
    decay_tokens: int | None = 0
    floor: float = 0.0
    start: float = 1.0

    def __post_init__(self) -> None:
        _require(self.warmup_tokens >= 0, f"warmup_tokens must be >= 0, got {self.warmup_tokens}")
        _require(self.decay_tokens is None or self.decay_tokens >= 0,
                 f"decay_tokens must be >= 0 or null, got {self.decay_tokens}")
        _require(0.0 < self.start <= 1.0, f"start must be in (0, 1], got {self.start}")
        _require(0.0 <= self.floor <= self.start,
                 f"floor must be in [0, start={self.start}], got {self.floor}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `data` (replicas) x `fsdp` (parameter shards); one of them may be -1 (fill)."""

    data: int = -1
    fsdp: int = 1

    def __post_init__(self) -> None:
        for name in ("data", "fsdp"):
            value = getattr(self, name)
            _require(value == -1 or value >= 1, f"{name} must be -1 (fill) or >= 1, got {value}")
        _require(not (self.data == -1 and self.fsdp == -1),
                 "at most one of mesh.data and mesh.fsdp may be -1 (fill)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: save every `every_steps`, keep the last `keep` (and every
    `keep_every`-th step forever when set). init_from: a checkpoint (member or step directory)
    whose weights start a fresh run (new optimizer), e.g. the other member's for
    cross-objective training."""

    every_steps: int = 1000
    keep: int = 3
    keep_every: int | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, f"every_steps must be >= 1, got {self.every_steps}")
        _require(self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        _require(self.keep_every is None or self.keep_every >= 1,
                 f"keep_every must be >= 1 or null, got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging of each member's run (`ettin_jax.training.wandb_logging`).

    project / entity: where the runs go (null: W&B's own choice, $WANDB_PROJECT /
    $WANDB_ENTITY or the account's default); name: the runs are "<name>-encoder" and
    "<name>-decoder" (null: the run directory's last component); group: groups the pair's runs
    (null: the name); tags: added to each run with its member's name; notes: the runs'
    description; mode: "online", "offline" (`wandb sync` later) or "disabled" (null:
    $WANDB_MODE, else online); alerts: a W&B alert when a phase ends and when a run stops
    early.
    """

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    notes: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    alerts: bool = False

    MODES: ClassVar[tuple[str, ...]] = ("online", "offline", "disabled")

    def __post_init__(self) -> None:
        for field in ("project", "entity", "name", "group"):
            value = getattr(self, field)
            _require(value is None or (isinstance(value, str) and value.strip() != ""),
                     f"{field} must be a non-empty string or null, got {value!r}")
        for field in ("project", "entity"):  # W&B refuses these characters in both
            value = getattr(self, field) or ""
            bad = sorted(set(value) & set("/\\#?%:"))
            _require(not bad, f"{field} {value!r} must not contain {' '.join(bad)}")
        for tag in self.tags:
            _require(isinstance(tag, str) and 0 < len(tag) <= 64,
                     f"tags must be strings of 1 to 64 characters (W&B's limit), got {tag!r}")
        _require(self.mode is None or self.mode in self.MODES,
                 f"mode must be one of {', '.join(self.MODES)} or null, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics: log every `every_steps` steps (metrics.jsonl, and TensorBoard events when
    `tensorboard`, and to Weights & Biases when `wandb` is set); evaluate on `eval_batches`
    held-out batches every `eval_every_steps` steps (0: never)."""

    every_steps: int = 10
    tensorboard: bool = True
    eval_every_steps: int = 0
    eval_batches: int = 4
    wandb: WandbConfig | None = None

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, f"every_steps must be >= 1, got {self.every_steps}")
        _require(self.eval_every_steps >= 0,
                 f"eval_every_steps must be >= 0, got {self.eval_every_steps}")
        _require(self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}")


# The members of a pair by the objective they train.
MEMBERS: dict[str, Objective] = {"encoder": "mlm", "decoder": "clm"}


def member_of(objective: Objective) -> str:
    """The member ("encoder" or "decoder") that trains `objective`."""
    return next(member for member, trained in MEMBERS.items() if trained == objective)


@dataclasses.dataclass(frozen=True)
class MemberChanges:
    """What one member of the pair changes in a phase, where Ettin's encoder and decoder
    configs of that phase differ (e.g. the decoders' local-layer RoPE base in the decay phase
    of some sizes): the member's model section, resolved on top of the phase's. Only fields a
    phase may change (RoPE bases, dtypes, kernels) may differ: both members stay one
    architecture."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)


PhaseKind = Literal["pretrain", "extension", "decay"]
PHASE_KINDS: tuple[str, ...] = ("pretrain", "extension", "decay")  # Ettin's order
PHASE_SECTIONS: tuple[str, ...] = ("model", "data", "train", "optimizer", "schedule")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One phase of a run (Ettin: pre-train, context extension, decay), fully resolved.

    In a recipe file a phase lists only what changes: its sections start from the previous
    phase's (the first phase's from the recipe's top-level sections). A phase starts from the
    previous phase's final checkpoint: the same parameters, the optimizer state kept
    (`optimizer_state: keep`) or fresh (`reset`), the step count going on; its own data stream,
    learning-rate schedule, batch-size warmup and budget (train.tokens / train.steps count
    within the phase).

    kind: which of Ettin's phases this is ("pretrain", "extension", "decay"; null for another
    kind of phase); named kinds must come in that order.
    encoder / decoder: that member's changes in this phase (`MemberChanges`; null: none).
    Like kind, they belong to the phase that states them and do not carry over.
    """

    name: str
    kind: PhaseKind | None = None
    optimizer_state: Literal["keep", "reset"] = "keep"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    encoder: MemberChanges | None = None
    decoder: MemberChanges | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name,
                 f"name must be a non-empty name without '/', got {self.name!r}")
        for member in MEMBERS:
            changes = getattr(self, member)
            if changes is None:
                continue
            changed = model_differences(changes.model, self.model,
                                        ignore=PHASE_MODEL_FIELDS + RUNTIME_MODEL_FIELDS)
            _require(not changed, f"{member}.model changes the architecture: "
                     f"{', '.join(changed)}; a member may change only "
                     f"{', '.join(PHASE_MODEL_FIELDS + RUNTIME_MODEL_FIELDS)}")

    def for_member(self, member: str) -> PhaseConfig:
        """This phase as `member` ("encoder" or "decoder") trains it: its changes applied."""
        changes = getattr(self, member)
        model = self.model if changes is None else changes.model
        return dataclasses.replace(self, model=model, encoder=None, decoder=None)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A complete, validated recipe for an Ettin encoder/decoder pair."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    phases: tuple[PhaseConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [phase.name for phase in self.phases]
        _require(len(set(names)) == len(names), f"phases: names must be unique, got {names}")
        kinds = [(i, p.kind) for i, p in enumerate(self.phases) if p.kind is not None]
        for (i, kind), (j, later) in zip(kinds, kinds[1:]):
            _require(PHASE_KINDS.index(kind) <= PHASE_KINDS.index(later),
                     f"phases out of order: phases.{i} ({kind!r}) comes before phases.{j} "
                     f"({later!r}); Ettin's phases run {' -> '.join(PHASE_KINDS)}")
        previous = self.phases[0] if self.phases else None
        for i, phase in enumerate(self.phases):
            changed = model_differences(phase.model, self.model,
                                        ignore=PHASE_MODEL_FIELDS + RUNTIME_MODEL_FIELDS)
            _require(not changed, f"phases.{i}.model changes the architecture: "
                     f"{', '.join(changed)}; a phase may change only "
                     f"{', '.join(PHASE_MODEL_FIELDS + RUNTIME_MODEL_FIELDS)}")
            _require(phase.train.objectives == self.train.objectives,
                     f"phases.{i}.train.objectives {list(phase.train.objectives)} differs from "
                     f"train.objectives {list(self.train.objectives)}: every phase trains the "
                     f"same members")
            _require(phase.optimizer_state == "reset"
                     or phase.optimizer.name == previous.optimizer.name,
                     f"phases.{i} keeps the optimizer state of a {previous.optimizer.name} "
                     f"optimizer but uses {phase.optimizer.name}; set optimizer_state: reset")
            previous = phase

    def run_phases(self) -> tuple[PhaseConfig, ...]:
        """The phases a run goes through: `phases`, or one phase named "main" made of the
        top-level sections when the recipe lists none."""
        if self.phases:
            return self.phases
        return (PhaseConfig("main", **{name: getattr(self, name) for name in PHASE_SECTIONS}),)

    def for_member(self, member: str) -> Recipe:
        """This recipe as `member` ("encoder" or "decoder") trains it: every phase with that
        member's changes applied (`PhaseConfig.for_member`)."""
        return dataclasses.replace(self, phases=tuple(p.for_member(member) for p in self.phases))

    def phase_recipe(self, phase: PhaseConfig) -> Recipe:
        """This recipe with `phase`'s sections in place of the top-level ones and no phases:
        what one phase trains with."""
        return dataclasses.replace(self, phases=(), **{name: getattr(phase, name)
                                                       for name in PHASE_SECTIONS})
