"""A command's options, declared once: each field of its config dataclass carries its help text
(and what else argparse needs) beside its name, type and default, and `gradproj.cli` derives
the parser from the fields. A `Literal[...]` type is the option's choices.

Imports nothing heavy at module level: `gradproj --help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from gradproj.errors import UserError

# Keys of an option's field metadata: its help text, and its other argparse keywords: flag (its
# spelling, when not --<name>), nargs, metavar, or positional=True.
HELP = "help"
ARGPARSE = "argparse"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    **argparse_extras,
) -> Any:
    """A dataclass field with its command-line help (and argparse keywords, see ARGPARSE)."""
    if not help:
        raise TypeError("every option needs its help text")
    metadata = {HELP: help, ARGPARSE: argparse_extras}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def choices(hint) -> list | None:
    """The values of a `Literal[...]` type (or of `Literal[...] | None`), else None."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


def check_choices(config) -> None:
    """Every `Literal[...]` field of the dataclass instance `config` holds one of its values
    (or None, where the type allows it): the command line's choices, checked for every caller."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        allowed, value = choices(hints[field.name]), getattr(config, field.name)
        if allowed is None or value in allowed:
            continue
        if value is None and type(None) in typing.get_args(hints[field.name]):
            continue
        listed = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
        raise UserError(f"--{field.name} {value!r}: use {listed}")


def device_option() -> Any:
    """`--device` of the commands that compute on one, resolved by `resolve_device`."""
    return option(None, "cpu, cuda, cuda:N (default: cuda if available)")


def resolve_device(device: str | None) -> str:
    """`--device` of every command: cuda when one is visible and none is named, else cpu; a
    named device must be cpu or cuda[:N], and cuda must be visible."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith(("cpu", "cuda")):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is visible")
    return device


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise the UserError of the first (ok, message) whose ok is false."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)
