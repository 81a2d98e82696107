"""One place for the serve settings: the flags, their defaults and the argv a child gets."""

from __future__ import annotations

import argparse

import pytest

from llm_magic.settings import DEFAULTS, ServeSettings, add_serve_arguments


def parse(argv: list[str]) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return ServeSettings.from_args(parser.parse_args(argv))


def test_the_flags_defaults_are_the_settings_defaults() -> None:
    assert parse([]) == DEFAULTS
    assert DEFAULTS.to_argv() == []


@pytest.mark.parametrize("argv", [
    ["--ctx", "8192", "--parallel", "2", "--no-token"],
    ["--model", "a/b:Q4_K_M", "--allow-model", "x/*", "--allow-model", "y/*", "--cors", "*"],
    ["--keepalive", "2.5", "--flash-attn", "off", "--gpu-layers", "0", "--port", "0", "--tunnel", "none"],
    ["--token", "secret", "--max-ctx", "16384", "--threads", "3", "--embedding-model", "e.gguf"],
    ["--batch-size", "1024", "--ubatch-size", "256"],
])
def test_to_argv_gives_back_the_same_settings(argv: list[str]) -> None:
    settings = parse(argv)
    assert parse(settings.to_argv()) == settings
    assert sorted(settings.to_argv()) == sorted(argv)


def test_skipped_fields_stay_out_of_the_argv() -> None:
    settings = parse(["--token", "secret", "--ctx", "2048"])
    assert settings.to_argv(skip=("token",)) == ["--ctx", "2048"]


def test_the_gpu_split_flags_parse_and_go_back_to_the_child() -> None:
    settings = parse(["--split-mode", "row", "--tensor-split", "3,1.5", "--main-gpu", "1"])
    assert (settings.split_mode, settings.tensor_split, settings.main_gpu) == ("row", (3.0, 1.5), 1)
    assert settings.to_argv() == ["--split-mode", "row", "--tensor-split", "3,1.5", "--main-gpu", "1"]
    assert parse(settings.to_argv()) == settings
    assert (DEFAULTS.split_mode, DEFAULTS.tensor_split, DEFAULTS.main_gpu) == (None, None, None)  # the host chooses


@pytest.mark.parametrize("argv, message", [
    (["--split-mode", "rows"], "argument --split-mode: invalid choice: 'rows' (choose from"),
    (["--tensor-split", "3,x"], "argument --tensor-split: '3,x' is not a list of numbers, one per GPU, such as 3,1"),
    (["--tensor-split", "1,-1"], "argument --tensor-split: '1,-1': each proportion must be a number of 0 or more"),
    (["--tensor-split", "nan,1"], "argument --tensor-split: 'nan,1': each proportion must be a number of 0 or more"),
    (["--tensor-split", "0,0"], "argument --tensor-split: '0,0': at least one proportion must be above 0"),
    (["--main-gpu", "-1"], "argument --main-gpu: must be 0 or more, not -1"),
    (["--main-gpu", "first"], "argument --main-gpu: 'first' is not a whole number"),
])
def test_bad_gpu_split_values_are_refused_with_what_is_wrong(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err
