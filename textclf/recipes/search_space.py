"""What a search varies: one dimension per training parameter, each checked against that parameter's own
declaration (its Range or choices in textclf/config.py) before any trial starts.

A space is written inline, dimensions separated by ``;`` (or newlines)::

    learning_rate=log(1e-5,1e-3); lora_r=choice(8,16,64); warmup_ratio=uniform(0,0.2); batch_size=uniform(4,16,4)

or as a YAML (or JSON) file mapping each parameter to the same text, to a list (the choices), or to
``{low: .., high: .., log: true, step: ..}``. ``log(low, high)`` samples on a log scale and ``uniform(low, high)``
on a linear one (with an optional step); whether the values are integers or floats comes from the parameter's
declaration (``lora_r`` is an integer, ``learning_rate`` a float); ``choice(a, b, ...)`` takes values of the
parameter's type (``mode=choice(full,lora)``, ``seed=choice(0,42,123)``, ``gradient_checkpointing=choice(true,false)``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textclf.config import build_config, run_parameters
from textclf.errors import TextclfError
from textclf.parameters import Parameter

# What a trial may not vary: the data its validation metric is measured on, the metric itself, and where and
# under which name runs are kept (the search decides those).
NOT_SEARCHABLE = {
    "dataset": "the data must be the same for every trial",
    "data_path": "the data must be the same for every trial",
    "text_column": "the data must be the same for every trial",
    "label_column": "the data must be the same for every trial",
    "max_eval_samples": "every trial must be validated on the same rows",
    "metric_for_best": "it is the objective",
    "evaluations": "the pruner compares trials by their k-th evaluation",
    "output_dir": "the search chooses each trial's folder",
    "run_name": "the search names each trial's run",
    "register": "trials never register; the best one is registered at the end",
    "resume": "a retried trial always resumes",
}

# The mode's default space: what usually matters, in ranges around the presets of the original project.
DEFAULT_SPACES = {
    "lora": "learning_rate=log(1e-4,2e-3); lora_r=choice(8,16,32,64); lora_alpha=choice(16,32,64); "
            "lora_dropout=uniform(0,0.2); warmup_ratio=uniform(0,0.2); weight_decay=uniform(0,0.1)",
    "full": "learning_rate=log(5e-6,1e-4); head_learning_rate=log(1e-5,1e-3); warmup_ratio=uniform(0,0.2); "
            "weight_decay=uniform(0,0.1); head_dropout=uniform(0,0.3)",
}
GRID_LIMIT = 10_000  # grid points: beyond this a grid is a typo, not a plan

_DIMENSION = re.compile(r"^\s*(log|uniform|choice)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``log`` or ``uniform`` between ``low`` and ``high`` (``step`` optional, linear
    only), or one of ``choices``. ``kind`` is the parameter's declared type."""

    name: str
    kind: type
    scale: str  # "log", "uniform" or "choice"
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value of this dimension for an Optuna trial (fixed already for a retried or enqueued trial)."""
        if self.scale == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.scale == "log")
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.scale == "log")

    def grid_values(self) -> list:
        """Every value, for the grid sampler. Raises TextclfError for a continuous dimension."""
        if self.scale == "choice":
            return list(self.choices)
        if self.kind is int and self.scale == "uniform":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise TextclfError(f"sampler grid needs every value listed: {self.name}={self} is continuous; "
                           "write it as choice(...)")

    def edges(self) -> list:
        """The values a trial can take that are most likely to break a rule: both ends, or every choice."""
        if self.scale == "choice":
            return list(self.choices)
        return [self.kind(self.low), self.kind(self.high)]

    def __str__(self) -> str:
        if self.scale == "choice":
            return "choice(" + ",".join(_show(v) for v in self.choices) + ")"
        step = f",{_show(self.kind(self.step))}" if self.step else ""
        return f"{self.scale}({_show(self.kind(self.low))},{_show(self.kind(self.high))}{step})"


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def suggest(self, trial) -> dict[str, Any]:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space. Raises TextclfError for a continuous dimension or a huge grid."""
        grid = {d.name: d.grid_values() for d in self.dimensions}
        size = math.prod(len(values) for values in grid.values())
        if size > GRID_LIMIT:
            raise TextclfError(f"the grid has {size} points (more than {GRID_LIMIT}): list fewer values")
        return grid

    def __str__(self) -> str:
        """The canonical inline form (what the study records and the parent run logs)."""
        return "; ".join(f"{d.name}={d}" for d in self.dimensions)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_space(text: str | None, mode: str) -> SearchSpace:
    """A space from inline text, from a YAML/JSON file named by ``text``, or the mode's default when empty.

    Raises TextclfError (one line) for an unreadable file, bad syntax, an unknown or unsearchable parameter, a
    range outside the parameter's declared range, or a choice it does not allow."""
    text = (text or "").strip()
    if not text:
        return _parse_inline(DEFAULT_SPACES[mode])
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or ("=" not in text and path.exists()):
        return _parse_file(path)
    return _parse_inline(text)


def _parse_inline(text: str) -> SearchSpace:
    entries = []
    for part in re.split(r"[;\n]", text):
        if not part.strip():
            continue
        name, equals, spec = part.partition("=")
        if not equals:
            raise TextclfError(f"space: {part.strip()!r} is not name=log(..)|uniform(..)|choice(..)")
        entries.append((name.strip(), spec.strip()))
    return _space(entries)


