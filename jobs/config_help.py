"""The config keys as text, for `dicl config` and each command's --help: name, type, value, default, meaning."""
from __future__ import annotations

import textwrap
import types
import typing

from pydantic import BaseModel

from clustering.model.methods import RECIPES


def type_name(annotation) -> str:
    """A type as a reader writes it: `int | None`, `dict[str, list | dict[str, list]]`, `auto|yes|no`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return {type(None): "None", Ellipsis: "..."}.get(annotation) or getattr(annotation, "__name__", str(annotation))


def default_of(field) -> object:
    return field.default_factory() if field.default_factory is not None else field.default


def show(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return "(empty)" if value in (None, "") else str(value)


def wrapped(text: str | None) -> list[str]:
    return textwrap.wrap(text or "", 110, initial_indent=" " * 6, subsequent_indent=" " * 6)


def method_lines(prefix: str, field, settings: BaseModel, brief: bool) -> list[str]:
    """train.method: the method chosen and its settings; brief (--help): every method's settings, by method."""
    default = default_of(field).name
    marker = f"   [default {default}]" if not brief and settings.name != default else ""
    lines = [f"  {prefix} ({'|'.join(RECIPES)}) = {settings.name}{marker}", *wrapped(field.description)]
    chosen = [recipe.Settings() for recipe in RECIPES.values()] if brief else [settings]
    for method in chosen:
        lines.append(f"  {prefix}.* of {method.name}:" + ("" if set(type(method).model_fields) - {"name"} else " none"))
        lines += key_lines(f"{prefix}.", method, brief, skip=("name",))
    return lines


def key_lines(prefix: str, model: BaseModel, brief: bool, skip: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for name, field in type(model).model_fields.items():
        value, default = getattr(model, name), default_of(field)
        if name in skip:
            continue
        if isinstance(value, BaseModel):  # train.method: a method's own settings
            lines += method_lines(f"{prefix}{name}", field, value, brief)
            continue
        head = f"  {prefix}{name} ({type_name(field.annotation)}) = {show(default if brief else value)}"
        if not brief and value != default:
            head += f"   [default {show(default)}]"
        lines.append(head)
        lines += wrapped(field.description)
    return lines


def describe_keys(cfg: BaseModel, sections: tuple[str, ...], brief: bool = True) -> str:
    """brief: defaults only (for --help); otherwise the config's values, with the default where they differ."""
    lines = []
    top = {n: f for n, f in type(cfg).model_fields.items() if not isinstance(getattr(cfg, n), BaseModel)}
    for name, field in top.items():
        lines.append(f"  {name} (str) = {show(getattr(cfg, name))}")
        lines += wrapped(field.description)
    for section in sections:
        lines.append(f"{section}:")
        lines += key_lines(f"{section}.", getattr(cfg, section), brief)
    return "\n".join(lines)


def key_names(cfg: BaseModel, sections: tuple[str, ...]) -> str:
    """The keys of each section by name alone, a few lines per section (the pipeline's --help, which reads them
    all): `dicl config` and each stage's --help give their meaning."""
    lines = [f"  {', '.join(n for n in type(cfg).model_fields if not isinstance(getattr(cfg, n), BaseModel))}"]
    for section in sections:
        names = ", ".join(f"{section}.{n}" for n in type(getattr(cfg, section)).model_fields)
        lines += textwrap.wrap(names, 110, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)
