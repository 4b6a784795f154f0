"""What the two example benchmarks share: CANDLE-style parameters and generated data.

Both scripts import it from their own directory; nothing here imports a framework.
"""

from __future__ import annotations

import argparse
import ast
import configparser
from collections.abc import Callable, Sequence
from typing import Any


def read_config(path: str) -> dict[str, Any]:
    """The [Global_Params] section of a CANDLE parameter file, values as Python literals."""
    parser = configparser.ConfigParser()
    if not parser.read(path):
        raise FileNotFoundError(f"parameter file '{path}' not found")
    return {key: ast.literal_eval(value) for key, value in parser["Global_Params"].items()}


def initialize_parameters(description: str, default_config: str,
                          add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                          argv: Sequence[str] | None = None) -> dict[str, Any]:
    """gParameters: defaults < parameter file < command line, as in CANDLE.

    Args:
        description: the script's --help line.
        default_config: the parameter file read unless --config_file names another.
        add_arguments: adds the script's own flags to the parser, if any.
        argv: the command line (default: sys.argv[1:]).
    """
    import candle_ckpt

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", default=default_config)
    config_file = pre.parse_known_args(argv)[0].config_file

    parser = argparse.ArgumentParser(description=description, parents=[pre])
    parser.add_argument("--epochs", type=int, help="train up to this (1-based) epoch")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--n_samples", type=int, help="number of generated training samples")
    parser.add_argument("--n_features", type=int)
    parser.add_argument("--dense", type=ast.literal_eval, help="hidden layer sizes, e.g. [512,256]")
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--seed", type=int)
    if add_arguments is not None:
        add_arguments(parser)
    candle_ckpt.ckpt_parser(parser)
    parser.set_defaults(**read_config(config_file))
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