def _parse_file(path: Path) -> SearchSpace:
    if not path.is_file():
        raise TextclfError(f"space file {path} does not exist")
    import yaml  # JSON is YAML too

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TextclfError(f"space file {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise TextclfError(f"space file {path} must map parameter names to ranges, e.g. learning_rate: log(1e-5,1e-3)")
    return _space(list(data.items()), source=str(path))


def _space(entries: list[tuple[str, Any]], source: str = "space") -> SearchSpace:
    declared = {p.name: p for p in run_parameters()}
    dimensions, seen = [], set()
    for name, spec in entries:
        if name in seen:
            raise TextclfError(f"{source}: {name} appears twice")
        seen.add(name)
        if name in NOT_SEARCHABLE:
            raise TextclfError(f"{source}: {name} cannot be searched: {NOT_SEARCHABLE[name]}")
        if name not in declared:
            searchable = ", ".join(sorted(n for n in declared if n not in NOT_SEARCHABLE))
            raise TextclfError(f"{source}: unknown parameter {name!r}; searchable: {searchable}")
        dimensions.append(_dimension(declared[name], spec, source))
    if not dimensions:
        raise TextclfError(f"{source}: no parameter to search")
    return SearchSpace(tuple(dimensions))


def _dimension(parameter: Parameter, spec: Any, source: str) -> Dimension:
    name, kind = parameter.name, parameter.kind
    if isinstance(spec, list):
        scale, args = "choice", [str(v) if not isinstance(v, str) else v for v in spec]
        if kind is bool:
            args = [str(v).lower() for v in spec]
    elif isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or "low" not in spec or "high" not in spec:
            raise TextclfError(f"{source}: {name} needs low and high (and optionally log, step), got {sorted(spec)}")
        scale = "log" if spec.get("log") else "uniform"
        args = [str(spec["low"]), str(spec["high"])] + ([str(spec["step"])] if spec.get("step") is not None else [])
    else:
        match = _DIMENSION.match(str(spec))
        if match is None:
            raise TextclfError(f"{source}: {name}={spec} is not log(low,high), uniform(low,high[,step]) or choice(a,b,...)")
        scale = match.group(1)
        args = [a.strip().strip("'\"") for a in match.group(2).split(",") if a.strip()]
    if scale == "choice":
        return _choices(parameter, args, source)
    return _numeric(parameter, scale, args, source)


def _choices(parameter: Parameter, args: list[str], source: str) -> Dimension:
    name = parameter.name
    if not args:
        raise TextclfError(f"{source}: {name}=choice() lists no value")
    values = tuple(_value(parameter, arg, source) for arg in args)
    if len(set(values)) != len(values):
        raise TextclfError(f"{source}: {name}=choice(...) repeats a value")
    for value in values:
        _check_allowed(parameter, value, source)
    return Dimension(name, parameter.kind, "choice", choices=values)


def _numeric(parameter: Parameter, scale: str, args: list[str], source: str) -> Dimension:
    name, kind = parameter.name, parameter.kind
    if kind not in (int, float) or parameter.choices:
        raise TextclfError(f"{source}: {name} is not numeric: use choice(...)")
    if len(args) not in (2, 3) or (scale == "log" and len(args) == 3):
        raise TextclfError(f"{source}: {name}={scale}(...) takes low,high" + (",step" if scale == "uniform" else ""))
    low, high, *step = (_value(parameter, arg, source) for arg in args)
    if not low < high:
        raise TextclfError(f"{source}: {name}: low ({low}) must be below high ({high})")
    if scale == "log" and low <= 0:
        raise TextclfError(f"{source}: {name}=log(...) needs low > 0, got {low}")
    if step and (step <= 0 or (kind is float and not _divides(step[0], high - low))):
        raise TextclfError(f"{source}: {name}: step {step[0]} must be positive and divide high - low")
    for value in (low, high):
        _check_allowed(parameter, value, source)
    return Dimension(name, kind, scale, low=low, high=high, step=step[0] if step else None)


def _divides(step: float, width: float) -> bool:
    return abs(round(width / step) * step - width) < 1e-9 * max(1.0, width)


def _value(parameter: Parameter, text: str, source: str) -> Any:
    name, kind = parameter.name, parameter.kind
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            return float(text)
    except ValueError:
        raise TextclfError(f"{source}: {name}: {text!r} is not {'an integer' if kind is int else kind.__name__}") from None
    return text


def _check_allowed(parameter: Parameter, value: Any, source: str) -> None:
    """The parameter's declared choices and Range (what config.validate would refuse in the trial)."""
    if parameter.choices and value not in parameter.choices:
        raise TextclfError(f"{source}: invalid {parameter.name} {value!r}: choose among {', '.join(parameter.choices)}")
    if parameter.range is not None and value not in parameter.range:
        raise TextclfError(f"{source}: {parameter.name} must be {parameter.range.requirement(parameter.kind is int)}, "
                           f"got {_show(value)}")


def check_trial_configs(space: SearchSpace, mode: str, overrides: dict[str, Any]) -> None:
    """Build a trial's config at each edge of each dimension (the others at the search's own values), so that
    what only config.validate sees (save_steps a multiple of eval_steps, frozen_layers in mode full, a seed's
    range) is refused before any trial starts. Raises TextclfError naming the dimension and the value."""
    for dimension in space.dimensions:
        for value in dimension.edges():
            values = {**overrides, dimension.name: value}
            trial_mode = values.pop("mode", None) or mode
            try:
                build_config(mode=trial_mode, **values)
            except TextclfError as exc:
                raise TextclfError(f"space: {dimension.name}={_show(value)} cannot run: {exc}") from None


def describe(space: SearchSpace) -> str:
    """JSON of the space, one entry per parameter (the parent run's ``search/space.json``)."""
    return json.dumps({d.name: str(d) for d in space.dimensions}, indent=2)
