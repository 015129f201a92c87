"""Configs that are their CLIs: a stage's dataclass builds its argparse parser.

Each config field carries its help text, (where the values are a fixed set) its choices and
(for numbers) its range in ``dataclasses.field(metadata=...)``, made with :func:`option`.
:func:`add_config_args` turns the fields into flags with ``choices=``, range-checking types and
defaults, so a bad value fails in argparse (exit 2, one line) before any data is read;
:func:`check_choices` applies the same choices and ranges to configs built in Python. One
source for defaults, choices, ranges and help. Flags built by hand get their range check from
:func:`ranged`.

Options several commands share have one definition here: :func:`device_option`,
:func:`data_option`, :func:`workdir_option`, :func:`model_option`. Every parser made by
:func:`make_parser` takes ``--config FILE``: a TOML or YAML file whose keys are the config's
field names (the flags with ``_`` for ``-``); flags on the command line override it and an
unknown key stops in one line. :func:`save_config` writes the resolved config (file + flags)
beside what a command made, as ``config.yaml``, which ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import numbers
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from lesionlab.artifacts import DEFAULT_WORKDIR, write_text
from lesionlab.data import default_data_dir
from lesionlab.device import DEVICES
from lesionlab.errors import LesionLabError, flush_warnings
from lesionlab.labels import AUTO, FORMATS

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
QUIET_LOGGERS = ("huggingface_hub", "urllib3", "httpx", "httpcore", "filelock", "timm",
                 "distributed")
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")
SAVED_CONFIG = "config.yaml"  # the resolved config written beside a command's artifacts
_VALUE_PARSERS: dict[Any, Callable[[str], Any]] = {int: int, float: float, Path: Path}


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
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           switch: bool = False, positional: bool = False) -> Any:
    """A dataclass field that knows its CLI flag: help, choices, value parser, numeric range.

    ``ge``/``gt``/``le``/``lt`` bound a number (each element of a tuple): >=, >, <=, <.
    ``None`` values are never range-checked. A ``bool`` field is ``--flag/--no-flag``, or
    with ``switch`` a plain ``--flag`` (``store_true``). ``positional`` makes the field a
    positional argument (a ``tuple[str, ...]`` one takes one or more values); positionals
    are given on the command line only, never in a ``--config`` file.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli,
            "metavar": metavar, "parse": parse, "range": bounds_of(ge, gt, le, lt),
            "switch": switch, "positional": positional}
    return dataclasses.field(default=default, metadata=meta)


def device_option() -> Any:
    """The one ``--device`` of every command: ``auto`` (CUDA where available, else CPU)."""
    return option("auto", "where the network runs; auto: CUDA where available, else CPU",
                  choices=DEVICES)


def data_folder(text: str) -> Path:
    """A ``--data`` value as a path, checked in argument parsing: an existing file is refused
    (the commands read, or download into, a folder).

    Raises:
        LesionLabError: ``text`` names an existing file or other non-folder.
    """
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise LesionLabError(f"{text} is a file; --data takes a folder (the images and "
                             f"their label CSV)")
    return path


def data_option() -> Any:
    """The one ``--data`` of every command that reads HAM10000 (None: the default folder)."""
    return option(None, "HAM10000 folder; None: $LESIONLAB_DATA, else ./data/ham10000",
                  parse=data_folder)


def labels_option() -> Any:
    """The one ``--labels FORMAT`` of every command that reads labels (``auto``: detected)."""
    return option(AUTO, "label format of --data; auto: detected from the label CSV's columns "
                  "or the folder layout (README: Bring your own data)", choices=(AUTO, *FORMATS))


def label_map_option() -> Any:
    """The one ``--label-map FILE`` of every command that reads labels."""
    return option(None, "CSV (kind,source,target) or TOML of your own class/site/sex names, "
                  "added to lesionlab/vocabulary.csv", parse=Path)


def label_options(args: Any) -> dict[str, Any]:
    """``labels`` and ``label_map`` of parsed arguments or a config, as keyword arguments of
    ``load_dataset``/``ensure_data``/``load_external_labels`` (defaults where absent)."""
    return {"labels": getattr(args, "labels", AUTO) or AUTO,
            "label_map": getattr(args, "label_map", None)}


def workdir_option() -> Any:
    """The one ``--workdir`` of every command that writes under the artifact folder."""
    return option(Path(DEFAULT_WORKDIR), "folder for all artifacts")


def model_option(what: str = "a model folder (with card.json)", shipped: bool = False) -> Any:
    """A ``--model DIR``: the model folder a command reads; required, or with ``shipped``
    optional (None: the model shipped with lesionlab, ``models.shipped``)."""
    if shipped:
        return option(None, f"{what}; None: the shipped model (pretrained/)", parse=Path)
    return option(help=what, parse=Path)


@dataclasses.dataclass
class DataOptions:
    """``--data``, ``--labels``, ``--label-map`` and ``--workdir`` as a config (what
    :func:`add_data_args` adds)."""

    data: Path | None = data_option()
    labels: str = labels_option()
    label_map: Path | None = label_map_option()
    workdir: Path = workdir_option()


