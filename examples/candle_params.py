"""What the two example benchmarks share: CANDLE-style parameters, generated data and
the one line a refusal prints.

Both scripts import it from their own directory; nothing here imports a framework.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from candle_ckpt import CheckpointError


def read_config(path: str) -> dict[str, Any]:
    """The [Global_Params] section of a CANDLE parameter file, values as Python literals."""
    parser = configparser.ConfigParser()
    if not parser.read(path):
        raise FileNotFoundError(f"parameter file '{path}' not found")
    return {key: ast.literal_eval(value) for key, value in parser["Global_Params"].items()}


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

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(
        "--config_file",
        default=default_config,
        help="CANDLE parameter file ([Global_Params]) whose values replace "
        "the defaults below (default: %(default)s)",
    )
    config_file = pre.parse_known_args(argv)[0].config_file

    # Every "(default: ...)" shown by --help is the effective one: the parameter file's
    # values are set as the parser's defaults before the help is printed.
    parser = argparse.ArgumentParser(description=description, parents=[pre])
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
    config = read_config(config_file)
    for key in not_from_config:
        config.pop(key, None)
    parser.set_defaults(**config)
    return vars(parser.parse_args(argv))


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
