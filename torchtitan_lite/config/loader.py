"""TOML loading with ``extends`` composition, dotted CLI overrides, strict keys and types.

Precedence: dataclass defaults < base files named by ``extends`` (in order) < the file itself <
command-line overrides (``--section.key VALUE`` or ``--section.key=VALUE``; a bare ``--flag``
sets a boolean to true). Every error is a :class:`ConfigError` naming the file, the full dotted
key, the offending value and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from torchtitan_lite.config.fields import (
    a_type_name,
    base_type,
    convert,
    describe,
    example,
    field_types,
    suggest,
)
from torchtitan_lite.config.job_config import JobConfig
from torchtitan_lite.errors import ConfigError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _sections() -> dict[str, type]:
    """Section name → section dataclass, in declaration order."""
    return field_types(JobConfig)


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``training.steps``."""
    return [f"{s}.{k}" for s, cls in _sections().items() for k in field_types(cls)]


def _resolve_key(dotted: str, where: str) -> tuple[str, str, Any]:
    """Check that ``section.key`` exists; return (section, key, type)."""
    sections = _sections()
    section, _, key = dotted.partition(".")
    if section not in sections:
        hint = suggest(section, list(sections))
        if not hint and key:  # a known key in no section / the wrong section
            owners = [k for k in all_keys() if k.endswith("." + key)]
            hint = f" Did you mean '{owners[0]}'?" if owners else ""
        raise ConfigError(
            f"Unknown config section '{section}' (key '{dotted}') in {where}.{hint} Fix: use one "
            f"of the sections {', '.join(sections)}; `python train.py --help` lists every key."
        )
    types = field_types(sections[section])
    if key not in types:
        owners = [k for k in all_keys() if k.endswith("." + key)]
        hint = f" Did you mean '{owners[0]}'?" if owners else suggest(dotted, all_keys())
        raise ConfigError(
            f"Unknown config key '{dotted}' in {where}.{hint} Fix: correct or remove it; "
            f"`python train.py --help` lists every key of [{section}]."
        )
    return section, key, types[key]


def _parse_cli_value(dotted: str, text: str, tp: Any) -> Any:
    """Convert a command-line string to the field's TOML type (its choices and range are
    checked with the whole config, by :func:`check_fields`)."""
    where = "the command line"
    tp = base_type(tp)
    try:
        if typing.get_origin(tp) is list:
            if text.strip().startswith("["):
                value = tomllib.loads(f"v = {text}")["v"]
            else:
                (elem,) = typing.get_args(tp)
                value = [_parse_cli_value(dotted, t.strip(), elem) for t in text.split(",") if t]
            return convert(dotted, value, tp, where)
        if tp is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return convert(dotted, float(text), tp, where)
        return text
    except ConfigError:
        raise
    except (ValueError, tomllib.TOMLDecodeError):
        raise ConfigError(
            f"Config key '{dotted}' on the command line expects {a_type_name(tp)} but got "
            f"{text!r}. Fix: pass {a_type_name(tp)}, e.g. --{dotted} {example(tp)}."
        ) from None


def _read_toml(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, Path]]:
    """Read ``path`` and the files it extends; return merged tables and each key's file."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(
            f"Config files extend each other in a cycle: {cycle}. Fix: remove one "
            "of these `extends` lines."
        )
    if not path.is_file():
        parent = f" (named by `extends` in {chain[-1]})" if chain else ""
        raise ConfigError(
            f"Config file {path} does not exist{parent}. Fix: check the path; "
            "relative `extends` paths are taken from the extending file's folder."
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"Config file {path} is not valid TOML: {e}. Fix the syntax there."
        ) from None

    merged: dict[str, dict] = {}
    origins: dict[str, Path] = {}
    bases = data.pop("extends", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"'extends' in {path} must be a file path or a list of paths, got "
            f'{bases!r}. Fix: write extends = "base.toml".'
        )
    for base in bases:
        base_data, base_origins = _read_toml(path.parent / base, (*chain, path))
        for section, table in base_data.items():
            merged.setdefault(section, {}).update(table)
        origins.update(base_origins)

    for section, table in data.items():
        if not isinstance(table, dict):
            owners = [k for k in all_keys() if k.endswith("." + section)]
            hint = f" Did you mean '{owners[0]}'?" if owners else ""
            raise ConfigError(
                f"Top-level key '{section}' in {path} is not inside a [section].{hint} Fix: move "
                "it under its section header; `python train.py --help` lists every key."
            )
        for key, value in table.items():
            merged.setdefault(section, {})[key] = value
            origins[f"{section}.{key}"] = path
    return merged, origins


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a validated JobConfig from a TOML file (or defaults) and CLI overrides."""
    config = JobConfig()
    origins: dict[str, str] = {}  # dotted key → where its value was set, for the errors
    if path is not None:
        tables, files = _read_toml(Path(path), ())
        for section, table in tables.items():
            for key, value in table.items():
                dotted = f"{section}.{key}"
                origins[dotted] = where = str(files[dotted])
                sec, name, tp = _resolve_key(dotted, where)
                setattr(getattr(config, sec), name, convert(dotted, value, tp, where))
    for dotted, text in _split_overrides(overrides or []):
        sec, name, tp = _resolve_key(dotted, "the command line")
        setattr(getattr(config, sec), name, _parse_cli_value(dotted, text, tp))
        origins[dotted] = "the command line"
    # The choices and ranges of the final values (a file's value may be overridden), each
    # error naming where its value came from, then the rules that relate several keys.
    config.validate(origins=origins)
    return config


def _split_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``['--a.b', '1', '--c.d=x', '--e']`` → ``[('a.b', '1'), ('c.d', 'x'), ('e', 'true')]``."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"Unexpected command-line argument {arg!r}. Fix: pass overrides as "
                "--section.key VALUE or --section.key=VALUE."
            )
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag; only valid for booleans (checked on conversion)
        out.append((name, value))
        i += 1
    return out


def parse_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """Split ``train.py`` arguments into (config path, overrides, help requested)."""
    path: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return path, rest, True
        if arg in ("--config", "--job.config_file"):
            if i + 1 >= len(argv):
                raise ConfigError(
                    f"{arg} needs a file path. Fix: --config train_configs/debug_model.toml."
                )
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith(("--config=", "--job.config_file=")):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest, False


# ---------------------------------------------------------------- writing and help


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # a table in a list ([[data.sources]]), written inline
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: JobConfig) -> str:
    """The full resolved config as TOML that :func:`load_config` reads back to an equal value."""
    lines: list[str] = []
    for section in _sections():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def field_docs(section_cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field) of a config dataclass."""
    tree = ast.parse(inspect.getsource(section_cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def help_text() -> str:
    """Every section and key with what it takes (type, choices, range), default and docstring."""
    defaults = JobConfig()
    lines = ["usage: train.py --config FILE [--section.key VALUE ...]", ""]
    for section, cls in _sections().items():
        lines.append(f"[{section}]")
        docs = field_docs(cls)
        for key, tp in field_types(cls).items():
            default = _toml_value(getattr(getattr(defaults, section), key))
            lines.append(f"  --{section}.{key} ({describe(tp)}; default {default})")
            lines.append(f"      {docs.get(key, '')}")
        lines.append("")
    return "\n".join(lines)