@dataclasses.dataclass
class TrackingOptions:
    """``--tracking-uri`` and ``--no-tracking``: MLflow tracking of every training command
    and study (``lesionlab.tracking``)."""

    tracking_uri: str | None = option(None, "MLflow tracking server or store to log to; None: "
                                            "sqlite:///WORKDIR/mlflow.db")
    no_tracking: bool = option(False, "log nothing to MLflow", switch=True)


def check_range(value: Any, bounds: Range | None, flag: str) -> None:
    """Raise ``LesionLabError`` (``--flag must be >= 1, got 0``) when ``value`` is outside.

    ``None`` passes; a tuple or list is checked element by element.

    Raises:
        LesionLabError: ``value`` (or an element of it) is outside ``bounds``.
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
    """A model folder name: letters, digits and ``_.+-`` only, never a path.

    Raises:
        LesionLabError: ``value`` is empty, ``.`` or ``..``, or holds another character.
    """
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
        kw["action"] = "store_true" if meta.get("switch") else argparse.BooleanOptionalAction
        return kw
    bounds = meta.get("range")
    if bounds is not None:
        kw["help"] = f"{kw['help'].rstrip()}; {bounds}"
    items = typing.get_args(base) if typing.get_origin(base) is tuple else ()
    if len(items) == 2 and items[1] is Ellipsis:  # tuple[X, ...]: one or more values
        kw["nargs"], base = "+", items[0]
    elif items:  # tuple[int, int]: an (H, W) size
        kw.update(nargs=2, type=_with_range(int, bounds),
                  metavar=meta.get("metavar") or ("H", "W"))
        return kw
    parse = meta.get("parse") or _VALUE_PARSERS.get(base, str)
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
        if f.metadata.get("positional"):
            kw.pop("dest")
            kw.pop("required", None)
            parser.add_argument(f.name, **kw)
        else:
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
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if choices and item not in choices:
                raise LesionLabError(f"unknown {flag} {item!r}; expected one of {list(choices)}")
        parse = f.metadata.get("parse")
        if parse is not None and value is not None:
            parse(str(value))
        check_range(value, f.metadata.get("range"), flag)


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The option values of a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file.

    Returns:
        Field name -> value (a flat mapping; an empty file gives ``{}``).

    Raises:
        LesionLabError: another suffix, an unreadable file, a syntax error, or a file that
            is not a flat mapping of names to values (one line naming the file).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise LesionLabError(f"--config {path}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LesionLabError(f"cannot read --config {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    import yaml

    try:
        values = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = "TOML" if suffix == ".toml" else "YAML"
        raise LesionLabError(f"--config {path} is not valid {kind}: "
                             f"{' '.join(str(exc).split())}") from None
    values = {} if values is None else values
    nested = [k for k, v in values.items() if isinstance(v, dict)] \
        if isinstance(values, dict) else None
    if nested is None or nested:
        raise LesionLabError(f"--config {path} must map option names to values"
                             + (f"; {', '.join(map(str, nested))} is a table" if nested else ""))
    return values


def _config_path(args: Sequence[str]) -> Path | None:
    """The file of the last ``--config FILE`` / ``--config=FILE`` in ``args``."""
    path = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
    return path


def _tokens(action: argparse.Action, key: str, value: Any) -> list[str]:
    """The command-line words that give ``action`` the value ``value`` of config key ``key``.

    Raises:
        LesionLabError: a switch given a non-boolean value.
    """
    flag = next(s for s in action.option_strings if s.startswith("--"))
    if action.nargs == 0:  # --flag (store_true) or --flag/--no-flag
        if not isinstance(value, bool):
            raise LesionLabError(f"config key {key} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value else []
    if action.nargs is not None and action.nargs != "?":
        values = value if isinstance(value, (list, tuple)) else [value]
        return [flag, *(str(v) for v in values)]
    return [f"{flag}={value}"]


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (``error: ...``), exit 2.

    ``--config FILE`` (when the parser has it) is read before the command line: its values
    become flags placed first, so the command line's own flags override them, and argparse
    checks them like typed ones (choices, ranges, required options).
    """

    def error(self, message: str) -> NoReturn:
        """Print ``error: <message> (see <prog> --help)`` and exit 2."""
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, with the values of ``--config FILE`` in front of ``args``."""
        args = list(sys.argv[1:] if args is None else args)
        path = _config_path(args) if any(a.dest == "config" for a in self._actions) else None
        if path is not None:
            namespace = namespace or argparse.Namespace()
            try:
                args = self._config_words(read_config_file(path), path, namespace) + args
            except LesionLabError as exc:
                self.error(str(exc))
        parsed, rest = super().parse_known_args(args, namespace)
        given = getattr(parsed, "config", None)
        if given is not None and Path(given) != path:
            self.error(f"write --config in full (got an abbreviation for {given})")
        values = vars(parsed)  # in the parser's order, whatever the file set first
        ordered = {a.dest: values[a.dest] for a in self._actions if a.dest in values}
        ordered.update(values)
        values.clear()
        values.update(ordered)
        return parsed, rest

    def _config_words(self, values: dict[str, Any], path: Path,
                      namespace: argparse.Namespace) -> list[str]:
        """Command-line words for the file's values; its nulls are set on ``namespace``.

        Raises:
            LesionLabError: a key that is no option of this command (all such keys named).
        """
        actions = {a.dest: a for a in self._actions
                   if a.option_strings and a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise LesionLabError(f"unknown key{'s' if len(unknown) > 1 else ''} in {path}: "
                                 f"{', '.join(map(str, unknown))} (known: "
                                 f"{', '.join(sorted(actions))})")
        words: list[str] = []
        for key, value in values.items():
            if value is None:
                setattr(namespace, key, None)
            else:
                words += _tokens(actions[key], key, value)
        return words


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help shows every default, whose errors are one line (exit 2), and
    which takes ``--config FILE`` (TOML or YAML; flags override it)."""
    parser = OneLineParser(prog=prog, description=doc,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML or YAML file of option values, keyed by the option names "
                             "with _ for - (--some-option 3 is some_option: 3); flags given "
                             "here override it")
    return parser


