"""The `ettin-jax` command line: subcommands that call the library and nothing more."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ettin_jax.config import Recipe, load_recipe, recipe_from_preset, recipe_to_yaml
from ettin_jax.errors import ConfigError
from ettin_jax.models.presets import PRESETS


def _recipe_or_preset(spec: str, overrides: Sequence[str]) -> Recipe:
    """A recipe file path, or a model preset name wrapped in the default recipe."""
    if spec in PRESETS or not Path(spec).suffix:
        return recipe_from_preset(spec, overrides)
    return load_recipe(spec, overrides)


def _describe(args: argparse.Namespace) -> int:
    from ettin_jax.models.describe import describe_pair, format_description

    recipe = _recipe_or_preset(args.recipe, args.overrides)
    report = describe_pair(
        recipe.model, seq_len=recipe.train.seq_len, mlm_mask_ratio=recipe.data.mlm_mask_ratio
    )
    print(json.dumps(report, indent=2) if args.json else format_description(report))
    return 0


def _recipe(args: argparse.Namespace) -> int:
    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ettin-jax",
        description="Train paired masked-LM encoders and causal-LM decoders (Ettin) in JAX.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    describe = commands.add_parser(
        "describe",
        help="parameter counts and training FLOPs of the encoder and decoder",
        description="Parameter counts (total and non-embedding, from jax.eval_shape: no weights "
        "are allocated) and training FLOPs per token for both members of a pair.",
    )
    describe.add_argument("recipe", metavar="PRESET_OR_RECIPE",
                          help=f"a recipe file (.yaml/.gin) or a preset: {', '.join(PRESETS)}")
    describe.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    describe.add_argument("--json", action="store_true", help="print one JSON object")
    describe.set_defaults(run=_describe)

    recipe = commands.add_parser(
        "recipe",
        help="validate a recipe and print it fully resolved",
        description="Load a recipe (.yaml or .gin) with overrides, validate every key, type and "
        "value, and print the resolved recipe as YAML.",
    )
    recipe.add_argument("recipe", metavar="RECIPE", help="a recipe file (.yaml/.gin)")
    recipe.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    recipe.set_defaults(run=_recipe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (2 for a bad recipe or arguments)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"ettin-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
