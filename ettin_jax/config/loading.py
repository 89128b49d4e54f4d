"""Recipe loading: a YAML or gin file, plus dotted key=value overrides, to a validated `Recipe`.

Every source becomes the same raw tree of plain values first; one validator then checks keys
(unknown -> "did you mean"), types and values, and reports the file (or the override) and the
dotted key path of the first problem as a `ConfigError`, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml
from etils import epath

from ettin_jax import storage
from ettin_jax.config.schema import MEMBERS, MemberChanges, PhaseConfig, Recipe, TrainConfig
from ettin_jax.errors import ConfigError, did_you_mean
from ettin_jax.models.config import ModelConfig
from ettin_jax.models.presets import PRESETS, get_preset

RawTree = dict[str, Any]


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants 1.0e-3) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-3 as a string; accept an exponent without a dot as a float too.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """A scalar or flow value as YAML reads it ("10" -> 10, "1e-3" -> 0.001, "[0, 3]" -> list)."""
    return yaml.load(text, Loader=_YamlLoader)


def load_recipe(path: storage.PathLike | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Loads a recipe from a YAML (.yaml/.yml) or gin (.gin) file, then applies overrides.

    Args:
      path: the recipe file; None starts from the defaults of every section.
      overrides: "dotted.key=value" strings, values parsed as YAML (phases.0.steps=5 indexes).
    Returns the validated Recipe. Raises ConfigError naming the file or override, the key path
    and the valid choices.
    """
    source = "<defaults>" if path is None else str(path)
    raw, lines = ({}, {}) if path is None else read_recipe_file(storage.path(path))
    return _build_with_overrides(raw, overrides, source, lines)


def override_recipe(recipe: Recipe, overrides: Sequence[str], *, source: str) -> Recipe:
    """`recipe` with dotted key=value overrides applied and validated as `load_recipe` does;
    `source` names where `recipe` came from in errors. Raises ConfigError."""
    return _build_with_overrides(recipe_to_dict(recipe), overrides, source, {})


def override_config(config: Any, overrides: Sequence[str], *, source: str) -> Any:
    """Any config dataclass instance (e.g. a fine-tuning config) with dotted key=value
    overrides applied and validated as recipe overrides are; `source` names where `config`
    came from in errors. Raises ConfigError."""
    return _build_with_overrides(recipe_to_dict(config), overrides, source, {},
                                 cls=type(config))


def _build_with_overrides(raw: RawTree, overrides: Sequence[str], source: str,
                          lines: Mapping[str, int], *, cls: type = Recipe) -> Any:
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = _parse_override(text)
        _set_path(raw, key, value, text)
        _clear_exclusive_sibling(raw, key)
        origins[key] = f"override {text!r}"
    return build_dataclass(cls, raw, key="", where=_Where(source, origins, lines))


def recipe_from_preset(name: str, overrides: Sequence[str] = ()) -> Recipe:
    """The default recipe around model preset `name` (with overrides). Raises ConfigError."""
    return load_recipe(None, [f"model.preset={name}", *overrides])


def dataclass_from_dict(cls: type, raw: Mapping[str, Any], *, source: str, key: str = "") -> Any:
    """Validated instance of config dataclass `cls` (e.g. ModelConfig) from a plain dict, as
    `recipe_to_dict` writes it. Raises ConfigError naming `source` and the key path."""
    return build_dataclass(cls, raw, key=key, where=_Where(source, {}))


def read_recipe_file(path: epath.Path) -> tuple[RawTree, dict[str, int]]:
    """The raw tree of a YAML or gin recipe file, and {dotted key: 1-based line} of the keys it
    sets (for error messages), from one read and one parse. Raises ConfigError for unreadable
    files."""
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    if path.suffix == ".gin":
        from ettin_jax.config.gin_files import gin_key_lines, read_gin_file

        with storage.local_copy(path) as local:  # gin reads local files only
            return read_gin_file(local), gin_key_lines(path.read_text())
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: unknown recipe format {path.suffix!r}; use .yaml, .yml or .gin")
    loader = _YamlLoader(path.read_text())
    try:
        node = loader.get_single_node()
        raw = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw, _yaml_key_lines(node)


def _yaml_key_lines(root: yaml.Node) -> dict[str, int]:
    """{dotted key: 1-based line} of every mapping key and list item under `root`."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = _join(prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[_join(prefix, str(i))] = item.start_mark.line + 1
                walk(item, _join(prefix, str(i)))

    walk(root, "")
    return lines


def recipe_to_dict(recipe: Any) -> RawTree:
    """Plain nested dict/list form of a recipe or one of its sections (what `load_recipe` and
    `dataclass_from_dict` read back to an equal one)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


