"""``--features`` specs: one grammar, parsed once into typed blocks.

A head's ``--features`` names the feature blocks it reads, side by side::

    features := block { "+" block }
    block    := "oof:" NAME                          (out-of-fold probabilities)
              | SOURCE [ ":" option { "," option } ]
    option   := TTA | POOL | COLOUR | H "x" W | "w" HEX8

``SOURCE`` is a timm backbone name (``tf_efficientnet_lite0``), ``classical`` (hand-made
features), a fine-tuned network's model folder, or an exact feature-cache key; ``NAME`` is a
K-fold ensemble under ``<workdir>/models``. Options pick among cached feature sets: TTA
(``TTA_MODES``), pooling (``POOL_MODES``), colour constancy
(``featurize.color.COLOR_CONSTANCY``), the image size ``HxW`` in pixels and ``w`` + the first 8
hex digits of the weights' sha256. ``none`` is both a TTA and a colour-constancy word: a word
means "one of the set's settings is this" (how :func:`featurize.extract.resolve_key` matches).

:func:`parse_features` is the only place a spec string is split; everything else reads
:class:`FeatureBlock` fields. :func:`format_features` is its inverse: ``format_features(
parse_features(s)) == s`` for every spec in canonical form (blocks without surrounding
spaces), which is every spec the code writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from featurize.color import COLOR_CONSTANCY
from lesionlab.errors import LesionLabError

TTA_MODES = ("none", "flip", "d4")
POOL_MODES = ("avg", "multistage")
WORDS = tuple(dict.fromkeys(TTA_MODES + POOL_MODES + COLOR_CONSTANCY))  # option words

CLASSICAL_SOURCE = "classical"  # featurize.backbones.CLASSICAL (not imported: it loads torch)
OOF_PREFIX = "oof:"
# what a block reads: an ImageNet (timm) backbone's embedding, the hand-made features, a
# fine-tuned network's embedding, or a K-fold ensemble's out-of-fold probabilities
KINDS = ("backbone", "classical", "finetuned", "oof")
GRAMMAR = ("features := block{+block}; block := oof:NAME | SOURCE[:option{,option}]; "
           f"option := one of {list(WORDS)}, HxW (image size) or w<first 8 hex digits of the "
           f"weights sha256>")

_SIZE = re.compile(r"(\d+)x(\d+)")
_WEIGHTS = re.compile(r"w([0-9a-f]{8})")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a model folder name (lesionlab.cli.NAME_PATTERN, no '+')


@dataclass(frozen=True)
class FeatureBlock:
    """One block of a ``--features`` spec.

    Attributes:
        kind: one of ``KINDS``.
        source: the backbone name, ``classical``, the fine-tuned folder's path or cache key,
            or (``oof``) the K-fold ensemble's folder name.
        options: the validated options in written order (none for ``oof``).
    """

    kind: str
    source: str
    options: tuple[str, ...] = ()

    @property
    def words(self) -> frozenset[str]:
        """The TTA, pooling and colour-constancy words among the options."""
        return frozenset(o for o in self.options if o in WORDS)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) in pixels from an ``HxW`` option, or None."""
        found = [_SIZE.fullmatch(o) for o in self.options]
        return next(((int(m[1]), int(m[2])) for m in found if m), None)

    @property
    def weights(self) -> str | None:
        """The first 8 hex digits of the weights' sha256 from a ``w<hex8>`` option, or None."""
        found = [_WEIGHTS.fullmatch(o) for o in self.options]
        return next((m[1] for m in found if m), None)

    @property
    def finetuned_folder(self) -> Path | None:
        """The fine-tuned network's model folder when the source is an existing one."""
        path = Path(self.source)
        return path if self.kind == "finetuned" and path.is_dir() else None

    def text(self) -> str:
        """The block as written in a spec."""
        if self.kind == "oof":
            return OOF_PREFIX + self.source
        return self.source + (":" + ",".join(self.options) if self.options else "")

    def to_dict(self) -> dict:
        """``{"kind", "source", "options": [...]}`` (JSON: result rows)."""
        return {"kind": self.kind, "source": self.source, "options": list(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureBlock:
        """Inverse of :meth:`to_dict`.

        Raises:
            LesionLabError: the fields do not make a valid block.
        """
        block = cls(str(data["kind"]), str(data["source"]), tuple(data.get("options", ())))
        if parse_block(block.text()) != block:
            raise LesionLabError(f"feature block {data!r} is not valid; grammar: {GRAMMAR}")
        return block


def source_kind(source: str) -> str:
    """The kind of a non-``oof`` block from its source: ``classical`` (or a classical cache
    key), ``finetuned`` (a fine-tuned model folder: a path or a name holding ``finetune__``,
    or its ``ft_`` cache key), else ``backbone``."""
    if source == CLASSICAL_SOURCE or source.startswith(CLASSICAL_SOURCE + "-"):
        return "classical"
    if source.startswith("ft_") or "finetune__" in Path(source).name:
        return "finetuned"
    return "backbone"


def _bad(spec: str, part: str, why: str) -> LesionLabError:
    return LesionLabError(f"--features {spec!r}: {why} in {part!r}; grammar: {GRAMMAR}")


def _check_options(spec: str, block: str, options: list[str]) -> None:
    """Raises: LesionLabError: an empty or unknown option, or two image sizes / weights."""
    for opt in options:
        if not opt:
            raise _bad(spec, block, "empty option")
        if not (opt in WORDS or _SIZE.fullmatch(opt) or _WEIGHTS.fullmatch(opt)):
            raise _bad(spec, block, f"unknown option {opt!r}")
    for pattern, what in ((_SIZE, "image sizes"), (_WEIGHTS, "weights prefixes")):
        if sum(bool(pattern.fullmatch(o)) for o in options) > 1:
            raise _bad(spec, block, f"two {what}")


def parse_block(text: str, spec: str | None = None) -> FeatureBlock:
    """One block (``oof:NAME`` or ``SOURCE[:options]``) -> FeatureBlock.

    Raises:
        LesionLabError: an empty block or source, an ``oof:`` block with options or a name
            that is not a model folder name, or a bad option (see :data:`GRAMMAR`).
    """
    spec = text if spec is None else spec
    block = text.strip()
    if not block:
        raise _bad(spec, text, "empty block")
    if block.startswith(OOF_PREFIX):
        name = block[len(OOF_PREFIX):]
        if not _NAME.fullmatch(name):
            raise _bad(spec, block, "oof: takes one K-fold ensemble folder name and no options")
        return FeatureBlock("oof", name)
    source, colon, opts = block.partition(":")
    source = source.strip()
    if not source:
        raise _bad(spec, block, "empty source")
    options = [o.strip() for o in opts.split(",")] if colon else []
    _check_options(spec, block, options)
    return FeatureBlock(source_kind(source), source, tuple(options))


def parse_features(text: str) -> tuple[FeatureBlock, ...]:
    """A ``--features`` spec -> its blocks, in order.

    Raises:
        LesionLabError: the spec is empty or a block is malformed; the message names the bad
            part and the grammar.
    """
    if not isinstance(text, str) or not text.strip():
        raise LesionLabError(f"empty --features {text!r}; grammar: {GRAMMAR}")
    return tuple(parse_block(part, text) for part in text.split("+"))


def format_features(blocks: Iterable[FeatureBlock]) -> str:
    """Blocks -> the spec string (inverse of :func:`parse_features`).

    Raises:
        LesionLabError: no blocks.
    """
    blocks = list(blocks)
    if not blocks:
        raise LesionLabError(f"a --features spec needs at least one block; grammar: {GRAMMAR}")
    return "+".join(b.text() for b in blocks)


def as_blocks(features: str | Iterable[FeatureBlock]) -> tuple[FeatureBlock, ...]:
    """A spec string parsed, or blocks passed through (callers accept either)."""
    return parse_features(features) if isinstance(features, str) else tuple(features)
