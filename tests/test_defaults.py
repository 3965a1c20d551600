"""One defaults object: the Python API, the command line and the service read it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from starkret import Aligner, ImageDB
from starkret.cli.commands import build_parser
from starkret.defaults import DEFAULTS, Defaults


def _signature_defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_the_aligner_cli_and_service_take_their_defaults_from_the_defaults_object():
    aligner = _signature_defaults(Aligner.__init__)
    for name in (
        "k_per_source",
        "min_score",
        "near_duplicate_threshold",
        "reuse",
        "overfetch",
        "max_fetch",
        "chunk_moments",
        "device",
    ):
        assert aligner[name] == getattr(DEFAULTS, name), name
    assert _signature_defaults(ImageDB.search)["k"] == DEFAULTS.k_per_source

    parser = build_parser()
    align = parser.parse_args(["align", "db", "moments.jsonl", "-o", "out.jsonl"])
    for name in ("k_per_source", "min_score", "near_duplicate_threshold", "reuse", "device"):
        assert getattr(align, name) == getattr(DEFAULTS, name), name
    assert parser.parse_args(["search", "db", "a dog"]).k == DEFAULTS.k_per_source
    serve = parser.parse_args(["serve", "db"])
    for name in (
        "host",
        "port",
        "device",
        "workers",
        "batch_wait_ms",
        "max_batch",
        "min_score",
        "near_duplicate_threshold",
    ):
        assert getattr(serve, name) == getattr(DEFAULTS, name), name


def test_the_service_config_and_requests_take_their_defaults_from_the_defaults_object():
    pytest.importorskip("pydantic")
    from starkret.serve.app import serve
    from starkret.serve.schema import SearchRequest, ServeConfig

    config = ServeConfig()
    shared = {f.name for f in dataclasses.fields(Defaults)} & {
        f.name for f in dataclasses.fields(ServeConfig)
    }
    assert {"min_score", "near_duplicate_threshold", "k_per_source", "overfetch"} <= shared
    for name in shared:
        assert getattr(config, name) == getattr(DEFAULTS, name), name
    assert SearchRequest(queries=["a dog"]).k == DEFAULTS.k_per_source
    options = _signature_defaults(serve)
    assert (options["host"], options["port"]) == (DEFAULTS.host, DEFAULTS.port)


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("align", ("min_score", "near_duplicate_threshold", "k_per_source", "reuse")),
        ("serve", ("min_score", "near_duplicate_threshold", "batch_wait_ms", "max_batch")),
    ],
)
def test_cli_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in shown:
        assert f"default: {getattr(DEFAULTS, name)})" in text, name
