"""README's Layout section names every module of the five packages, and only modules that exist."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

PACKAGES = ("lesionlab", "featurize", "models", "serve", "benchmarks")
MODULE = re.compile(r"`((?:%s)/\w+\.py)`" % "|".join(PACKAGES))


def layout_section(readme: str) -> str:
    """The text of the ``## Layout`` section, up to the next ``## `` heading."""
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    if match is None:
        raise AssertionError("README.md has no '## Layout' section")
    return match.group(1)


def named_modules(readme: str) -> set[str]:
    """The ``package/module.py`` paths the Layout section names (in backquotes)."""
    return set(MODULE.findall(layout_section(readme)))


def modules_on_disk() -> set[str]:
    """Every ``.py`` file directly inside a package."""
    return {f"{package}/{path.name}" for package in PACKAGES
            for path in (ROOT / package).glob("*.py")}


def test_layout_names_every_module_and_only_existing_ones() -> None:
    named = named_modules((ROOT / "README.md").read_text(encoding="utf-8"))
    on_disk = modules_on_disk()
    assert sorted(on_disk - named) == [], "modules missing from README's Layout"
    assert sorted(named - on_disk) == [], "README's Layout names modules that do not exist"


def test_every_module_line_says_what_it_holds() -> None:
    section = layout_section((ROOT / "README.md").read_text(encoding="utf-8"))
    lines = [line for line in section.splitlines() if MODULE.match(line.removeprefix("- "))]
    assert len(lines) == len(modules_on_disk())
    assert all(len(line.split("`: ", 1)[-1]) > 10 for line in lines)


def test_the_modules_on_disk_are_found() -> None:
    on_disk = modules_on_disk()
    assert {"lesionlab/metrics.py", "models/folder.py", "serve/app.py",
            "benchmarks/run_all.py", "featurize/extract.py"} <= on_disk
    assert len(on_disk) > 50


@pytest.mark.parametrize(("readme", "missing", "extra"), [
    ("## Layout\n- `models/folder.py`: kinds.\n- `models/gone.py`: nothing.\n## Next\n"
     "- `lesionlab/metrics.py`: outside the section.\n", {"lesionlab/metrics.py"},
     {"models/gone.py"}),
    ("## Layout\n- `lesionlab/metrics.py`: metrics.\n- `models/folder.py`: kinds.\n", set(),
     set()),
])
def test_a_planted_layout_is_checked(readme: str, missing: set[str], extra: set[str]) -> None:
    on_disk = {"lesionlab/metrics.py", "models/folder.py"}
    named = named_modules(readme)
    assert on_disk - named == missing
    assert named - on_disk == extra


def test_a_readme_without_layout_fails() -> None:
    with pytest.raises(AssertionError, match="no '## Layout' section"):
        named_modules("# lesionlab\n## Architecture\n- `models/folder.py`\n")
