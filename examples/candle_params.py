"""What the two example benchmarks share: CANDLE-style parameters, generated data and
the one line a refusal prints.

Both scripts import it from their own directory; nothing here imports a framework.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import difflib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from candle_ckpt import CheckpointError


def read_config(path: str) -> dict[str, Any]:
    """The [Global_Params] section of a CANDLE parameter file, values as Python literals.

    Raises:
        ValueError: the file is missing or unreadable, has no [Global_Params], or a value
            is not a Python literal; the message names the file (and the key).
    """
    parser = configparser.ConfigParser()
    try:
        if not parser.read(path):
            raise ValueError(f"parameter file '{path}' not found")
    except configparser.Error as error:
        reason = " ".join(str(error).split())  # configparser's spans lines
        raise ValueError(f"parameter file '{path}' is not an INI file: {reason}") from None
    if not parser.has_section("Global_Params"):
        raise ValueError(f"parameter file '{path}' has no [Global_Params] section")
    config = {}
    for key, text in parser["Global_Params"].items():
        try:
            config[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(
                f"parameter file '{path}', key {key} = {text}: expected a Python literal "
                f"(strings are quoted: {key} = {text!r})"
            ) from None
    return config


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as `candle-ckpt`'s are:
    argparse prints the whole usage (every `--ckpt_*` flag) before the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args: Sequence[str] | None = None) -> argparse.Namespace:
        """As argparse's, but an unrecognized flag gets the nearest known one suggested."""
        namespace, extras = self.parse_known_args(args)
        if extras:
            flags = [flag for action in self._actions for flag in action.option_strings]
            near = [
                difflib.get_close_matches(extra.split("=")[0], flags, n=1)
                for extra in extras
                if extra.startswith("--")
            ]
            hint = next((f"; did you mean '{n[0]}'?" for n in near if n), "")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace


class _RefusedFileValue:
    """A parameter file's value that its flag refuses. It stands as the flag's default
    (--help shows it as written) and is reported, naming the file and the key, unless the
    command line gives the flag; argparse would report it as `argument --<key>`, sending
    the user to a command line that does not hold it."""

    def __init__(self, text: object, problem: str) -> None:
        self.text, self.problem = text, problem

    def __str__(self) -> str:
        return str(self.text)


def _refuse_bad_file_values(
    parser: argparse.ArgumentParser, config: dict[str, Any]
) -> dict[str, Any]:
    """`config` with each value its flag refuses replaced by a `_RefusedFileValue`.

    argparse converts a default only when it is a string; candle_ckpt's own flags check
    a value of any type (a `ckpt_keep_limit = -1`).
    """
    actions = {action.dest: action for action in parser._actions}
    checked = dict(config)
    for key, value in config.items():
        action = actions.get(key)
        if action is None or action.type is None or action.type is str:
            continue
        if not (isinstance(value, str) or key.startswith("ckpt_")):
            continue
        try:
            action.type(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            checked[key] = _RefusedFileValue(value, str(error))
    return checked


def initialize_parameters(
    description: str,
    default_config: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
    *,
    optimizer: str,
    seeded: str,
    not_from_config: Iterable[str] = (),
) -> dict[str, Any]:
    """gParameters: defaults < parameter file < command line, as in CANDLE.

    Args:
        description: the script's --help line.
        default_config: the parameter file read unless --config_file names another.
        add_arguments: adds the script's own flags to the parser, if any.
        argv: the command line (default: sys.argv[1:]).
        optimizer: the optimizer --learning_rate is for, in its help ("Adam").
        seeded: what --seed seeds, in its help ("the data, the weights and Dropout").
        not_from_config: keys of the parameter file to leave out (their defaults are
            then candle_ckpt's, or the command line's).
    """
    import candle_ckpt

    pre = OneLineParser(add_help=False)
    pre.add_argument(
        "--config_file",
        default=default_config,
        help="CANDLE parameter file ([Global_Params]) whose values replace "
        "the defaults below (default: %(default)s)",
    )
    config_file = pre.parse_known_args(argv)[0].config_file

    # Every "(default: ...)" shown by --help is the effective one: the parameter file's
    # values are set as the parser's defaults before the help is printed.
    parser = OneLineParser(description=description, parents=[pre])
    parser.add_argument(
        "--epochs", type=int, help="train up to this (1-based) epoch (default: %(default)s)"
    )
    parser.add_argument("--batch_size", type=int, help="(default: %(default)s)")
    parser.add_argument("--learning_rate", type=float, help=f"{optimizer}'s (default: %(default)s)")
    parser.add_argument(
        "--n_samples", type=int, help="number of generated training samples (default: %(default)s)"
    )
    parser.add_argument("--n_features", type=int, help="(default: %(default)s)")
    parser.add_argument(
        "--dense",
        type=ast.literal_eval,
        help="hidden layer sizes, e.g. [512,256] (default: %(default)s)",
    )
    parser.add_argument("--dropout", type=float, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, help=f"seeds {seeded} (default: %(default)s)")
    if add_arguments is not None:
        add_arguments(parser)
    candle_ckpt.ckpt_parser(parser)
    try:
        config = read_config(config_file)
    except ValueError as error:
        parser.error(str(error))
    for key in not_from_config:
        config.pop(key, None)
    parser.set_defaults(**_refuse_bad_file_values(parser, config))
    params = vars(parser.parse_args(argv))
    for key, value in params.items():
        if isinstance(value, _RefusedFileValue):
            parser.error(
                f"parameter file '{config_file}', key {key} = {value.text!r}: {value.problem}; "
                f"correct the file, or give --{key} on the command line"
            )
    return params


def regression_data(params: dict[str, Any]) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """((x, y), (x_val, y_val)) float32 numpy arrays of a deterministic regression
    problem: y = a smooth nonlinear function of x, plus noise; a quarter more for
    validation."""
    import numpy as np

    rng = np.random.default_rng(params["seed"])
    n, d = params["n_samples"], params["n_features"]
    x = rng.standard_normal((n + n // 4, d)).astype("float32")
    w = rng.standard_normal((d, 1)).astype("float32") / np.sqrt(d)
    y = (np.sin(x @ w) + 0.1 * rng.standard_normal((len(x), 1))).astype("float32")
    return (x[:n], y[:n]), (x[n:], y[n:])


def report_refusal(script: str, error: CheckpointError) -> int:
    """Print the `candle_ckpt.CheckpointError` `error` that stopped `script` (its path)
    as one line on stderr; return the script's exit status for it."""
    import candle_ckpt

    # the message names the path and the remedy; a traceback would bury it
    print(f"{os.path.basename(script)}: {type(error).__name__}: {error}", file=sys.stderr)
    return candle_ckpt.exit_status(error)
