"""What the commands share: printing (`emit`), `-q` on a command, the image-preprocessing options and
their reading, and comma-separated width lists."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from onnxmpq import progress
from onnxmpq.calibrate import Preprocess
from onnxmpq.cli.options import given
from onnxmpq.errors import ConfigError
from onnxmpq.pipeline import config
from onnxmpq.pipeline.stages import load

F = Callable[..., Any]


def quiet_option(fn: F) -> F:
    """`-q/--quiet` on a command as well as on the group (`onnxmpq quantize ... -q`)."""
    def set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            progress.QUIET = True
        return value
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=set_quiet,
                        help="No progress bars or log lines on stderr.")(fn)


def preprocess(model: str, section: config.PreprocessConfig) -> Preprocess | None:
    """The model's metadata preprocessing (or the defaults) with the config's given fields replaced;
    None when none is given."""
    given = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if getattr(section, f.name) is not None}
    if not given:
        return None
    if "size" in given:
        given["size"] = _numbers(given["size"], "x", "preprocess.size", int, 2)
    for key in ("mean", "std"):
        if key in given:
            given[key] = _numbers(given[key], ",", f"preprocess.{key}", float)
    base = Preprocess.from_metadata(load(model).metadata) or Preprocess()
    return dataclasses.replace(base, **given)


def preprocess_of(model: str, kwargs: Mapping[str, Any]) -> Preprocess | None:
    """`preprocess` from a command's generated preprocessing options."""
    values = {k.partition(".")[2]: v for k, v in given(kwargs).items() if k.startswith("preprocess.")}
    return preprocess(model, config.build_section("preprocess", values))


def _numbers(text: str, sep: str, path: str, kind: type, count: int | None = None) -> tuple[Any, ...]:
    example = "224x224" if sep == "x" else "0.485,0.456,0.406"
    try:
        values = tuple(kind(v) for v in str(text).lower().split(sep))
    except ValueError:
        raise ConfigError(path, f"{text!r} is not a list of numbers", f"write e.g. {example}") from None
    if count and len(values) != count:
        raise ConfigError(path, f"needs {count} numbers, got {text!r}", f"write e.g. {example}")
    return values


def widths(text: str, path: str) -> list[int | None]:
    """Comma-separated widths (float allowed), as a command's own option gives them."""
    return list(config.parse_bit_list(text, path))


def emit(as_json: bool, obj: object, human: str) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default) if as_json else human)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