def command_parser(prog: str, doc: str | None, *classes: type) -> argparse.ArgumentParser:
    """A command's parser: one flag per field of each config dataclass in ``classes``."""
    parser = make_parser(prog, doc)
    for cls in classes:
        add_config_args(parser, cls)
    return parser


def config_values(cfg: Any) -> dict[str, Any]:
    """What ``--config`` would need to give ``cfg`` again: field or option name -> value.

    ``cfg`` is a config dataclass (its flag fields, not its positionals) or parsed
    arguments (all but ``--config``). Paths become strings and tuples lists.
    """
    if dataclasses.is_dataclass(cfg):
        raw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.metadata.get("cli", True) and not f.metadata.get("positional")}
    else:
        raw = {k: v for k, v in vars(cfg).items() if k != "config"}

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value
    return {k: plain(v) for k, v in raw.items()}


def save_config(where: Path | str, cfg: Any, command: str = "") -> Path:
    """Write the resolved config beside an artifact, atomically; returns the file written.

    ``where`` is a folder (the file is ``<folder>/config.yaml``) or a file artifact (the
    file is ``<name>.config.yaml`` beside it). ``--config`` reads the file back.
    """
    import yaml

    where = Path(where)
    dest = where / SAVED_CONFIG if where.is_dir() else where.with_name(
        f"{where.name}.{SAVED_CONFIG}")
    head = f"# resolved config of `{command}`; rerun it with --config {dest.name}\n" \
        if command else ""
    write_text(dest, head + yaml.safe_dump(config_values(cfg), sort_keys=False))
    return dest


def config_parser(prog: str, doc: str | None, cls: type) -> argparse.ArgumentParser:
    """A stage's parser: one flag per field of its config, then ``--data`` and ``--workdir``."""
    parser = make_parser(prog, doc)
    add_config_args(parser, cls)
    add_data_args(parser)
    return parser


def add_data_args(parser: argparse.ArgumentParser, *, workdir: bool = True,
                  labels: bool = True) -> None:
    """Add ``--data`` (and ``--workdir``, ``--labels``, ``--label-map``), shared by every
    entry point that reads a data folder."""
    hints = typing.get_type_hints(DataOptions)
    skip = ({"workdir"} if not workdir else set()) | (
        {"labels", "label_map"} if not labels else set())
    for f in dataclasses.fields(DataOptions):
        if f.name not in skip:
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, **_field_kwargs(f, hints[f.name]))


def resolve_data(args: Any) -> Path:
    """The data folder ``args.data`` (parsed arguments or a config) names, or the default
    ($LESIONLAB_DATA, else ./data/ham10000).

    Raises:
        LesionLabError: the default names a file rather than a folder.
    """
    return Path(args.data) if args.data is not None else data_folder(str(default_data_dir()))


def one_line(exc: LesionLabError) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:  # torch re-raises worker errors with the traceback text
        msg = msg.splitlines()[-1].split(f"{type(exc).__name__}: ", 1)[-1]
    return msg


def run_main(main: Callable[[Sequence[str] | None], int | None],
             argv: Sequence[str] | None = None) -> None:
    """Run ``main``; a ``LesionLabError`` prints ``error: ...`` on one line and exits 2.

    So does an error of the disk rather than of the program: an ``OSError`` with errno EROFS,
    EACCES, EPERM, ENOSPC or EDQUOT (or SQLite's "disk is full" / "readonly database")
    prints ``error: cannot write <path>: <reason> (<what to do>)`` (see
    ``lesionlab.artifacts.write_failure``). Any other exception keeps its traceback: it is a
    bug, or a failure (EIO, a missing file nobody checked for) whose traceback is the report.

    Raises:
        SystemExit: code 2 after a ``LesionLabError`` or a disk error; else ``main``'s code.
        Exception: any other exception of ``main``, re-raised unchanged.
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
