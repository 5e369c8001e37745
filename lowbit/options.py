"""A method's options, declared once on its config dataclass and read from there by the CLI and the runner.

A config field made with :func:`option` carries its command-line flag, help text, choices and parser;
:func:`options_of` lists them, :class:`MethodOptions` holds values by their command-line names for any
method, and :func:`config_kwargs` turns those values into a config's keyword arguments. Adding an option
to a method is one edit: a field.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import LowbitError


def positive_int(text: str) -> int:
    """A command-line integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A command-line integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def option(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),
           choices: Iterable | None = None, parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           nargs: int | None = None) -> Any:
    """A config field that is also a command-line option (``--field-name`` unless ``flag`` says otherwise).
    A boolean that defaults to True is switched off by its flag (``--no-clip``)."""
    meta = {"help": help, "flag": flag, "aliases": aliases, "choices": tuple(choices) if choices else None,
            "parse": parse, "metavar": metavar, "nargs": nargs}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable")
    return dataclasses.field(default=default, metadata={"lowbit_option": meta})


@dataclass(frozen=True)
class Option:
    """One declared option: where it lives and how the command line spells it."""

    config: type
    field: str
    flag: str
    aliases: tuple[str, ...]
    default: Any
    help: str
    choices: tuple | None
    parse: Callable[[str], Any] | None
    metavar: str | None
    nargs: int | None

    @property
    def dest(self) -> str:
        """The name the value goes by outside the config: the flag without dashes (``--no-x`` keeps ``x``)."""
        name = self.flag[2:]
        if isinstance(self.default, bool) and self.default and name.startswith("no-"):
            name = name[3:]
        return name.replace("-", "_")


def options_of(cls: type) -> list[Option]:
    """The options a config class declares, in field order."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("lowbit_option")
        if meta is None:
            continue
        default = f.default
        flag = meta["flag"] or ("--no-" if default is True else "--") + f.name.replace("_", "-")
        out.append(Option(cls, f.name, flag, meta["aliases"], default, meta["help"], meta["choices"], meta["parse"],
                          meta["metavar"], meta["nargs"]))
    return out


def dest_of(cls: type, field_name: str) -> str:
    """The name option ``field_name`` of ``cls`` goes by in :class:`MethodOptions` and on the command line."""
    for o in options_of(cls):
        if o.field == field_name:
            return o.dest
    raise KeyError(f"{cls.__name__} has no option {field_name!r}")


def config_kwargs(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``cls`` for the option values given (by dest); the rest keep the config's defaults."""
    return {o.field: values[o.dest] for o in options_of(cls) if o.dest in values}


class MethodOptions:
    """Option values by name, for any method (names and defaults come from the configs in ``configs``).

    ``MethodOptions(n_grid=10, act_order=True)``; ``opts.n_grid``; ``opts.replace(seed=1)``.
    """

    configs: tuple[type, ...] = ()  # set by lowbit.methods: every config class that declares options
    extra: dict[str, Any] = {}  # options of the pipeline itself (rotation, activations), with defaults

    def __init__(self, **values: Any) -> None:
        known = self.known()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LowbitError(f"unknown method option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self._values = dict(values)

    @classmethod
    def known(cls) -> dict[str, Any]:
        """Every option name with its default (the first config that declares it sets it)."""
        out = dict(cls.extra)
        for c in cls.configs:
            for o in options_of(c):
                out.setdefault(o.dest, o.default)
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        known = self.known()
        if name not in known:
            raise AttributeError(f"no method option {name!r}")
        return known[name]

    def given(self) -> dict[str, Any]:
        """The values set explicitly."""
        return dict(self._values)

    def replace(self, **values: Any) -> MethodOptions:
        return type(self)(**{**self._values, **values})

    def for_config(self, cls: type) -> dict[str, Any]:
        """Keyword arguments of ``cls`` from these values."""
        return config_kwargs(cls, self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodOptions) and self._values == other._values

    def __repr__(self) -> str:
        return f"MethodOptions({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"
