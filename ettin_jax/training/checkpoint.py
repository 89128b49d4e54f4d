"""Native checkpoints: orbax steps under a member directory, weights plus what they are.

    MEMBER_DIR/                     RUN_DIR/encoder, RUN_DIR/decoder, or `ettin-jax import --out`
      checkpoints/<step>/           one orbax CheckpointManager step, items:
        params/                       the model's parameters (nnx pure dict)
        meta/                         JSON: format version, objective, model config, special tokens
      tokenizer/                    tokenizer files (optional), shared by every step

Orbax writes each step to a temporary directory and renames it when complete, so a step that
was being written when the process died is never listed. Other items (optimizer state, data
iterator) sit next to `params` in the same step; weights-only restore reads `params` and `meta`
alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines.special_tokens import SpecialTokens
from data_pipelines.tokenizer_files import copy_tokenizer_files
from ettin_jax.config.loading import dataclass_from_dict, recipe_to_dict
from ettin_jax.errors import CheckpointError, ConfigError
from ettin_jax.models import EttinModel, ModelConfig
from ettin_jax.models.config import OBJECTIVES, Objective

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
FORMAT_VERSION = 1
MEMBERS: dict[str, Objective] = {"encoder": "mlm", "decoder": "clm"}


@dataclasses.dataclass(frozen=True)
class RestoredWeights:
    """A model restored from a native checkpoint, with what it needs to be used or exported."""

    model: EttinModel
    special_tokens: SpecialTokens
    tokenizer_dir: Path | None
    step: int
    step_dir: Path


def save_weights(
    member_dir: str | Path,
    model: EttinModel,
    *,
    special_tokens: SpecialTokens,
    tokenizer_dir: str | Path | None = None,
    step: int = 0,
) -> Path:
    """Writes `model`'s parameters as checkpoint `step` of `member_dir`; returns the step dir.

    Copies the tokenizer files of `tokenizer_dir` to MEMBER_DIR/tokenizer. Raises
    CheckpointError when the step already exists.
    """
    member_dir = Path(member_dir).absolute()
    meta = {
        "format_version": FORMAT_VERSION,
        "objective": model.objective,
        "model": recipe_to_dict(model.config),
        "special_tokens": special_tokens.as_dict(),
    }
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.CheckpointManager(member_dir / CHECKPOINTS) as manager:
        if step in manager.all_steps():
            raise CheckpointError(f"{member_dir / CHECKPOINTS / str(step)} already exists")
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), member_dir / TOKENIZER)
    return member_dir / CHECKPOINTS / str(step)


def restore_weights(path: str | Path, *, step: int | None = None) -> RestoredWeights:
    """The model saved at `path`: a member directory (latest complete step, or `step`) or one
    step directory (MEMBER_DIR/checkpoints/<step>).

    Raises CheckpointError when `path` holds no complete checkpoint, or its metadata is not
    one this version reads.
    """
    member_dir, step = _locate(Path(path).absolute(), step)
    step_dir = member_dir / CHECKPOINTS / str(step)
    with ocp.CheckpointManager(member_dir / CHECKPOINTS) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        config, objective, special_tokens = _read_meta(meta, step_dir)
        model = nnx.eval_shape(lambda: EttinModel(config, objective, rngs=nnx.Rngs(0)))
        state = nnx.state(model, nnx.Param)
        abstract = nnx.to_pure_dict(state)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    tokenizer_dir = member_dir / TOKENIZER
    return RestoredWeights(model, special_tokens, tokenizer_dir if tokenizer_dir.is_dir() else None,
                           step, step_dir)


def find_members(path: str | Path) -> dict[str, Path]:
    """The checkpoints under `path`: {"encoder": dir, "decoder": dir} for a run directory, or
    {"": path} for a member or step directory. Raises CheckpointError when there are none."""
    path = Path(path)
    members = {name: path / name for name in MEMBERS if (path / name / CHECKPOINTS).is_dir()}
    if members:
        return members
    if (path / CHECKPOINTS).is_dir() or _is_step_dir(path):
        return {"": path}
    raise CheckpointError(
        f"{path}: no checkpoint here (expected a run directory with encoder/ or decoder/, a "
        f"directory with {CHECKPOINTS}/, or a step directory {CHECKPOINTS}/<step>)")


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
    with ocp.CheckpointManager(member_dir / CHECKPOINTS) as manager:
        steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"{member_dir / CHECKPOINTS}: no complete checkpoint")
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
