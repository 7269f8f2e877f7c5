"""Settings declared once: dataclass fields carry type, default and help; flags are generated.

A config dataclass declares each setting with :func:`setting`::

    @dataclass(frozen=True)
    class TrainConfig:
        batch_size: int = setting(16, "excerpts per batch and worker", group="optimisation")

:func:`add_flags` turns the fields into argparse flags (field ``x_y`` is ``--x-y``; the type comes
from the annotation, the default and its help from the field) and :func:`from_args` builds the
dataclass back from the parsed namespace. Range checks live in the dataclass's ``__post_init__``,
so a value is checked the same way from the command line, a YAML space, a JSON file or Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    group: str | None = None,
    flag: str | None = None,
    short: str | None = None,
    choices: Iterable[Any] | None = None,
    metavar: str | None = None,
    factory: Callable[[], Any] | None = None,
    shown_default: str | None = None,
    invert: bool = False,
    cli: bool = True,
    compare: bool = True,
) -> Any:
    """A dataclass field with what its command-line flag needs.

    flag / short: the flag's names (default ``--field-name``); choices: allowed values;
    factory: a default computed when the object is made (``shown_default`` is then what help
    says); invert: a ``True`` default switched off by the flag (``progress`` <- ``--quiet``);
    cli: False for a field that is no flag (the metadata's ``help`` says who sets it).
    """
    meta = {
        "help": help,
        "group": group,
        "flag": flag,
        "short": short,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "shown_default": shown_default,
        "invert": invert,
        "cli": cli,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta, compare=compare)
    return dataclasses.field(default=default, metadata=meta, compare=compare)


def flag_name(field: dataclasses.Field) -> str:
    """``--x-y`` for field ``x_y`` unless the field names its own flag."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def cli_fields(cls: type, groups: Iterable[str] | None = None, only: Iterable[str] | None = None) -> list:
    """The fields of ``cls`` that are flags (in ``groups`` / ``only`` when given)."""
    groups = set(groups) if groups is not None else None
    only = set(only) if only is not None else None
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or dataclasses.is_dataclass(_hint(cls, f.name)):
            continue
        if groups is not None and f.metadata.get("group") not in groups:
            continue
        if only is not None and f.name not in only:
            continue
        out.append(f)
    return out


def comma_list(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"): the form of every list-valued flag."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (its factory's value for a computed one)."""
    if field.default is not _MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _shown(field: dataclasses.Field) -> str:
    if field.metadata.get("shown_default"):
        return field.metadata["shown_default"]
    value = default_of(field)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    groups: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    titles: dict[str, argparse._ArgumentGroup] | None = None,
) -> None:
    """Add the flags of ``cls``'s fields to ``parser``, in argument groups named by the fields.

    ``titles`` shares groups between classes (several classes' fields in one help group).
    """
    titles = {} if titles is None else titles
    for f in cli_fields(cls, groups, only):
        meta = f.metadata
        group_name = meta.get("group")
        target: Any = parser
        if group_name and isinstance(parser, argparse.ArgumentParser):
            if group_name not in titles:
                titles[group_name] = parser.add_argument_group(group_name)
            target = titles[group_name]
        names = [n for n in (meta.get("short"), flag_name(f)) if n]
        kind, optional = _base_type(_hint(cls, f.name))
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if kind is bool and meta.get("invert"):
            kwargs.update(action="store_false", default=default_of(f))
        elif kind is bool and optional:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
            kwargs["help"] += f" (default: {_shown(f)})"
        elif kind is bool:
            kwargs.update(action="store_true", default=default_of(f))
        else:
            convert = comma_list if typing.get_origin(kind) is tuple else kind
            kwargs.update(type=convert, default=None if f.default is _MISSING else f.default)
            kwargs["help"] += f" (default: {_shown(f)})"
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            metavar = meta.get("metavar") or {int: "N", float: "X"}.get(kind)
            if metavar and not meta.get("choices"):
                kwargs["metavar"] = metavar
        target.add_argument(*names, **kwargs)


def values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that ``args`` holds (a computed default stays unset)."""
    out = {}
    for f in cli_fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and f.default is _MISSING:
            continue  # the field's factory computes it
        out[f.name] = value
    return out


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` built from parsed flags, with ``overrides`` on top."""
    return cls(**{**values(cls, args), **overrides})
