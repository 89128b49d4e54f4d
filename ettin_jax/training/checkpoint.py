"""Native checkpoints: orbax steps under a member directory, weights plus what they are.

    MEMBER_DIR/                     RUN_DIR/encoder, RUN_DIR/decoder, or `ettin-jax import --out`
      checkpoints/<step>/           one orbax CheckpointManager step, items:
        params/                       the model's parameters (nnx pure dict)
        meta/                         JSON: format version, objective, model config, special tokens
        train/                        (training) optimizer state and counters
        progress/                     (training) JSON: phase, tokens seen, data iterator state
        recipe/                       (training) JSON: the resolved recipe
        PHASE_END                     (training) when the step ended a phase: its name
      tokenizer/                    tokenizer files (optional), shared by every step
      unreadable-checkpoints/<step> (training) steps found damaged on resume, set aside

Orbax finalizes a step when it is complete (a renamed temporary directory on a local disk, a
`commit_success.txt` written last in object storage), so a step that was being written when the
process died is never listed. MEMBER_DIR may be a gs:// or s3:// URL (`ettin_jax.storage`).
Other items (optimizer state, data iterator) sit next to `params` in the same step;
weights-only restore reads `params` and `meta` alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils.epath import Path
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy

from data_pipelines.special_tokens import SpecialTokens
from data_pipelines.tokenizer_files import copy_tokenizer_files
from ettin_jax import storage
from ettin_jax.config.loading import dataclass_from_dict, recipe_to_dict
from ettin_jax.config.schema import MEMBERS, CheckpointConfig
from ettin_jax.errors import CheckpointError, ConfigError, MissingCheckpointError, first_line
from ettin_jax.models import EttinModel, ModelConfig
from ettin_jax.models.config import OBJECTIVES, Objective, model_differences
from ettin_jax.storage import PathLike, StorageError
from ettin_jax.training.state import TrainState, placed_token_count

CHECKPOINTS = "checkpoints"
UNREADABLE = "unreadable-checkpoints"
TOKENIZER = "tokenizer"
PHASE_END = "PHASE_END"  # in a step directory: the step ended the phase the file names
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a finished step in object storage
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RestoredWeights:
    """A model restored from a native checkpoint, with what it needs to be used or exported."""

    model: EttinModel
    special_tokens: SpecialTokens
    tokenizer_dir: Path | None
    step: int
    step_dir: Path


def checkpoint_meta(config: ModelConfig, objective: Objective,
                    special_tokens: SpecialTokens) -> dict[str, Any]:
    """The `meta` item of every checkpoint step: what the weights are."""
    return {"format_version": FORMAT_VERSION, "objective": objective,
            "model": recipe_to_dict(config), "special_tokens": special_tokens.as_dict()}


def save_weights(
    member_dir: PathLike,
    model: EttinModel,
    *,
    special_tokens: SpecialTokens,
    tokenizer_dir: PathLike | None = None,
    step: int = 0,
) -> Path:
    """Writes `model`'s parameters as checkpoint `step` of `member_dir`; returns the step dir.

    Copies the tokenizer files of `tokenizer_dir` to MEMBER_DIR/tokenizer. Raises
    CheckpointError when the step already exists.
    """
    member_dir = storage.absolute(member_dir)
    meta = checkpoint_meta(model.config, model.objective, special_tokens)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with _manager(member_dir) as manager:
        if step in manager.all_steps():
            raise CheckpointError(f"{member_dir / CHECKPOINTS / str(step)} already exists")
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    if tokenizer_dir is not None:
        copy_tokenizer_files(storage.path(tokenizer_dir), member_dir / TOKENIZER)
    return member_dir / CHECKPOINTS / str(step)


def restore_weights(path: PathLike, *, step: int | None = None) -> RestoredWeights:
    """The model saved at `path`: a member directory (latest complete step, or `step`) or one
    step directory (MEMBER_DIR/checkpoints/<step>).

    Raises CheckpointError when `path` holds no complete checkpoint, or its metadata is not
    one this version reads.
    """
    member_dir, step = _locate(storage.absolute(path), step)
    step_dir = member_dir / CHECKPOINTS / str(step)
    with _manager(member_dir) as manager:
        try:
            meta = manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
            config, objective, special_tokens = _read_meta(meta, step_dir)
            model = nnx.eval_shape(lambda: EttinModel(config, objective, rngs=nnx.Rngs(0)))
            state = nnx.state(model, nnx.Param)
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nnx.to_pure_dict(state))))["params"]
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - damaged files: say which step and what to do
            damage = first_line(err, innermost=True)
        else:
            damage = None
        if damage is not None:
            forget_failed_reads()
            others = sorted(s for s in manager.all_steps() if s != step)
            raise CheckpointError(
                f"{step_dir} cannot be read ({damage}); use another step "
                f"({', '.join(map(str, others)) or 'none is left'}), e.g. its "
                f"{CHECKPOINTS}/<step> directory or --step, or rerun `ettin-jax train`, which "
                f"sets an unreadable checkpoint aside and resumes from the newest readable one"
            ) from None
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    tokenizer_dir = member_dir / TOKENIZER
    return RestoredWeights(model, special_tokens, tokenizer_dir if tokenizer_dir.is_dir() else None,
                           step, step_dir)


def read_objective(path: PathLike) -> Objective:
    """The objective of the model saved at `path` (a member or step directory, as
    `restore_weights` takes it), from its metadata alone. Raises CheckpointError as
    restore_weights does."""
    member_dir, step = _locate(storage.absolute(path), None)
    with _manager(member_dir) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
    return _read_meta(meta, member_dir / CHECKPOINTS / str(step))[1]


def restore_progress(member_dir: PathLike, step: int) -> dict:
    """The `progress` item of training checkpoint `step` (phase, tokens, data state); {} for a
    checkpoint written by `save_weights` (import, convert)."""
    member_dir = storage.absolute(member_dir)
    if not (member_dir / CHECKPOINTS / str(step) / "progress").is_dir():
        return {}
    with _manager(member_dir) as manager:
        return manager.restore(step, args=ocp.args.Composite(
            progress=ocp.args.JsonRestore()))["progress"]


def find_members(path: PathLike) -> dict[str, Path]:
    """The checkpoints under `path`: {"encoder": dir, "decoder": dir} for a run directory, or
    {"": path} for a member or step directory. Raises MissingCheckpointError, saying how to
    train one, when there are none."""
    path = storage.path(path)
    members = {name: path / name for name in MEMBERS if (path / name / CHECKPOINTS).is_dir()}
    if members:
        return members
    if (path / CHECKPOINTS).is_dir() or _is_step_dir(path):
        return {"": path}
    if not path.exists():
        raise MissingCheckpointError(f"{path} does not exist; {_train_first(path)}", path)
    raise MissingCheckpointError(
        f"{path}: no checkpoint here (expected a run directory with encoder/ or decoder/, a "
        f"directory with {CHECKPOINTS}/, or a step directory {CHECKPOINTS}/<step>); "
        f"{_train_first(path)}", path)


def has_checkpoints(run_dir: PathLike) -> bool:
    """Whether a member of RUN_DIR holds a complete checkpoint step (orbax's finalized steps:
    a started but never saved run has none)."""
    return any(ocp.path.step.checkpoint_steps(storage.path(run_dir) / member / CHECKPOINTS)
               for member in MEMBERS)


def _train_first(path: Path) -> str:
    """How to get checkpoints at `path`: the train command of its run directory."""
    from ettin_jax.training.run_dir import RECIPE_FILE

    run_dir = path.parent if path.name in MEMBERS else path
    recipe = run_dir / RECIPE_FILE
    return (f"train the pair first: `ettin-jax train "
            f"{recipe if recipe.is_file() else 'RECIPE'} --run-dir {run_dir}`")


def forget_failed_reads() -> None:
    """After a failed restore: orbax leaves the other reads of the damaged checkpoint as futures
    whose errors nobody retrieves, and asyncio logs each with a traceback whenever they are
    collected. Collects them now without that log: the damage has been reported, by name."""
    import gc
    import logging

    logger = logging.getLogger("asyncio")
    disabled, logger.disabled = logger.disabled, True
    try:
        gc.collect()
    finally:
        logger.disabled = disabled


def _manager(member_dir: Path, **options) -> ocp.CheckpointManager:
    """An orbax CheckpointManager of MEMBER_DIR/checkpoints, atomic where the directory is
    (`storage.checkpoint_options`)."""
    return ocp.CheckpointManager(member_dir / CHECKPOINTS, options=ocp.CheckpointManagerOptions(
        **options, **storage.checkpoint_options(member_dir)))


def _is_step_dir(path: Path) -> bool:
    return path.parent.name == CHECKPOINTS and path.name.isdigit() and path.is_dir()


def _locate(path: Path, step: int | None) -> tuple[Path, int]:
    """(member dir, step) for a member or step directory."""
    if _is_step_dir(path):
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path} is step {path.name}, not step {step}")
        member_dir, wanted = path.parent.parent, int(path.name)
    elif (path / CHECKPOINTS).is_dir():
        member_dir, wanted = path, step
    else:
        raise CheckpointError(f"{path}: not a checkpoint directory (no {CHECKPOINTS}/ inside)")
    with _manager(member_dir) as manager:
        steps = manager.all_steps()
    if not steps:
        raise MissingCheckpointError(f"{member_dir / CHECKPOINTS}: no complete checkpoint yet; "
                                     f"{_train_first(member_dir)}", member_dir)
    if wanted is None:
        return member_dir, max(steps)
    if wanted not in steps:
        raise CheckpointError(f"{member_dir / CHECKPOINTS}: no complete step {wanted}; "
                              f"complete steps: {sorted(steps)}")
    return member_dir, wanted


def _read_meta(meta: Any, step_dir: Path) -> tuple[ModelConfig, Objective, SpecialTokens]:
    source = str(step_dir / "meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {meta.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; written by another ettin-jax version?")
    if meta.get("objective") not in OBJECTIVES:
        raise CheckpointError(f"{source}: objective {meta.get('objective')!r} is not one of "
                              f"{', '.join(OBJECTIVES)}")
    try:
        config = dataclass_from_dict(ModelConfig, meta.get("model"), source=source, key="model")
        special_tokens = SpecialTokens(**meta.get("special_tokens", {}))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    return config, meta["objective"], special_tokens


@dataclasses.dataclass
class _PhaseEnds(preservation_policy.PreservationPolicy):
    """Keeps every step that ended a phase (marked by a PHASE_END file in its directory)."""

    directory: Path

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [(self.directory / str(c.step) / PHASE_END).is_file() for c in checkpoints]


class TrainCheckpointer:
    """Checkpoints of a training run of one member: async saves every `every_steps`, the last
    `keep` kept, every `keep_every`-th step and the last step of every phase kept forever,
    exact restore onto any mesh.

    Only complete steps are ever listed or restored (orbax finalizes a step by renaming it).
    """

    def __init__(self, member_dir: PathLike, config: CheckpointConfig):
        self.member_dir = storage.absolute(member_dir)
        policies = [preservation_policy.LatestN(config.keep),
                    _PhaseEnds(self.member_dir / CHECKPOINTS)]
        if config.keep_every:
            policies.append(preservation_policy.EveryNSteps(config.keep_every))
        self._manager = _manager(
            self.member_dir, enable_async_checkpointing=True, create=True,
            preservation_policy=preservation_policy.AnyPreservationPolicy(policies))

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            self.close()
        except StorageError as err:
            if kind is None:
                raise
            warnings.warn(str(err), stacklevel=2)  # the error that stops the run comes first

    def latest_step(self) -> int | None:
        """The latest complete step, or None."""
        return self._manager.latest_step()

    def restore_progress(self, step: int) -> dict:
        """The `progress` item of step `step` (phase, tokens, data state). Raises
        CheckpointError when the step holds weights only (`ettin-jax import`, `convert`)."""
        step_dir = self.member_dir / CHECKPOINTS / str(step)
        if (step_dir / "params").is_dir() and not (step_dir / "progress").is_dir():
            raise CheckpointError(f"{step_dir} holds weights only (written by ettin-jax import "
                                  f"or convert), not a training run to resume; start a run "
                                  f"from it with checkpoint.init_from={self.member_dir}")
        return self._manager.restore(step, args=ocp.args.Composite(
            progress=ocp.args.JsonRestore()))["progress"]

    def set_aside(self, step: int) -> Path:
        """Moves step `step` (found unreadable) out of the checkpoints to
        MEMBER_DIR/unreadable-checkpoints/<step> (or <step>-2, ... when that exists): never
        deleted, never resumed from or pruned. Every process calls it; process 0 moves.
        Returns where the step went."""
        source = self.member_dir / CHECKPOINTS / str(step)
        target = self.member_dir / UNREADABLE / str(step)
        copy = 1
        while target.exists():
            copy += 1
            target = target.with_name(f"{step}-{copy}")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.move_tree(source, target, first=COMMIT_FILE)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()
        return target

    def save(self, step: int, state: TrainState, *, meta: dict, progress: dict,
             recipe: dict) -> None:
        """Starts writing checkpoint `step` in the background (returns at once). Raises
        StorageError when this or the previous background write failed (the checkpoints
        written before stay complete and usable)."""
        counters = {"opt_state": state.opt_state, "step": state.step, "skipped": state.skipped,
                    "nonfinite_streak": state.nonfinite_streak}
        with self._failures(f"checkpoint {step}"):
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(counters), meta=ocp.args.JsonSave(meta),
                progress=ocp.args.JsonSave(progress), recipe=ocp.args.JsonSave(recipe)),
                force=True)

    @contextlib.contextmanager
    def _failures(self, what: str):
        """Turns a failed write into a StorageError that says what is intact and what to do."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - orbax, TensorStore and fsspec raise anything
            raise StorageError(
                f"{self.member_dir / CHECKPOINTS}: {what} could not be written "
                f"({first_line(err, innermost=True)}); every checkpoint completed before stays "
                f"intact (a step counts only once all of it is written): rerun the same "
                f"command once the storage answers and it resumes from the newest") from err

    def check_compatible(self, step: int, config: ModelConfig, objective: Objective) -> None:
        """Raises CheckpointError naming the differing fields when step `step` holds another
        architecture or objective than the run wants to resume with."""
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        saved, saved_objective, _ = _read_meta(meta, self.member_dir / CHECKPOINTS / str(step))
        where = self.member_dir / CHECKPOINTS / str(step)
        if saved_objective != objective:
            raise CheckpointError(f"{where} holds a {saved_objective} model, this run trains "
                                  f"{objective}")
        differ = model_differences(saved, config)
        if differ:
            raise CheckpointError(f"{where} holds another model shape: {', '.join(differ)}")

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict, dict]:
        """(state on `abstract`'s shardings, progress, recipe dict) of step `step`."""
        counters = {"opt_state": abstract.opt_state, "step": abstract.step,
                    "skipped": abstract.skipped, "nonfinite_streak": abstract.nonfinite_streak}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            train=ocp.args.StandardRestore(counters),
            progress=ocp.args.JsonRestore(), recipe=ocp.args.JsonRestore()))
        train, progress = restored["train"], restored["progress"]
        tokens = progress.get("phase_tokens", progress["tokens"])
        state = TrainState(step=train["step"], params=restored["params"],
                           opt_state=train["opt_state"], skipped=train["skipped"],
                           nonfinite_streak=train["nonfinite_streak"],
                           phase_tokens=placed_token_count(tokens,
                                                           abstract.phase_tokens.sharding))
        return state, progress, restored["recipe"]

    def mark_phase_end(self, step: int, phase: str) -> None:
        """Waits for step `step` to be written and marks it as the end of `phase`: it is kept
        forever (the next phase starts from it; a released intermediate model)."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            storage.write_text_atomically(self.member_dir / CHECKPOINTS / str(step) / PHASE_END,
                                          phase + "\n")

    def close(self) -> None:
        """Finishes pending saves and releases the manager. Raises StorageError when a pending
        save failed."""
        with self._failures("the last checkpoint"):
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()
