"""The config keys as text, for `dicl config` and each command's --help: name, type, value, default, meaning."""
from __future__ import annotations

import textwrap
import typing

from pydantic import BaseModel


def type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return type_name(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in args)
    return getattr(annotation, "__name__", None) if not args else str(annotation).replace("typing.", "")


def default_of(field) -> object:
    return field.default_factory() if field.default_factory is not None else field.default


def show(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return "(empty)" if value in (None, "") else str(value)


def key_lines(prefix: str, model: BaseModel, brief: bool) -> list[str]:
    lines = []
    for name, field in type(model).model_fields.items():
        value, default = getattr(model, name), default_of(field)
        head = f"  {prefix}{name} ({type_name(field.annotation)}) = {show(default if brief else value)}"
        if not brief and value != default:
            head += f"   [default {show(default)}]"
        lines.append(head)
        if field.description:
            lines += textwrap.wrap(field.description, 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def describe_keys(cfg: BaseModel, sections: tuple[str, ...], brief: bool = True) -> str:
    """brief: defaults only (for --help); otherwise the config's values, with the default where they differ."""
    lines = []
    top = {n: f for n, f in type(cfg).model_fields.items() if not isinstance(getattr(cfg, n), BaseModel)}
    for name, field in top.items():
        lines.append(f"  {name} (str) = {show(getattr(cfg, name))}")
        lines += textwrap.wrap(field.description or "", 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    for section in sections:
        lines.append(f"{section}:")
        lines += key_lines(f"{section}.", getattr(cfg, section), brief)
    return "\n".join(lines)
