"""What one config key may hold, read from its field's type, and the errors when it does not.

A field's annotation is the one statement of its own rules, read by the loader, by
``--help`` and by :meth:`JobConfig.validate` alike:

* the TOML type: ``bool``, ``int``, ``float``, ``str`` or a ``list`` of those;
* a fixed set of choices: ``Literal[...]``, built from the tuple that owns the values where
  one exists (``Literal[MASK_TYPES]``);
* a range or another one-key rule: ``Annotated[int, Range(min=1)]``,
  ``Annotated[str, Rule(...)]``.

Rules that relate several keys live in ``JobConfig.validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from torchtitan_lite.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The bounds of a number field: ``min`` / ``max`` include the bound, ``above`` /
    ``below`` exclude it. ``auto`` also allows -1, the "decide automatically" of keys whose
    docstring says what -1 takes."""

    min: float | None = None
    above: float | None = None
    max: float | None = None
    below: float | None = None
    auto: bool = False

    def allows(self, value: float) -> bool:
        if self.auto and value == -1:
            return True
        return not (
            (self.min is not None and value < self.min)
            or (self.above is not None and value <= self.above)
            or (self.max is not None and value > self.max)
            or (self.below is not None and value >= self.below)
        )

    def bounds(self, words: bool = True) -> str:
        """``at least 1`` (``≥ 1``), ``above 0`` (``> 0``), ``in [0, 1)``: the range without
        the -1."""
        if self.max is None and self.below is None:
            if self.min is not None:
                return f"at least {self.min:g}" if words else f"≥ {self.min:g}"
            return f"above {self.above:g}" if words else f"> {self.above:g}"
        low = f"[{self.min:g}" if self.min is not None else f"({self.above:g}"
        high = f"{self.max:g}]" if self.max is not None else f"{self.below:g})"
        return f"in {low}, {high}"

    def __str__(self) -> str:
        return f"-1 (automatic) or {self.bounds()}" if self.auto else self.bounds()


@dataclass(frozen=True)
class Rule:
    """A one-key rule that neither choices nor a range can say: ``ok(value)`` must hold, else
    the error reads "Config key 'k' is 'v'" followed by ``problem`` (what is wrong, then the
    fix). ``summary`` is what ``--help`` shows."""

    ok: Callable[[Any], bool]
    problem: str
    summary: str


def field_types(cls: type) -> dict[str, Any]:
    """Field name → annotation of a config dataclass (``Annotated`` kept), in order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp: Any) -> tuple[Any, tuple]:
    """(the type inside ``Annotated``, its rules)."""
    if typing.get_origin(tp) is Annotated:
        inner, *rules = typing.get_args(tp)
        return inner, tuple(rules)
    return tp, ()


def choices(tp: Any) -> tuple | None:
    """The values a ``Literal`` field allows; None for other fields."""
    inner, _ = _unwrap(tp)
    return typing.get_args(inner) if typing.get_origin(inner) is Literal else None


def base_type(tp: Any) -> Any:
    """The TOML type of a field: ``Annotated`` removed, a ``Literal`` of strings → ``str``."""
    inner, _ = _unwrap(tp)
    allowed = choices(inner)
    return type(allowed[0]) if allowed else inner


def type_name(tp: Any) -> str:
    tp = base_type(tp)
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}s"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def a_type_name(tp: Any) -> str:
    """``an integer``, ``a string``."""
    name = type_name(tp)
    return ("an " if name[0] in "aeiou" else "a ") + name


def example(tp: Any) -> str:
    """A valid TOML value of the field's type, for the fix in an error message."""
    allowed = choices(tp)
    if allowed:
        return f'"{allowed[0]}"'
    tp = base_type(tp)
    if typing.get_origin(tp) is list:
        return f"[{example(typing.get_args(tp)[0])}]"
    if dataclasses.is_dataclass(tp):
        first, first_tp = next(iter(field_types(tp).items()))
        return f"{{{first} = {example(first_tp)}}}"
    return {bool: "true", int: "8", float: "3e-4", str: '"text"'}[tp]


