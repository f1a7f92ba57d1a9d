"""Reading a config: a YAML file (safe loader only), dotted `section.key=value` overrides on top,
then typed sections built and checked; and writing the resolved config back out."""

from __future__ import annotations

import dataclasses
import os
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import UserError
from .checks import coerce, nearest, validate
from .schema import FREE_FORM_SECTIONS, REQUIRED_KEYS, Config

FLOAT_TAG, INT_TAG, TIMESTAMP_TAG = "tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers and no dates.

    PyYAML follows YAML 1.1, where a float needs a dot: `3e-4` and `1e-1` load as strings, in
    typed keys, lists (`optim.betas`) and the model/data factory arguments alike; and where a
    leading zero means octal (`010` is 8, while `09` is text) and `1:30` is 90 (base 60). Here an
    integer is decimal unless it says `0o`/`0x`/`0b`, and `1:30` is text. Dates
    (`2024-01-01`) stay text: no config key is a date, and an output folder may be named like one.
    A key given twice in one mapping is an error (YAML requires unique keys; PyYAML would keep the
    last silently, so a second `train:` section would drop the first one's keys).
    """

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError) as err:  # a tag's constructor refused the value
            raise yaml.constructor.ConstructorError(  # (`!!float abc`, `!!int 1e5`): line and column, one line
                None,
                None,
                f"cannot read {node.value!r} as {node.tag.replace('tag:yaml.org,2002:', '!!')} ({err})",
                node.start_mark,
            ) from None

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):  # `!!map [1]`, `!!set [1]`: PyYAML's own error says so
            return super().construct_mapping(node, deep=deep)
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys written beside it override the merged ones
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: PyYAML's own check says so
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (FLOAT_TAG, INT_TAG, TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YAML12_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*|0b[01][01_]*)$")
YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
ConfigLoader.add_implicit_resolver(INT_TAG, YAML12_INT, list("-+0123456789"))
ConfigLoader.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))


def _construct_int(loader: ConfigLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16, "0b": 2}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


ConfigLoader.add_constructor(INT_TAG, _construct_int)


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that also quotes text ConfigLoader would read as a number (`1e-4`, `09`), so a
    written config.yaml loads back as the same config (YAML 1.1 writes such text plain)."""


ConfigDumper.add_implicit_resolver(INT_TAG, YAML12_INT, list("-+0123456789"))
ConfigDumper.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"section `{section}` must be a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    if section in FREE_FORM_SECTIONS:  # typed keys (`name`, `model.init`, ...) are not factory arguments
        typed = set(names) - {"kwargs"}
        values["kwargs"] = {k: v for k, v in raw.items() if k not in typed}
        raw = {k: v for k, v in raw.items() if k in typed}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"unknown key `{section}.{key}`{nearest(str(key), names, prefix=f'{section}.')}")
        if value is None and f"{section}.{key}" in REQUIRED_KEYS:
            continue  # a required key left empty: validate() says it is required
        values[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**values)


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise UserError("the config file must hold a mapping of sections (run:, model:, data:, train:, ...)")
    hints = get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    for name in raw:
        if name not in sections:
            raise UserError(f"unknown section `{name}`{nearest(str(name), sections)}")
    cfg = Config(**{name: _build_section(hints[name], raw.get(name), name) for name in sections})
    _expand_home(cfg)
    validate(cfg)
    return cfg


def _expand_home(cfg: Config) -> None:
    """`~` at the start of the run's own paths is the home folder, as in `data.files` (no shell
    expands it in a YAML file or in `run.output_dir=~/...`: the run wrote into a folder named `~`)."""
    if isinstance(cfg.run.output_dir, str):
        cfg.run.output_dir = os.path.expanduser(cfg.run.output_dir)
    if isinstance(cfg.checkpoint.resume, str) and cfg.checkpoint.resume not in ("auto", "never"):
        cfg.checkpoint.resume = os.path.expanduser(cfg.checkpoint.resume)


def _yaml_error(err: yaml.YAMLError, source: str) -> UserError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if "python/" in str(err):
        problem = "Python object tags (!!python/...) are not allowed in configs"
    return UserError(f"{source}: malformed YAML{where}: {problem}")


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings to (path, value) pairs; values are YAML scalars (safe loader), except
    that a text key (`run.output_dir=007`, `run.output_dir=no`) keeps a number's or a boolean's spelling."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} must look like `section.key=value` (e.g. train.lr=3e-4)")
        try:
            value = load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise _yaml_error(err, f"override {item!r}") from None
        path = key.split(".")
        if isinstance(value, (bool, int, float)) and _text_key(path):  # no text key takes a number or bool
            value = text.strip()
        parsed.append((path, value))
    return parsed


def _text_key(path: list[str]) -> bool:
    """Whether `section.key` is a typed key that holds text (a path or a name)."""
    sections = get_type_hints(Config)
    if len(path) != 2 or path[0] not in sections:
        return False
    hint = get_type_hints(sections[path[0]]).get(path[1])
    return hint is str or (get_origin(hint) in (Union, types.UnionType) and str in get_args(hint))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        if len(path) < 2:
            raise UserError(f"override `{'.'.join(path)}` must name a key inside a section, like `train.lr=3e-4`")
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override `{'.'.join(path)}`: `{part}` is not a mapping")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (safe loader only), apply dotted overrides, build and validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path} (check the path given to --config)") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: pass a YAML file to --config") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise _yaml_error(err, str(path)) from None
    if raw is None:  # an empty file (or only comments): every key at its default
        raw = {}
    if not isinstance(raw, dict):  # `false`, `[]`, `0` too: they are no empty config
        raise UserError(f"{path}: the config must be a mapping of sections (run:, model:, data:, train:, ...)")
    return from_dict(apply_overrides(raw, overrides or []))


def to_dict(cfg: Config) -> dict:
    """The resolved config as a plain nested dict (model/data kwargs flattened back)."""
    out = dataclasses.asdict(cfg)
    for section in FREE_FORM_SECTIONS:
        kwargs = out[section].pop("kwargs")
        out[section].update(kwargs)
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=ConfigDumper, sort_keys=False)
