"""Moving weights between native checkpoints and HuggingFace directories, and across objectives:
what `ettin-jax export`, `import` and `convert` do."""

from __future__ import annotations

from etils.epath import Path

from ettin_jax import storage
from ettin_jax.errors import CheckpointError
from ettin_jax.hf.pretrained import (
    CONFIG_FILE,
    ExportReport,
    PretrainedModel,
    from_pretrained,
    save_pretrained,
)
from ettin_jax.models import with_objective

HF_DIR = "hf"  # where `export` puts a member's HuggingFace directory by default
from ettin_jax.training.checkpoint import (
    CHECKPOINTS,
    MEMBERS,
    find_members,
    restore_weights,
    save_weights,
)


def export_checkpoint(
    source: str | Path, out: str | Path | None = None, *, step: int | None = None
) -> dict[str, ExportReport]:
    """Exports the native checkpoint(s) at `source` as HuggingFace directories.

    A run directory gives OUT/encoder and OUT/decoder; a member or step directory gives OUT.
    Without `out`, each member goes to its own directory's `hf/` (RUN_DIR/encoder/hf, ...).
    Uses the latest complete step unless `step` is given. Returns {member name: report}.
    """
    reports = {}
    for name, member in find_members(source).items():
        restored = restore_weights(member, step=step)
        target = storage.path(out) / name if out is not None else _member_dir(member) / HF_DIR
        reports[name] = save_pretrained(
            restored.model, target, special_tokens=restored.special_tokens,
            tokenizer_dir=restored.tokenizer_dir,
        )
    return reports


def _member_dir(path: Path) -> Path:
    """The member directory of a member or step directory (MEMBER/checkpoints/<step>)."""
    path = storage.path(path)
    return path.parent.parent if path.parent.name == CHECKPOINTS else path


def import_pretrained(source: str | Path, out: str | Path) -> Path:
    """Imports a HuggingFace ModernBERT directory as a native checkpoint (step 0) in `out`,
    which training can start from. Returns the step directory."""
    pretrained = from_pretrained(source)
    return _save_native(pretrained, out)


def convert_objective(source: str | Path, out: str | Path, *, to: str) -> Path:
    """The other member of the pair from `source`'s weights (Ettin's cross-objective runs).

    `to` is "encoder" or "decoder". A HuggingFace directory gives a HuggingFace directory (the
    decoder's q/k/v projections become the encoder's fused Wqkv, lm_head becomes head, and
    back); a native checkpoint gives a native checkpoint. Returns `out`.
    """
    if to not in MEMBERS:
        raise ValueError(f"--to must be one of {', '.join(MEMBERS)}, got {to!r}")
    objective = MEMBERS[to]
    source = storage.path(source)
    if (source / CONFIG_FILE).is_file():
        pretrained = from_pretrained(source)
    else:
        restored = restore_weights(source)
        pretrained = PretrainedModel(restored.model, restored.special_tokens,
                                     restored.tokenizer_dir)
    if pretrained.objective == objective:
        raise CheckpointError(f"{source} already holds an {to} ({objective})")
    converted = PretrainedModel(with_objective(pretrained.model, objective),
                                pretrained.special_tokens, pretrained.tokenizer_dir)
    if (source / CONFIG_FILE).is_file():
        save_pretrained(converted, out)
    else:
        _save_native(converted, out)
    return storage.path(out)


def _save_native(pretrained: PretrainedModel, out: str | Path) -> Path:
    return save_weights(out, pretrained.model, special_tokens=pretrained.special_tokens,
                        tokenizer_dir=pretrained.tokenizer_dir)
