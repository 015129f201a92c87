"""The user-facing error type, and counted warnings that are shown once each.

``LesionLabError`` means "the user's input is wrong": CLIs print it on one line, without a
traceback. :func:`warn_once` is the one way lesionlab warns about a condition that may repeat
(a rare class in every tuning trial, a metric undefined on every bootstrap draw): the first
occurrence is logged on one line, repeats are only counted, and :func:`flush_warnings` (called
by every CLI on exit) logs how often each one recurred.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import Iterator

log = logging.getLogger("lesionlab")

_COUNTS: collections.Counter[str] = collections.Counter()
_FIRST: dict[str, str] = {}  # the message each key was first shown with
_SEEN: set[tuple[str, str]] = set()  # (key, item) pairs already counted
_SHOWN_AS: dict[str, str] = {}  # path -> the name warnings give it (shown_as)
_LOCAL = threading.local()  # .notes: the list collect_warnings() fills in this thread


class LesionLabError(Exception):
    """A user-facing error: bad data, bad option, missing artifact. CLIs print it on one line."""


class ImageError(LesionLabError):
    """One image file that cannot be used: missing, empty, a folder, corrupt or undecodable,
    of unsupported pixel values, too large or too small; the message names the file.

    A command that meets one can name every such image of its set at once
    (:func:`all_problems`). The type survives a DataLoader worker: torch re-raises a worker's
    exception as ``type(exc)(message)``, whose message then starts with "Caught ImageError in
    DataLoader worker process", so callers test the type, never the message's start.
    """


def all_problems(errors: list[str], total: int, what: str = "images",
                 examples: int = 3) -> LesionLabError:
    """One error for several bad inputs found in one run, so a user fixes them all at once:
    the single message as it is, else ``"<n> of <total> <what> cannot be read (fix or remove
    them): <first few messages>"`` on one line."""
    if len(errors) == 1:
        return LesionLabError(errors[0])
    return LesionLabError(f"{len(errors)} of {total} {what} cannot be read (fix or remove "
                          f"them): {'; '.join(errors[:examples])}"
                          + ("; ..." if len(errors) > examples else ""))


def warn_once(message: str, key: str | None = None, item: str | None = None) -> None:
    """Log ``warning: <message>`` the first time ``key`` (default: the message) is seen.

    Later calls with the same key are counted, not printed; :func:`flush_warnings` reports the
    counts. With ``item`` (e.g. an image's path) each item counts once per key, however often
    it is read (a command that checks an image and then predicts it reads it twice). The
    message should be one line.
    """
    for path, name in list(_SHOWN_AS.items()):
        message = message.replace(path, name)
    notes = getattr(_LOCAL, "notes", None)
    if notes is not None and message not in notes:
        notes.append(message)  # every occurrence, logged or only counted
    key = message if key is None else key
    if item is not None:
        if (key, item) in _SEEN:
            return
        _SEEN.add((key, item))
    _COUNTS[key] += 1
    if _COUNTS[key] == 1:
        _FIRST[key] = message
        log.warning("warning: %s", message)


@contextlib.contextmanager
def shown_as(path: str, name: str) -> Iterator[None]:
    """Inside the block, warnings that name ``path`` name ``name`` instead: a web upload's
    temporary file is logged as the file the user sent (``serve``), never as
    ``/tmp/tmpXXXX.upload``. Paths are unique per block, so concurrent requests do not mix."""
    _SHOWN_AS[str(path)] = name
    try:
        yield
    finally:
        _SHOWN_AS.pop(str(path), None)


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Yield a list that receives the message of every :func:`warn_once` call made in this
    thread inside the block, each message once, whether it is logged or only counted: what
    one web request's image set off (``serve`` returns them with the prediction)."""
    previous = getattr(_LOCAL, "notes", None)
    _LOCAL.notes = notes = []
    try:
        yield notes
    finally:
        _LOCAL.notes = previous


def warning_counts() -> dict[str, int]:
    """How often each warning key was raised since the last :func:`flush_warnings`."""
    return dict(_COUNTS)


def flush_warnings() -> dict[str, int]:
    """Log one line per warning that recurred (its first message, ``(N times in all)``) and
    reset the counts.

    Returns the counts as they were, keyed by warning key.
    """
    counts = dict(_COUNTS)
    for key, n in counts.items():
        if n > 1:
            log.warning("warning repeated %d times in all (first: %s)", n, _FIRST.get(key, key))
    _COUNTS.clear()
    _FIRST.clear()
    _SEEN.clear()
    return counts
