"""The `--ckpt_*` parameters: one table, from which everything else is derived.

`PARAMETERS` defines each parameter once (type, default, allowed values, help).
`ckpt_parser` (argparse flags), `ckpt_defs` (CANDLE's list of dicts) and
`validate_params` (a whole gParameters dict, checked before anything is written) are
all generated from it, so a default or an allowed value can never disagree between
them. `param`, `ParamType` and `ParamRequired` keep CANDLE's call signature.

Example::

    parser = argparse.ArgumentParser()
    candle_ckpt.ckpt_parser(parser)
    settings = candle_ckpt.validate_params(vars(parser.parse_args()))
    settings["ckpt_keep_limit"]   # -> 1000000, an int

upstream CANDLE (candle_lib's `ckpt_parser`/`ckpt_defs` and `CandleCkpt`): every key it
reads is a row here, so a benchmark switched by its import keeps its parameters. Where
candle_lib's meaning differs from this table's, the table decides, once:

- `ckpt_directory`: None (candle_lib's default) means `<output_dir>/ckpts`; either
  layout is found (`core.format.locate`). `output_dir` is a row for that alone.
- `ckpt_keep_mode`: None (candle_lib's parser has no default) is "linear".
- `ckpt_checksum`, `ckpt_keep_limit`, `ckpt_save_weights_only`: candle_lib's parser
  gives False, 5 and False explicitly, and those values are honoured as given (this
  table's defaults, True and 1000000, apply only to absent keys).
- `ckpt_best_metric_last`: the best value of `ckpt_save_best_metric` before this run
  (infinite, candle_lib's initial value, is none);
  a run that resumes a checkpoint continues the checkpoint's own best (as candle_lib,
  whose restart overwrites it), a run that resumes nothing starts from it.
- `ckpt_timestamp_last`: accepted and not used: the time since the previous save is
  measured from the save times the tree records.
- `metadata`: stored in every ckpt-info.json, as in candle_lib.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ParameterTypeError, ParameterValueError
from .format.layout import DEFAULT_CKPT_DIRECTORY
from .run.walltime import check_end_time


class ParamType(enum.Enum):
    """The value types of gParameters, as in CANDLE."""

    STRING = "a string"
    BOOLEAN = "a boolean (true/false/yes/no/t/f/y/n/1/0, any case)"
    INTEGER = "an integer"
    INTEGER_NN = "an integer >= 0"
    INTEGER_GZ = "an integer > 0"
    FLOAT = "a number"
    FLOAT_NN = "a number >= 0"
    STEPS = "an integer >= 0 or 'auto'"


class ParamRequired:
    """Marks a parameter that has no default: the user must give it."""


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def str2bool(value: object) -> bool:
    """Parse a boolean the way CANDLE's `str2bool` does, in any case.

    Accepts a bool, or one of true/false/yes/no/t/f/y/n/1/0 as a string; raises
    ValueError for anything else.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"received {value!r}; expected one of {sorted(_TRUE | _FALSE)} (any case)")


