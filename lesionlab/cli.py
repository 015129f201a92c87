"""Configs that are their CLIs: a stage's dataclass builds its argparse parser.

Each config field carries its help text, (where the values are a fixed set) its choices and
(for numbers) its range in ``dataclasses.field(metadata=...)``, made with :func:`option`.
:func:`add_config_args` turns the fields into flags with ``choices=``, range-checking types and
defaults, so a bad value fails in argparse (exit 2, one line) before any data is read;
:func:`check_choices` applies the same choices and ranges to configs built in Python. One
source for defaults, choices, ranges and help. Flags built by hand get their range check from
:func:`ranged`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import numbers
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from lesionlab.artifacts import DEFAULT_WORKDIR
from lesionlab.data import default_data_dir
from lesionlab.errors import LesionLabError, flush_warnings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
QUIET_LOGGERS = ("huggingface_hub", "urllib3", "httpx", "httpcore", "filelock", "timm",
                 "distributed")


def _number(value: float | None) -> str:
    """A bound as the user would write it: ``1``, ``0.5``, ``4294967295``."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric option; ``None`` leaves that side open-ended.

    ``inclusive`` says, for (low, high), whether the bound itself is allowed. Non-finite
    floats (nan, inf) are never in a range.
    """

    low: float | None = None
    high: float | None = None
    inclusive: tuple[bool, bool] = (True, True)

    def __str__(self) -> str:
        lo_in, hi_in = self.inclusive
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>=' if lo_in else '>'} {low}" if self.low is not None else "any number"
        if self.low is None:
            return f"{'<=' if hi_in else '<'} {high}"
        return f"in {'[' if lo_in else '('}{low}, {high}{']' if hi_in else ')'}"

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is inside the range, else why not (``must be >= 1, got 0``)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number {self}, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number {self}, got {value!r}"
        lo_in, hi_in = self.inclusive
        below = self.low is not None and (value < self.low or (value == self.low and not lo_in))
        above = self.high is not None and (value > self.high or (value == self.high and not hi_in))
        return f"must be {self}, got {value!r}" if below or above else None


def bounds_of(ge: float | None = None, gt: float | None = None, le: float | None = None,
              lt: float | None = None) -> Range | None:
    """The :class:`Range` of pydantic-style bounds (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <).

    Raises:
        ValueError: both ``ge`` and ``gt``, or both ``le`` and ``lt`` (a programming error).
    """
    if (ge is not None and gt is not None) or (le is not None and lt is not None):
        raise ValueError("give at most one lower (ge/gt) and one upper (le/lt) bound")
    low, high = (ge if gt is None else gt), (le if lt is None else lt)
    if low is None and high is None:
        return None
    return Range(low, high, (gt is None, lt is None))


def option(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 - argparse name
           choices: Sequence[Any] | None = None, cli: bool = True, metavar: Any = None,
           parse: Callable[[str], Any] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field that knows its CLI flag: help, choices, value parser, numeric range.

    ``ge``/``gt``/``le``/``lt`` bound a number (each element of a tuple): >=, >, <=, <.
    ``None`` values are never range-checked.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli,
            "metavar": metavar, "parse": parse, "range": bounds_of(ge, gt, le, lt)}
    return dataclasses.field(default=default, metadata=meta)


def check_range(value: Any, bounds: Range | None, flag: str) -> None:
    """Raise ``LesionLabError`` (``--flag must be >= 1, got 0``) when ``value`` is outside.

    ``None`` passes; a tuple or list is checked element by element.
    """
    if bounds is None or value is None:
        return
    for item in value if isinstance(value, (tuple, list)) else (value,):
        why = bounds.problem(item)
        if why:
            raise LesionLabError(f"{flag} {why}")


def ranged(parse: Callable[[str], Any] = int, *, ge: float | None = None,
           gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses one value and checks its range (for hand-built flags).

    A value outside fails in argparse (exit 2, one line); unparseable text keeps argparse's
    ``invalid int value`` message.
    """
    return _with_range(parse, bounds_of(ge, gt, le, lt))


def safe_name(value: str) -> str:
    """A model folder name: letters, digits and ``_.+-`` only, never a path."""
    if not value or value in (".", "..") or not NAME_PATTERN.match(value):
        raise LesionLabError(
            f"invalid name {value!r}: use letters, digits and _ . + - only (no path separators)")
    return value


