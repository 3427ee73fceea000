"""Options plumbing shared by every command: `opt()` fields, argparse from a dataclass, YAML < flags.

Each field carries its own help text, choices and --help group, so the YAML keys, the CLI flags and
`--help` come from one place and cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong; the message says which and why."""


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    flag: str | None = None,
    secret: bool = False,
    group: str | None = None,
) -> Any:
    """`secret`: left out of the config's repr, so a logged or raised config never shows credentials.
    `group`: the section of `--help` the flag is listed in (HELP_GROUPS)."""
    meta = {"help": help, "choices": choices, "flag": flag, "secret": secret, "group": group}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


# --help sections, in the order they are listed; fields without a group go under "options".
HELP_GROUPS = {
    "input": "input: what to read",
    "model": "model: which VAE, in which precision",
    "preprocessing": "preprocessing: image -> pixels",
    "latents": "latents: what is stored, in which convention",
    "output": "output: where and how the cache is written",
    "performance": "performance: batches, tiling, compilation",
    "cluster": "cluster: how many workers, with which resources",
}


# ---- building argparse from a dataclass, and merging YAML < flags ----------------------------


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _value_kind(tp: Any, value: Any) -> Any:
    """The union member a value is (`bool | list` takes YAML `true` or a list), else the base type."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    return next((m for m in members if m is not type(None) and type(value) is m), _base_type(tp))


def _json_arg(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}")
        return value

    parse.__name__ = f"JSON {kind.__name__}"
    return parse


def default_text(help_text: str, default: Any) -> str:
    """Every flag says its default, unless its help already explains it."""
    if "default" in help_text.lower() or help_text.startswith("Required."):
        return ""
    shown = (
        {None: "none", False: "off", True: "on"}.get(default, default)
        if isinstance(default, (bool, type(None)))
        else default
    )
    return f" (default: {json.dumps(shown) if isinstance(shown, (dict, list)) else shown})"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, in its --help group; defaults are suppressed so only typed flags override YAML."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    used = [g for g in HELP_GROUPS if any(f.metadata.get("group") == g for f in fields)]
    sections = {g: parser.add_argument_group(HELP_GROUPS[g]) for g in used}
    for f in fields:
        kind = _base_type(hints[f.name])
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata["help"] + default_text(f.metadata["help"], default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        section = sections.get(f.metadata.get("group"), parser)
        if kind is bool:
            section.add_argument(flag, action="store_true", **kwargs)
        elif kind in (dict, list):
            section.add_argument(flag, type=_json_arg(kind), **kwargs)
        else:
            section.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **kwargs)


def load_yaml(path: str) -> dict[str, Any]:
    """The YAML file as a mapping of option names; errors name the file and the line."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config {path}{_where(getattr(exc, 'problem_mark', None))}: not valid YAML: "
            f"{getattr(exc, 'problem', None) or exc}{_yaml_context(exc)}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _yaml_context(exc: yaml.YAMLError) -> str:
    """Where the construct the parser was in began, e.g. an unclosed [ two lines up."""
    context, mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    return f" ({context} started at{_where(mark).lstrip(',')})" if context and mark is not None else ""


def _where(mark: Any) -> str:
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def key_lines(path: str) -> dict[str, int]:
    """Line of each top-level key of a YAML mapping (for errors that point at it)."""
    node = yaml.compose(Path(path).read_text())
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value).replace("-", "_"): k.start_mark.line + 1 for k, _ in node.value}


def unknown_option(name: str, known: list[str], path: str | None, lines: dict[str, int]) -> ConfigError:
    where = f"config {path}, line {lines[name]}: " if path and name in lines else ""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
    return ConfigError(f"{where}unknown option {name.replace('_', '-')!r}{hint}")


def build_config(cls: type, flags: dict[str, Any]) -> Any:
    """Defaults < YAML (--config) < flags. Unknown YAML keys and wrong types are errors."""
    path = flags.get("config")
    values = load_yaml(path) if path else {}
    lines = key_lines(path) if values else {}
    from_yaml = set(values) - set(flags)
    values.update(flags)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(values) - set(known)):
        raise unknown_option(name, list(known), path, lines)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        try:
            check_value(name, value, _value_kind(hints[name], value), known[name].metadata.get("choices"))
        except ConfigError as exc:
            raise ConfigError(
                f"config {path}, line {lines.get(name, '?')}: {exc}" if name in from_yaml else str(exc)
            ) from None
    return cls(**values)


def check_value(name: str, value: Any, kind: type, choices: tuple | None) -> None:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{flag}: expected {kind.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(map(str, choices))}")


def public_dict(cfg: Any) -> dict[str, Any]:
    """The config as recorded in a manifest: storage options are left out (they may hold secrets)."""
    data = dataclasses.asdict(cfg)
    data.pop("storage_options", None)
    data.pop("config", None)
    return data
