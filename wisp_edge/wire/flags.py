"""Command-line flags derived from pydantic fields, so a setting is declared once (name, type, default,
description) and `wisp-cloud` and `wisp-edge` spell their flags the same way.

`max_wait_s: float = Field(60.0, description="how long to retry")` becomes `--max-wait-s` with the help
"how long to retry (default: 60.0)"; a bool becomes `--name/--no-name`, a Literal a choice. A flag left out
parses as None, so it leaves the value to the environment, a config file or the field's default. Field
extras: `cli_flags` (more spellings, e.g. ("-k",)) and `cli_join` (the flag may repeat; the values are
joined with this separator).
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def fields_of(model: type) -> dict[str, FieldInfo]:
    """The fields of a pydantic model or pydantic dataclass."""
    return getattr(model, "__pydantic_fields__", None) or model.model_fields


def _extra(field: FieldInfo) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _value_type(annotation: Any) -> tuple[type, tuple | None]:
    """(argparse type, choices) of a field's annotation; `X | None` reads as X."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.default not in (None, PydanticUndefined):
        shown = field.default if not isinstance(field.default, Path) else str(field.default)
        text = f"{text} (default: {shown})".strip()
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_flags(parser: argparse.ArgumentParser, model: type, *, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `model` (or of the fields in `only`), minus `skip`."""
    for name, field in fields_of(model).items():
        if name in skip or (only is not None and name not in only):
            continue
        kind, choices = _value_type(field.annotation)
        options: dict[str, Any] = {"dest": name, "default": None, "help": _help(field)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif "cli_join" in _extra(field):
            options["action"] = "append"
        else:
            options.update(type=kind, choices=choices)
        parser.add_argument(*_extra(field).get("cli_flags", ()), "--" + name.replace("_", "-"), **options)


def given(args: argparse.Namespace, model: type) -> dict[str, Any]:
    """The fields of `model` whose flags were given, as field values (repeated flags joined)."""
    values = {}
    for name, field in fields_of(model).items():
        value = getattr(args, name, None)
        if value is not None:
            join = _extra(field).get("cli_join")
            values[name] = join.join(value) if join is not None else value
    return values
