"""Gin recipe files: bindings on the same dataclasses the YAML recipes fill.

    model.preset = 'tiny'
    train.steps = 20
    recipe.phases = [@pretrain/phase(), @decay/phase()]
    pretrain/phase.name = 'pretrain'
    pretrain/phase.steps = 10

Sections are bound by their recipe name (model, data, train, optimizer, schedule, mesh,
checkpoint, logging), phases through `recipe.phases` and the `phase` configurable. Gin
itself rejects unknown names (with file and line); types and values go through the same
validator as YAML. The configurables gin sees only collect their bindings into plain dicts
(with the dataclass's field names as their signature), so nothing is built or validated
before the shared validator runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import gin

from ettin_jax.config.schema import PhaseConfig, Recipe, SourceConfig
from ettin_jax.errors import ConfigError, did_you_mean

_SECTION_TYPES: dict[str, type] = typing.get_type_hints(Recipe)
_CONFIGURABLES: dict[str, type] = {
    **{name: tp for name, tp in _SECTION_TYPES.items() if dataclasses.is_dataclass(tp)},
    "recipe": Recipe,
    "phase": PhaseConfig,
    "source": SourceConfig,  # data.sources = [@web/source(), @code/source()]
}


def _binding_collector(cls: type) -> typing.Callable[..., dict[str, typing.Any]]:
    """A function gin can bind with `cls`'s field names; calling it returns the bound fields."""

    def collect(**fields: typing.Any) -> dict[str, typing.Any]:
        return fields

    collect.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for f in dataclasses.fields(cls)
    ])
    return collect


for _name, _cls in _CONFIGURABLES.items():
    gin.external_configurable(_binding_collector(_cls), name=_name)


def read_gin_file(path: Path) -> dict[str, typing.Any]:
    """The raw recipe tree bound by gin file `path`. Raises ConfigError with file and line."""
    gin.clear_config()
    try:
        gin.parse_config_file(str(path))
        raw: dict[str, typing.Any] = {}
        for name in _CONFIGURABLES:
            if name in ("recipe", "phase", "source"):
                continue
            bindings = gin.get_bindings(name)
            if bindings:
                raw[name] = dict(bindings)
        # `recipe.phases = [@a/phase(), ...]` (or `recipe.train = @train()`): references
        # evaluate to the dicts their collectors return.
        for name, value in gin.get_bindings("recipe").items():
            if name in raw:
                raise ConfigError(f"{path}: section {name!r} is bound both as recipe.{name} "
                                  f"and as {name}.*; use one")
            raw[name] = value
        return raw
    except (ValueError, SyntaxError) as err:
        raise ConfigError(f"{path}: {_with_hint(str(err))}") from None
    finally:
        gin.clear_config()


def gin_key_lines(text: str) -> dict[str, int]:
    """{dotted recipe key: 1-based line} of the bindings in gin text: `train.steps = 3` is
    "train.steps"; `pretrain/phase.train = {...}` is "phases.<i>.train" for the i-th phase
    listed in `recipe.phases`."""
    phase_scopes = re.findall(r"@(\w+)/phase\(\)", "".join(
        re.findall(r"recipe\.phases\s*=\s*\[[^\]]*\]", text)))
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        binding = re.match(r"\s*(?:(\w+)/)?(\w+)\.(\w+)\s*=", line)
        if not binding:
            continue
        scope, name, field = binding.groups()
        if name == "phase" and scope in phase_scopes:
            lines[f"phases.{phase_scopes.index(scope)}.{field}"] = number
        elif scope is None and name in _SECTION_TYPES:
            lines[f"{name}.{field}"] = number
        elif scope is None and name == "recipe":
            lines[field] = number
    return lines


def _with_hint(message: str) -> str:
    unknown_param = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", message)
    if unknown_param and unknown_param.group(1) in _CONFIGURABLES:
        fields = [f.name for f in dataclasses.fields(_CONFIGURABLES[unknown_param.group(1)])]
        return f"{message}\n{did_you_mean(unknown_param.group(2), fields).strip()} " \
               f"Valid keys: {', '.join(fields)}"
    unknown_name = re.search(r"No configurable matching '([\w/.]+)'", message)
    if unknown_name:
        name = unknown_name.group(1).split("/")[-1]
        return f"{message}\n{did_you_mean(name, _CONFIGURABLES).strip()} " \
               f"Valid sections: {', '.join(_CONFIGURABLES)}"
    return message
