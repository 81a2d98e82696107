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
