"""Parameters: one table; every bad value names the key, the value and what is allowed."""

import argparse

import pytest

import candle_ckpt
from candle_ckpt.core.params import PARAMETERS, PARAMETERS_BY_NAME, validate_params

BAD_VALUES = {
    "ckpt_restart_mode": [("sometimes", ValueError), (1, TypeError)],
    "ckpt_checksum": [("maybe", ValueError), (2, TypeError), (1.5, TypeError)],
    "ckpt_skip_epochs": [
        (-1, ValueError),
        ("two", ValueError),
        (1.5, ValueError),
        (True, TypeError),
    ],
    "ckpt_directory": [(42, TypeError)],
    "ckpt_save_best": [("nope", ValueError), ([], TypeError)],
    "ckpt_save_best_metric": [(3, TypeError)],
    "ckpt_best_metric_mode": [("up", ValueError), ("MIN", ValueError)],
    "ckpt_signal": [("HUP", ValueError), ("SIGUSR1", ValueError), (10, TypeError)],
    "ckpt_save_weights_only": [("2", ValueError)],
    "ckpt_save_interval": [(-3, ValueError), ("x", ValueError)],
    "ckpt_save_steps": [
        (-1, ValueError),
        ("often", ValueError),
        (2.5, ValueError),
        ("-4", ValueError),
        (True, TypeError),
        ([5], TypeError),
    ],
    "ckpt_save_overhead": [(0, ValueError), (100, ValueError), (-1, ValueError), ("x", ValueError)],
    "ckpt_keep_mode": [("fifo", ValueError)],
    "ckpt_keep_limit": [(0, ValueError), (-1, ValueError), (float("inf"), ValueError)],
    "ckpt_restart_fallback": [("sure", ValueError)],
    "ckpt_async": [(3, TypeError)],
    "ckpt_walltime_margin": [(-1, ValueError), ("soon", ValueError)],
    "ckpt_end_time": [(3600, TypeError), ("3600", ValueError), ("tomorrow", ValueError)],
    "ckpt_init_from": [(5, TypeError), (["parent/save"], TypeError)],
    "metadata": [(12, TypeError)],
    "output_dir": [(3, TypeError)],
    "ckpt_best_metric_last": [("low", ValueError), (float("nan"), ValueError)],
    "ckpt_timestamp_last": [(1.5, TypeError)],
    "epochs": [(-1, ValueError), ("ten", ValueError)],
}


@pytest.mark.parametrize(
    "value,expected",
    [(0, 0), (25, 25), ("25", 25), ("auto", "auto"), (" AUTO ", "auto"), (100.0, 100)],
)
def test_save_steps_is_a_count_or_auto(value, expected):
    assert validate_params({"ckpt_save_steps": value})["ckpt_save_steps"] == expected


def test_save_overhead_is_a_percentage_defaulting_to_checkfreq_bound():
    assert validate_params({})["ckpt_save_overhead"] == 3.5
    assert validate_params({"ckpt_save_overhead": "10"})["ckpt_save_overhead"] == 10


def test_every_parameter_has_bad_values_tested():
    assert set(BAD_VALUES) == set(PARAMETERS_BY_NAME)


@pytest.mark.parametrize(
    "key,value,error",
    [(key, value, error) for key, cases in BAD_VALUES.items() for value, error in cases],
)
def test_bad_value_names_key_value_and_expectation(key, value, error):
    with pytest.raises(error) as raised:
        validate_params({"epochs": 3, key: value}, require_epochs=True)
    message = str(raised.value)
    assert f"'{key}'" in message
    assert repr(value) in message
    assert "expected" in message


@pytest.mark.parametrize(
    "text,expected",
    [
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("y", True),
        ("t", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("N", False),
        ("f", False),
        ("0", False),
        ("FaLsE", False),
    ],
)
def test_str2bool_accepts_candle_spellings(text, expected):
    assert candle_ckpt.str2bool(text) is expected
    assert validate_params({"ckpt_checksum": text})["ckpt_checksum"] is expected


def test_defaults_come_from_the_table():
    settings = validate_params({})
    for parameter in PARAMETERS:
        if parameter.name != "epochs":
            assert settings[parameter.name] == parameter.default
    assert settings["ckpt_checksum"] is True and settings["ckpt_directory"] == "./save"


def test_strings_from_a_config_file_are_converted():
    settings = validate_params(
        {"ckpt_skip_epochs": "3", "ckpt_keep_limit": "5.0", "ckpt_save_best": "no", "epochs": "7"},
        require_epochs=True,
    )
    assert settings["ckpt_skip_epochs"] == 3 and settings["ckpt_keep_limit"] == 5
    assert settings["ckpt_save_best"] is False and settings["epochs"] == 7


def test_epochs_required_only_by_the_callback():
    assert validate_params({})["epochs"] is None
    with pytest.raises(ValueError, match="'epochs' is required"):
        validate_params({}, require_epochs=True)


def test_unknown_ckpt_key_is_a_typo_error_with_a_suggestion():
    with pytest.raises(ValueError, match="ckpt_keep_limt.*did you mean 'ckpt_keep_limit'"):
        validate_params({"ckpt_keep_limt": 3})


def test_argparse_flags_are_generated_and_checked():
    parser = argparse.ArgumentParser()
    candle_ckpt.ckpt_parser(parser)
    args = vars(
        parser.parse_args(
            [
                "--ckpt_save_interval",
                "2",
                "--ckpt_checksum",
                "No",
                "--ckpt_keep_mode",
                "exponential",
            ]
        )
    )
    assert args["ckpt_save_interval"] == 2 and args["ckpt_checksum"] is False
    assert args["ckpt_keep_mode"] == "exponential"
    assert "epochs" not in args  # the benchmark owns --epochs
    assert validate_params(args)["ckpt_keep_limit"] == 1000000


@pytest.mark.parametrize(
    "argv",
    [["--ckpt_keep_limit", "0"], ["--ckpt_checksum", "perhaps"], ["--ckpt_restart_mode", "never"]],
)
def test_argparse_rejects_bad_values_with_our_message(argv, capsys):
    parser = argparse.ArgumentParser()
    candle_ckpt.ckpt_parser(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert argv[0] in err and argv[1] in err


def test_ckpt_defs_extends_candle_defs():
    defs = candle_ckpt.ckpt_defs([{"name": "epochs", "type": int, "default": 1}])
    names = [d["name"] for d in defs]
    assert names[0] == "epochs" and names.count("epochs") == 1
    by_name = {d["name"]: d for d in defs}
    assert by_name["ckpt_keep_mode"]["choices"] == ["linear", "exponential", "all"]
    assert by_name["ckpt_checksum"]["type"]("yes") is True
    assert by_name["ckpt_save_interval"]["default"] == 1


def test_param_is_candle_compatible():
    P = candle_ckpt.ParamType
    assert candle_ckpt.param({"a": "4"}, "a", 0, P.INTEGER_GZ) == 4
    assert candle_ckpt.param({}, "a", 7, P.INTEGER_NN) == 7
    assert candle_ckpt.param({}, "m", None, P.STRING) is None
    with pytest.raises(ValueError, match="'a' is required"):
        candle_ckpt.param({}, "a", candle_ckpt.ParamRequired(), P.INTEGER)
    with pytest.raises(ValueError, match=r"'mode'.*'x'.*\['a', 'b'\]"):
        candle_ckpt.param({"mode": "x"}, "mode", "a", P.STRING, allowed=["a", "b"])
    with pytest.raises(TypeError, match="'f'"):
        candle_ckpt.param({"f": [1]}, "f", 0.0, P.FLOAT)