def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a value parser so its LesionLabError becomes an argparse error (exit 2)."""
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except LesionLabError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def _with_range(parse: Callable[[str], Any], bounds: Range | None) -> Callable[[str], Any]:
    """``parse``, then the range check of ``bounds`` (when there is one)."""
    if bounds is None:
        return parse

    def parse_checked(text: str) -> Any:
        value = parse(text)
        if value is not None and (why := bounds.problem(value)):
            raise argparse.ArgumentTypeError(why)
        return value
    parse_checked.__name__ = getattr(parse, "__name__", "value")
    return parse_checked


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type without Optional, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _field_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for one config field."""
    base, _ = _base_type(hint)
    meta = f.metadata
    kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help") or " "}
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
        return kw
    bounds = meta.get("range")
    if bounds is not None:
        kw["help"] = f"{kw['help'].rstrip()}; {bounds}"
    if typing.get_origin(base) is tuple:
        kw.update(nargs=2, type=_with_range(int, bounds),
                  metavar=meta.get("metavar") or ("H", "W"))
        return kw
    parse = meta.get("parse") or (base if base in (int, float) else str)
    kw["type"] = _with_range(_argtype(parse), bounds)
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    return kw


def add_config_args(parser: argparse.ArgumentParser, cls: type, *,
                    optional: Sequence[str] = ()) -> None:
    """Add one flag per CLI field of dataclass ``cls``; names in ``optional`` are not required."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kw = _field_kwargs(f, hints[f.name])
        if f.name in optional and kw.pop("required", False):
            kw["default"] = None
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from parsed arguments (fields argparse did not see keep their default)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **extra})


def check_choices(cfg: Any) -> None:
    """Apply the fields' choices, value parsers and ranges to a config built in Python.

    Raises:
        LesionLabError: a value not among its field's choices, refused by its parser, or
            outside its field's range (one line naming the flag).
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise LesionLabError(f"unknown {flag} {value!r}; expected one of {list(choices)}")
        parse = f.metadata.get("parse")
        if parse is not None and value is not None:
            parse(str(value))
        check_range(value, f.metadata.get("range"), flag)


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (``error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: <message> (see <prog> --help)`` and exit 2."""
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help shows every default and whose errors are one line (exit 2)."""
    return OneLineParser(prog=prog, description=doc,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def config_parser(prog: str, doc: str | None, cls: type) -> argparse.ArgumentParser:
    """A stage's parser: one flag per field of its config, then ``--data`` and ``--workdir``."""
    parser = make_parser(prog, doc)
    add_config_args(parser, cls)
    add_data_args(parser)
    return parser


def add_data_args(parser: argparse.ArgumentParser, *, workdir: bool = True) -> None:
    """Add ``--data`` (and ``--workdir``), shared by every entry point that reads HAM10000."""
    parser.add_argument("--data", type=Path, default=None,
                        help="HAM10000 folder; None: $LESIONLAB_DATA, else ./data/ham10000")
    if workdir:
        parser.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR),
                            help="folder for all artifacts")


def resolve_data(args: argparse.Namespace) -> Path:
    """The data folder the user asked for, or the default."""
    return Path(args.data) if args.data is not None else default_data_dir()


def one_line(exc: LesionLabError) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:  # torch re-raises worker errors with the traceback text
        msg = msg.splitlines()[-1].split("LesionLabError: ", 1)[-1]
    return msg


def run_main(main: Callable[[Sequence[str] | None], int | None],
             argv: Sequence[str] | None = None) -> None:
    """Run ``main``; a ``LesionLabError`` prints ``error: ...`` on one line and exits 2.

    So does an error of the disk rather than of the program: an ``OSError`` with errno EROFS,
    EACCES, EPERM, ENOSPC or EDQUOT (or SQLite's "disk is full" / "readonly database")
    prints ``error: cannot write <path>: <reason> (<what to do>)`` (see
    ``lesionlab.artifacts.write_failure``). Any other exception keeps its traceback: it is a
    bug, or a failure (EIO, a missing file nobody checked for) whose traceback is the report.
    """
    from lesionlab.artifacts import write_failure

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in QUIET_LOGGERS:  # network retries and hub chatter are not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        code = main(argv)
    except LesionLabError as exc:
        flush_warnings()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - re-raised unless the disk caused it
        message = write_failure(exc)
        if message is None:
            raise
        flush_warnings()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    flush_warnings()
    sys.exit(code or 0)