@dataclass(frozen=True)
class Parameter:
    """One row of the parameter table.

    Args:
        name: the gParameters key; the argparse flag is `--<name>`.
        type: a `ParamType`.
        default: the value when absent; `ParamRequired()` when it must be given.
        help: one line for `--help`.
        allowed: the allowed values of a string parameter, or None.
        nullable: whether None is a valid value.
        flag: whether `ckpt_parser` adds it (False for keys the benchmark owns).
        check_form: for a value with a rule of its own (a string's syntax, a number's
            range), a callable that raises a ParameterValueError when the
            (type-checked) value does not follow it.
        from_upstream: for a value upstream CANDLE spells otherwise (None for
            "linear", math.inf for "no best yet"), a callable returning this table's
            spelling of a value (any other value unchanged), or None.
    """

    name: str
    type: ParamType
    default: object
    help: str
    allowed: tuple | None = None
    nullable: bool = False
    flag: bool = True
    check_form: Callable[[Any], None] | None = None
    from_upstream: Callable[[object], object] | None = None

    def check(self, value: object) -> Any:
        """Return `value` converted to this parameter's type, or raise."""
        if self.from_upstream is not None:
            value = self.from_upstream(value)
        result = _check_value(self.name, value, self.type, self.allowed, self.nullable)
        if self.check_form is not None and result is not None:
            self.check_form(result)
        return result

    def argparse_type(self, text: str) -> Any:
        """The `type=` callable of the argparse flag: same checks, argparse's error."""
        try:
            return self.check(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None


P = ParamType
PARAMETERS = (
    Parameter(
        "ckpt_restart_mode",
        P.STRING,
        "auto",
        "restart from ckpts/last: off, auto (if there is one) or required",
        allowed=("off", "auto", "required"),
    ),
    Parameter(
        "ckpt_checksum", P.BOOLEAN, True, "record the CRC32 of every file and verify it at restart"
    ),
    Parameter("ckpt_skip_epochs", P.INTEGER_NN, 0, "save nothing before this (1-based) epoch"),
    Parameter(
        "ckpt_directory",
        P.STRING,
        DEFAULT_CKPT_DIRECTORY,
        "the directory of ckpt.log and the checkpoint tree: the tree is the directory "
        "itself when it is named ckpts or holds epochs/ or last (upstream CANDLE's "
        "layout), else ckpt_directory/ckpts; None: output_dir/ckpts",
        nullable=True,
    ),
    Parameter(
        "ckpt_save_best",
        P.BOOLEAN,
        True,
        "save whenever ckpt_save_best_metric improves, and link ckpts/best to it",
    ),
    Parameter(
        "ckpt_save_best_metric",
        P.STRING,
        "val_loss",
        "the metric in the Keras logs that defines the best epoch",
    ),
    Parameter(
        "ckpt_best_metric_mode",
        P.STRING,
        "auto",
        "whether the best metric is the min or the max; auto infers it from the name",
        allowed=("auto", "min", "max"),
    ),
    Parameter(
        "ckpt_save_weights_only",
        P.BOOLEAN,
        False,
        "save the weights only, without the optimizer state (restart is then not exact)",
    ),
    Parameter(
        "ckpt_save_interval", P.INTEGER_NN, 1, "save every N epochs; 0 disables saving altogether"
    ),
    Parameter(
        "ckpt_keep_mode",
        P.STRING,
        "linear",
        "which of this run's epochs to keep: linear (the newest ckpt_keep_limit), "
        "exponential (one per doubling window) or all",
        allowed=("linear", "exponential", "all"),
        from_upstream=lambda value: "linear" if value is None else value,
    ),
    Parameter(
        "ckpt_keep_limit",
        P.INTEGER_GZ,
        1000000,
        "at most this many of this run's epochs are kept (plus last and best)",
    ),
    Parameter(
        "ckpt_restart_fallback",
        P.BOOLEAN,
        False,
        "if ckpts/last is corrupt, restart from the newest earlier epoch that "
        "verifies (logged loudly) instead of failing",
    ),
    Parameter(
        "ckpt_async",
        P.BOOLEAN,
        False,
        "the training thread only snapshots the state to host memory; a background "
        "thread writes it (one save in flight, one extra copy of the state in memory)",
    ),
    Parameter(
        "ckpt_save_steps",
        P.STEPS,
        0,
        "also save inside an epoch, every N training batches (a step checkpoint, "
        "resumed at that batch); auto: as often as ckpt_save_overhead allows, from the "
        "measured save and batch times; 0 is off",
    ),
    Parameter(
        "ckpt_save_overhead",
        P.FLOAT_NN,
        3.5,
        "with ckpt_save_steps auto: the share of training time, in percent, that "
        "step saves may cost",
        check_form=lambda value: _check_percent("ckpt_save_overhead", value),
    ),
    Parameter(
        "ckpt_signal",
        P.STRING,
        "off",
        "on this signal (Slurm --signal): stop at the end of the batch, make sure "
        "the last completed epoch is on disk (with ckpt_save_steps, save that batch), "
        "exit with status 75 (requeue)",
        allowed=("off", "USR1", "USR2", "TERM", "INT"),
    ),
    Parameter(
        "ckpt_walltime_margin",
        P.FLOAT_NN,
        0,
        "seconds kept free before the job's end: at an epoch end, stop (saving the "
        "last epoch, exit status 75) when the next epoch and a save would not end "
        "that long before it (with ckpt_save_steps: at a batch end, the next batch, "
        "saving that batch); 0 is off",
    ),
    Parameter(
        "ckpt_end_time",
        P.STRING,
        None,
        "the job's end for ckpt_walltime_margin: an ISO 8601 time (local unless it "
        "has an offset) or +DURATION from the start of training (+3600, +1:00:00); "
        "default: SLURM_JOB_END_TIME, else squeue under Slurm",
        nullable=True,
        check_form=check_end_time,
    ),
    Parameter(
        "ckpt_init_from",
        P.STRING,
        None,
        "warm start: when the run has no ckpts/last of its own, initialise the model "
        "weights (only) from this verified checkpoint: a checkpoint tree (its last), "
        "an epoch directory, or TREE:best, TREE:last, TREE:EPOCH",
        nullable=True,
    ),
    Parameter(
        "metadata",
        P.STRING,
        None,
        "free text stored in every ckpt-info.json (job id, machine, ...)",
        nullable=True,
    ),
    Parameter(
        "output_dir",
        P.STRING,
        None,
        "the benchmark's output directory: with ckpt_directory None the tree is "
        "output_dir/ckpts (upstream CANDLE's rule)",
        nullable=True,
        flag=False,
    ),
    Parameter(
        "ckpt_best_metric_last",
        P.FLOAT,
        None,
        "upstream CANDLE's best value of ckpt_save_best_metric before this run: a run "
        "that resumes no checkpoint starts its best-metric tracking from it (infinite: "
        "none yet)",
        nullable=True,
        from_upstream=lambda value: None if _is_infinite(value) else value,
        flag=False,
    ),
    Parameter(
        "ckpt_timestamp_last",
        P.STRING,
        None,
        "upstream CANDLE's time of the previous save: accepted, not used (the tree "
        "records its save times)",
        nullable=True,
        flag=False,
    ),
    Parameter(
        "epochs",
        P.INTEGER_NN,
        ParamRequired(),
        "the number of epochs of the run (the benchmark's own flag)",
        flag=False,
    ),
)
del P

PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}


