"""TOML loading with ``extends`` composition, dotted CLI overrides, strict keys and types.

Precedence: dataclass defaults < base files named by ``extends`` (in order) < the file itself <
command-line overrides (``--section.key VALUE`` or ``--section.key=VALUE``; a bare ``--flag``
sets a boolean to true). Every error is a :class:`ConfigError` naming the file, the full dotted
key, the offending value and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
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

from torchtitan_lite.config.job_config import JobConfig
from torchtitan_lite.errors import ConfigError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _sections() -> dict[str, type]:
    """Section name → section dataclass, in declaration order."""
    return _field_types(JobConfig)


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``training.steps``."""
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _field_types(cls)]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}s"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def _a(tp: Any) -> str:
    name = _type_name(tp)
    return ("an " if name[0] in "aeiou" else "a ") + name


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _resolve_key(dotted: str, where: str) -> tuple[str, str, Any]:
    """Check that ``section.key`` exists; return (section, key, type)."""
    sections = _sections()
    section, _, key = dotted.partition(".")
    if section not in sections:
        hint = _suggest(section, list(sections))
        if not hint and key:  # a known key in no section / the wrong section
            owners = [k for k in all_keys() if k.endswith("." + key)]
            hint = f" Did you mean '{owners[0]}'?" if owners else ""
        raise ConfigError(
            f"Unknown config section '{section}' (key '{dotted}') in {where}.{hint} Fix: use one "
            f"of the sections {', '.join(sections)}; `python train.py --help` lists every key."
        )
    types = _field_types(sections[section])
    if key not in types:
        owners = [k for k in all_keys() if k.endswith("." + key)]
        hint = f" Did you mean '{owners[0]}'?" if owners else _suggest(dotted, all_keys())
        raise ConfigError(
            f"Unknown config key '{dotted}' in {where}.{hint} Fix: correct or remove it; "
            f"`python train.py --help` lists every key of [{section}]."
        )
    return section, key, types[key]


def _check_value(dotted: str, value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against the field type (ints are accepted for floats)."""
    ok: bool
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        ok = isinstance(value, list)
        if ok:
            return [_check_value(f"{dotted}[{i}]", v, elem, where) for i, v in enumerate(value)]
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(
                f"Config key '{dotted}' in {where} expects a finite number but got {value!r}: "
                "no setting here means anything at infinity or NaN. Fix: give a finite value, "
                f"e.g. {_example(tp)}."
            )
        if ok:
            return float(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        # a number for a text key (selective_ac_option = 2): suggest the same value, quoted
        quoted = tp is str and isinstance(value, (int, float)) and not isinstance(value, bool)
        example = f'"{value}"' if quoted else _example(tp)
        raise ConfigError(
            f"Config key '{dotted}' in {where} expects {_a(tp)} but got {value!r} "
            f"({type(value).__name__}). Fix: write {_a(tp)}, e.g. {example}."
        )
    return value


def _example(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"[{_example(typing.get_args(tp)[0])}]"
    return {bool: "true", int: "8", float: "3e-4", str: '"text"'}[tp]


def _parse_cli_value(dotted: str, text: str, tp: Any) -> Any:
    """Convert a command-line string to the field type."""
    where = "the command line"
    try:
        if typing.get_origin(tp) is list:
            if text.strip().startswith("["):
                value = tomllib.loads(f"v = {text}")["v"]
            else:
                (elem,) = typing.get_args(tp)
                value = [_parse_cli_value(dotted, t.strip(), elem) for t in text.split(",") if t]
            return _check_value(dotted, value, tp, where)
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
            return _check_value(dotted, float(text), tp, where)
        return text
    except ConfigError:
        raise
    except (ValueError, tomllib.TOMLDecodeError):
        raise ConfigError(
            f"Config key '{dotted}' on the command line expects {_a(tp)} but got "
            f"{text!r}. Fix: pass {_a(tp)}, e.g. --{dotted} {_example(tp)}."
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
    if path is not None:
        tables, origins = _read_toml(Path(path), ())
        for section, table in tables.items():
            for key, value in table.items():
                dotted = f"{section}.{key}"
                where = str(origins[dotted])
                sec, name, tp = _resolve_key(dotted, where)
                setattr(getattr(config, sec), name, _check_value(dotted, value, tp, where))
    for dotted, text in _split_overrides(overrides or []):
        sec, name, tp = _resolve_key(dotted, "the command line")
        setattr(getattr(config, sec), name, _parse_cli_value(dotted, text, tp))
    config.validate()
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
    """Every section and key with its type, default and docstring."""
    defaults = JobConfig()
    lines = ["usage: train.py --config FILE [--section.key VALUE ...]", ""]
    for section, cls in _sections().items():
        lines.append(f"[{section}]")
        docs = field_docs(cls)
        for key, tp in _field_types(cls).items():
            default = _toml_value(getattr(getattr(defaults, section), key))
            lines.append(f"  --{section}.{key} ({_type_name(tp)}, default {default})")
            lines.append(f"      {docs.get(key, '')}")
        lines.append("")
    return "\n".join(lines)