def describe(tp: Any) -> str:
    """What ``--help`` says a key takes: ``one of: causal, block_causal``, ``integer, at
    least 1``."""
    allowed = choices(tp)
    text = f"one of: {', '.join(str(a) for a in allowed)}" if allowed else type_name(tp)
    for rule in _unwrap(tp)[1]:
        text += f", {rule if isinstance(rule, Range) else rule.summary}"
    return text


def suggest(name: str, candidates: list[str]) -> str:
    """`` Did you mean 'x'?`` for a near miss, else nothing."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _place(where: str) -> str:
    """Where a value was set, for the middle of a sentence; nothing for a config built in code."""
    if not where:
        return ""
    return " on the command line" if where == "the command line" else f" in {where}"


def convert(dotted: str, value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against the field's TOML type; ints are accepted for floats (and
    returned as floats). ``where``: the file, "the command line", or "" for code."""
    field_tp, tp = tp, base_type(tp)
    ok: bool
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        ok = isinstance(value, list)
        if ok:
            return [convert(f"{dotted}[{i}]", v, elem, where) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        ok = isinstance(value, (dict, tp))
        if ok:
            return _table(dotted, value, tp, where)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(
                f"Config key '{dotted}'{_place(where)} expects a finite number but got "
                f"{value!r}: no setting here means anything at infinity or NaN. Fix: give a "
                f"finite value, e.g. {example(tp)}."
            )
        if ok:
            return float(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        # a number for a free-text key (selective_ac_option = 2): suggest the same value, quoted
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        quoted = number and tp is str and choices(field_tp) is None
        fix = f'"{value}"' if quoted else example(field_tp)
        raise ConfigError(
            f"Config key '{dotted}'{_place(where)} expects {a_type_name(tp)} but got {value!r} "
            f"({type(value).__name__}). Fix: write {a_type_name(tp)}, e.g. {fix}."
        )
    return value


def _table(dotted: str, value: Any, tp: type, where: str) -> Any:
    """A TOML table (``[[data.sources]]``) as the dataclass ``tp``: unknown keys refused,
    each key checked against its own type."""
    types = field_types(tp)
    items = dataclasses.asdict(value) if isinstance(value, tp) else value
    for key in items:
        if key not in types:
            raise ConfigError(
                f"Unknown config key '{dotted}.{key}'{_place(where)}."
                f"{suggest(key, list(types))} Fix: use only {', '.join(types)}."
            )
    for key, val in items.items():
        check_value(f"{dotted}.{key}", val, types[key], where)
    return tp(**{key: convert(f"{dotted}.{key}", v, types[key], where) for key, v in items.items()})


def check_value(dotted: str, value: Any, tp: Any, where: str = "") -> None:
    """Check one key's value against everything its type says: the TOML type, the choices of
    a ``Literal``, and the ``Range`` / ``Rule`` of an ``Annotated`` field."""
    value = convert(dotted, value, tp, where)
    allowed = choices(tp)
    if allowed is not None and value not in allowed:
        hint = suggest(value, [str(a) for a in allowed])
        raise ConfigError(
            f"Config key '{dotted}' is {value!r}{_place(where)}, which is not one of "
            f"{', '.join(repr(a) for a in allowed)}.{hint} Fix: set {dotted} to one of them."
        )
    for rule in _unwrap(tp)[1]:
        if isinstance(rule, Range) and not rule.allows(value):
            fix = f"{'-1 or ' if rule.auto else ''}a value {rule.bounds(words=False)}"
            raise ConfigError(
                f"Config key '{dotted}' must be {rule}, got {value}{_place(where)}. "
                f"Fix: set {dotted} to {fix}."
            )
        if isinstance(rule, Rule) and not rule.ok(value):
            raise ConfigError(f"Config key '{dotted}' is {value!r}{_place(where)}{rule.problem}")


def check_fields(config: Any, origins: Mapping[str, str] | None = None) -> None:
    """Check every key of a config (a dataclass of section dataclasses) against its type.

    ``origins``: dotted key → where its value was set (a file or "the command line"), named
    in the error; keys not in it hold a default or a value set in code."""
    for section, section_cls in field_types(type(config)).items():
        values = getattr(config, section)
        for key, tp in field_types(section_cls).items():
            dotted = f"{section}.{key}"
            check_value(dotted, getattr(values, key), tp, (origins or {}).get(dotted, ""))