def _is_infinite(value: object) -> bool:
    """Whether `value` is upstream CANDLE's "no best value yet", an infinite number."""
    try:
        return not isinstance(value, bool) and math.isinf(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _check_percent(key: str, value: float) -> None:
    if not 0 < value < 100:
        raise ParameterValueError(
            f"parameter '{key}': received {value!r}; expected a percentage of training "
            f"time > 0 and < 100, e.g. 3.5"
        )


def _what(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(
    key: str,
    value: object,
    type_: ParamType,
    allowed: Iterable[object] | None = None,
    nullable: bool = False,
) -> Any:
    if value is None:
        if nullable:
            return None
        raise ParameterTypeError(f"parameter '{key}': received None; expected {type_.value}")
    checker = _CHECKERS[type_]
    result = checker(key, value, type_)
    if allowed is not None and result not in allowed:
        raise ParameterValueError(
            f"parameter '{key}': received {value!r}; expected one of {list(allowed)}"
        )
    return result


def _check_string(key: str, value: object, type_: ParamType) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise ParameterTypeError(
            f"parameter '{key}': received {_what(value)}; expected {type_.value}"
        )
    return value


def _check_bool(key: str, value: object, type_: ParamType) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if not isinstance(value, str):
        raise ParameterTypeError(
            f"parameter '{key}': received {_what(value)}; expected {type_.value}"
        )
    try:
        return str2bool(value)
    except ValueError:
        raise ParameterValueError(
            f"parameter '{key}': received {value!r}; expected {type_.value}"
        ) from None


def _check_number(key: str, value: object, type_: ParamType) -> int | float:
    integral = type_ in (ParamType.INTEGER, ParamType.INTEGER_NN, ParamType.INTEGER_GZ)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterTypeError(
            f"parameter '{key}': received {_what(value)}; expected {type_.value}"
        )
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise ParameterValueError(
            f"parameter '{key}': received {value!r}; expected {type_.value}"
        ) from None
    if integral:
        if isinstance(number, float) and not number.is_integer():
            raise ParameterValueError(
                f"parameter '{key}': received {value!r}; expected {type_.value}"
            )
        number = int(number)
    if number != number or number in (float("inf"), float("-inf")):
        raise ParameterValueError(
            f"parameter '{key}': received {value!r}; expected a finite number"
        )
    if type_ in (ParamType.INTEGER_NN, ParamType.FLOAT_NN) and number < 0:
        raise ParameterValueError(f"parameter '{key}': received {value!r}; expected {type_.value}")
    if type_ is ParamType.INTEGER_GZ and number <= 0:
        raise ParameterValueError(f"parameter '{key}': received {value!r}; expected {type_.value}")
    return number


def _check_steps(key: str, value: object, type_: ParamType) -> int | str:
    """`ckpt_save_steps`: "auto" (any case), else an integer >= 0 (as a number or text);
    a value of another type (a bool, a list) is a ParameterTypeError."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return int(_check_number(key, value, ParamType.INTEGER_NN))
    except ParameterValueError:
        raise ParameterValueError(
            f"parameter '{key}': received {_what(value)}; expected {type_.value}"
        ) from None


_CHECKERS: dict[ParamType, Callable[[str, object, ParamType], object]] = {
    ParamType.STRING: _check_string,
    ParamType.BOOLEAN: _check_bool,
    ParamType.INTEGER: _check_number,
    ParamType.INTEGER_NN: _check_number,
    ParamType.INTEGER_GZ: _check_number,
    ParamType.FLOAT: _check_number,
    ParamType.FLOAT_NN: _check_number,
    ParamType.STEPS: _check_steps,
}


def param(
    gParameters: Mapping[str, Any],
    key: str,
    dflt: object,
    type_: ParamType = ParamType.STRING,
    allowed: Iterable[object] | None = None,
) -> Any:
    """Return gParameters[key] checked and converted, or `dflt` when absent (CANDLE's API).

    Args:
        gParameters: the parameter dict.
        key: the key to read.
        dflt: the default, or a `ParamRequired()` instance if the key must be present.
        type_: a `ParamType`.
        allowed: a collection of allowed values, or None.

    Raises:
        ParameterTypeError / ParameterValueError (a TypeError / ValueError) naming the
        key, the value received and what is allowed.
    """
    if key in gParameters:
        value = gParameters[key]
    elif isinstance(dflt, ParamRequired):
        raise ParameterValueError(f"parameter '{key}' is required but was not given")
    else:
        value = dflt
    return _check_value(key, value, type_, allowed, nullable=dflt is None)


def validate_params(gParameters: Mapping[str, Any], require_epochs: bool = False) -> dict[str, Any]:
    """Check every parameter of the table at once and return their values.

    Call it before writing anything. Unknown `ckpt_*` keys (usually typos) are
    errors, with the nearest known name suggested.

    Args:
        gParameters: a dict, e.g. `vars(parser.parse_args())` or CANDLE's gParameters.
        require_epochs: whether `epochs` must be present (the callback needs it).

    Returns:
        A dict with a checked value (or the default) for every parameter in the table;
        `epochs` is None when absent and not required.
    """
    unknown = [
        key for key in gParameters if key.startswith("ckpt_") and key not in PARAMETERS_BY_NAME
    ]
    if unknown:
        key = sorted(unknown)[0]
        near = difflib.get_close_matches(key, PARAMETERS_BY_NAME, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ParameterValueError(
            f"unknown parameter '{key}' (value {gParameters[key]!r})"
            f"{hint} known: {sorted(PARAMETERS_BY_NAME)}"
        )
    settings: dict[str, Any] = {}
    for parameter in PARAMETERS:
        if parameter.name in gParameters:
            value = gParameters[parameter.name]
        elif not isinstance(parameter.default, ParamRequired):
            value = parameter.default
        elif require_epochs:
            raise ParameterValueError(f"parameter '{parameter.name}' is required but was not given")
        else:
            settings[parameter.name] = None
            continue
        settings[parameter.name] = parameter.check(value)
    return settings


def ckpt_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add a `--<name>` flag for every parameter of the table to an argparse parser."""
    for parameter in PARAMETERS:
        if not parameter.flag:
            continue
        parser.add_argument(
            f"--{parameter.name}",
            type=parameter.argparse_type,
            default=parameter.default,
            choices=parameter.allowed,
            # %(default)s: the effective default, after a benchmark's
            # set_defaults (its parameter file), not the table's
            help=f"{parameter.help.replace('%', '%%')} (default: %(default)s)",
        )
    return parser


def ckpt_defs(defs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return `defs` (CANDLE's list of parameter dicts) plus one dict per parameter."""
    new_defs: list[dict[str, Any]] = []
    for parameter in PARAMETERS:
        if not parameter.flag:
            continue
        entry = {
            "name": parameter.name,
            "type": parameter.argparse_type,
            "default": parameter.default,
            "help": parameter.help,
        }
        if parameter.allowed is not None:
            entry["choices"] = list(parameter.allowed)
        new_defs.append(entry)
    return list(defs) + new_defs
