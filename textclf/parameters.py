"""A run parameter is declared once: a field of the config dataclasses (textclf/config.py) whose metadata holds its
help text, its per-mode preset if it has one, and the values it allows (a Range or choices).

Everything else is derived from that declaration: the click options of train, sweep and train_deepspeed
(entrypoints/common.py), the per-field checks of ``config.validate`` (:func:`check_fields`) and the MLproject
parameter blocks (scripts/mlproject.py, `make mlproject`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from textclf.errors import TextclfError


@dataclass(frozen=True)
class Range:
    """The numbers a parameter allows: from ``low`` (excluded when ``low_open``) up to ``high`` (excluded unless
    ``high_open`` is False); no ``high`` means no upper bound."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def requirement(self, integer: bool) -> str:
        """What a refusal says the value must be: ``in [0, 1)``, ``a positive integer``, ``positive``, ``>= 0``."""
        if self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low == 0 and self.low_open:
            return "a positive integer" if integer else "positive"
        return f"{'>' if self.low_open else '>='} {self.low:g}"

    def __str__(self) -> str:
        """Click's own notation for a range in --help: ``0<=x<1``, ``x>0``."""
        low = f"{self.low:g}{'<' if self.low_open else '<='}"
        if self.high is None:
            return f"x{'>' if self.low_open else '>='}{self.low:g}"
        return f"{low}x{'<' if self.high_open else '<='}{self.high:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1): dropouts, warmup


def param(default: Any, help: str, *, presets: dict[str, Any] | None = None, range: Range | None = None,
          choices: tuple[str, ...] = (), cli_type: type | None = None) -> Any:
    """A dataclass field that is a run parameter. ``presets`` (mode -> value) makes the default depend on the mode;
    ``cli_type`` reads the option as another type than the field's (the field's parser then explains a bad value)."""
    metadata = {"help": help, "presets": dict(presets or {}), "range": range, "choices": tuple(choices),
                "cli_type": cli_type}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Parameter:
    """One run parameter as declared: what the click options, the checks and MLproject are derived from."""

    name: str
    kind: type  # int, float, str or bool: the parsed value's type
    default: Any  # None: detected, no cap or "same as ..." (the help says which)
    presets: dict[str, Any]  # mode -> value; empty when the default does not depend on the mode
    help: str
    range: Range | None
    choices: tuple[str, ...]
    cli_type: type | None

    @property
    def follows_mode(self) -> bool:
        return bool(self.presets)


def parameters_of(section: type) -> list[Parameter]:
    """The parameters a config dataclass declares, in declaration order, those of nested sections in place."""
    hints = typing.get_type_hints(section)
    found: list[Parameter] = []
    for field in dataclasses.fields(section):
        kind = _value_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            found += parameters_of(kind)
        elif "help" in field.metadata:
            found.append(_parameter(field, kind))
    return found


def _parameter(field: dataclasses.Field, kind: type) -> Parameter:
    meta = field.metadata
    return Parameter(name=field.name, kind=kind, default=field.default, presets=meta["presets"], help=meta["help"],
                     range=meta["range"], choices=meta["choices"], cli_type=meta["cli_type"])


def _value_type(hint: Any) -> type:
    """``int | None`` -> int: None is the "not set" value, not a type of its own."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass (nested ones too) against its declared range or choices.

    Raises TextclfError with one line naming the parameter: ``warmup_ratio must be in [0, 1), got 1.0``,
    ``invalid head 'x': choose one of mlp, linear``. None (not set) passes."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_fields(value)
        elif value is not None:
            _check_value(field, value, integer=_value_type(hints[field.name]) is int)


def _check_value(field: dataclasses.Field, value: Any, integer: bool) -> None:
    choices, allowed = field.metadata.get("choices"), field.metadata.get("range")
    if choices and value not in choices:
        raise TextclfError(f"invalid {field.name} {value!r}: choose one of {', '.join(choices)}")
    if allowed is not None and value not in allowed:
        raise TextclfError(f"{field.name} must be {allowed.requirement(integer)}, got {value}")