# --- validation --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where a raw value came from: the file (with the line of the key or its closest parent
    when known), unless an override set the key or a parent."""

    source: str
    origins: Mapping[str, str]
    lines: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        for prefix in prefixes:
            if self.origins.get(prefix):
                return self.origins[prefix]
        line = next((self.lines[p] for p in prefixes if p in self.lines), None)
        source = self.source if line is None else f"{self.source}:{line}"
        # A section-level error may come from overrides of keys inside the section.
        inside = [o for k, o in self.origins.items() if not key or k.startswith(key + ".")]
        return " + ".join([source, *inside])

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self(key)}: {key or 'recipe'}: {message}")


def build_dataclass(cls: type, raw: Any, *, key: str, where: _Where, base: Any = None) -> Any:
    """Validated instance of dataclass `cls` from raw mapping `raw` at dotted `key`: the fields
    `raw` gives on top of `base` (an instance of `cls`; None: the defaults), nested sections
    likewise on top of `base`'s."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise where.error(key, f"expected a mapping of {_type_name(cls)} fields, got {_show(raw)}")
    if cls is Recipe and "phases" in raw:
        return _with_phases(raw, key=key, where=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            full = _join(key, str(name))
            raise ConfigError(
                f"{where(full)}: unknown key {full!r}.{did_you_mean(name, fields)} "
                f"Valid keys{' of ' + key if key else ''}: {', '.join(fields)}"
            )
    values = {
        name: _coerce(hints[name], value, key=_join(key, name), where=where,
                      base=None if base is None else getattr(base, name))
        for name, value in raw.items()
    }
    for first, second in getattr(cls, "EXCLUSIVE", ()):
        if values.get(first) is not None and values.get(second) is not None:
            raise where.error(_join(key, second), f"{first} and {second} are exclusive: set one "
                                                  f"(the other to null)")
        for name, other in ((first, second), (second, first)):
            if values.get(name) is not None and other not in values:
                values[other] = None  # the section sets `name`: an inherited `other` goes
    base = _base_instance(cls, values, key, where) or base
    if base is None:
        missing = [
            name for name, f in fields.items()
            if name not in values
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise where.error(key, f"missing required key(s): {', '.join(missing)}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ValueError as err:
        # Sections word their errors "<field> must ...": point at that field when it is one.
        field = str(err).split(" ", 1)[0]
        raise where.error(_join(key, field) if field in fields else key, str(err)) from None


def _with_phases(raw: Mapping[str, Any], *, key: str, where: _Where) -> Recipe:
    """A recipe whose phases are resolved: each phase's sections on top of the previous
    phase's, the first's on top of the top-level sections."""
    recipe = build_dataclass(Recipe, {k: v for k, v in raw.items() if k != "phases"}, key=key,
                             where=where)
    items = raw["phases"]
    if not isinstance(items, (list, tuple)):
        raise where.error("phases", f"expected a list of phases, got {_show(items)}")
    previous, phases = recipe.run_phases()[0], []
    for i, item in enumerate(items):
        if isinstance(item, Mapping) and "name" not in item:
            raise where.error(f"phases.{i}", "missing required key(s): name")
        # Sections carry over from the previous phase; what kind of phase it is and the
        # members' own changes do not.
        base = dataclasses.replace(previous, kind=None, optimizer_state="keep", encoder=None,
                                   decoder=None)
        shared = {k: v for k, v in item.items() if k not in MEMBERS} \
            if isinstance(item, Mapping) else item
        previous = build_dataclass(PhaseConfig, shared, key=f"phases.{i}", where=where,
                                   base=base)
        changes = {member: build_dataclass(MemberChanges, item[member],
                                           key=f"phases.{i}.{member}", where=where,
                                           base=MemberChanges(previous.model))
                   for member in MEMBERS if item.get(member) is not None}
        if changes:
            try:
                previous = dataclasses.replace(previous, **changes)
            except ValueError as err:
                raise where.error(f"phases.{i}", str(err)) from None
        phases.append(previous)
    try:
        return dataclasses.replace(recipe, phases=tuple(phases))
    except ValueError as err:
        raise where.error("phases", str(err)) from None


def _base_instance(cls: type, values: Mapping[str, Any], key: str, where: _Where) -> Any:
    """The instance explicit keys apply on top of: a model section starts from its preset."""
    if cls is ModelConfig and values.get("preset") is not None:
        try:
            return get_preset(values["preset"])
        except ValueError as err:
            raise where.error(_join(key, "preset"), str(err)) from None
    return None


def _coerce(tp: Any, value: Any, *, key: str, where: _Where, base: Any = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key=key, where=where, base=base)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        choices = [str(a) for a in args]
        raise where.error(
            key, f"invalid value {_show(value)}.{did_you_mean(str(value), choices)} "
                 f"Valid choices: {', '.join(choices)}"
        )
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise where.error(key, f"expected a list of {_type_name(args[0])}, got {_show(value)}")
        return tuple(
            _coerce(args[0], item, key=f"{key}.{i}", where=where) for i, item in enumerate(value)
        )
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key=key, where=where, base=base)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # token counts written as 3.0e9
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise where.error(key, f"expected {_type_name(tp)}, got {_show(value)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    return f"{kind} {value!r}" if value is not None else kind


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- overrides ---------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        return key, parse_yaml_value(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {err}") from None


def _clear_exclusive_sibling(raw: RawTree, key: str) -> None:
    """An override of one of an exclusive pair (TrainConfig.EXCLUSIVE) wins over the other in
    the same section of the file."""
    *parents, name = key.split(".")
    siblings = {a: b for pair in TrainConfig.EXCLUSIVE for a, b in (pair, pair[::-1])}
    if name not in siblings:
        return
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, dict) and siblings[name] in node:
        node[siblings[name]] = None


def _set_path(raw: RawTree, key: str, value: Any, text: str) -> None:
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {text!r}: {where} indexes a list of {len(node)} entries"
                )
            index: Any = int(part)
        elif isinstance(node, dict):
            if part.isdigit() and part not in node:
                raise ConfigError(f"override {text!r}: {where} indexes a list that is not there")
            index = part
        else:
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[index] = value
        else:
            if isinstance(node, dict) and node.get(index) is None:
                node[index] = {}
            node = node[index]


__all__ = [
    "PRESETS",
    "build_dataclass",
    "dataclass_from_dict",
    "load_recipe",
    "parse_yaml_value",
    "read_recipe_file",
    "recipe_from_preset",
    "recipe_to_dict",
    "recipe_to_yaml",
]
