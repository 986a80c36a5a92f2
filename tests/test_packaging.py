"""What the wheel holds: every part of the package, the kernels as nmoe_serve.kernels (never a
bare top-level `kernels`, which would collide with the PyPI package transformers uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_folder_of_the_package_is_a_package() -> None:
    """setuptools' find (pyproject.toml) takes only folders with an __init__.py."""
    folders = {p.parent for p in (REPO / "nmoe_serve").rglob("*.py")}
    assert folders and all((folder / "__init__.py").is_file() for folder in folders), sorted(
        str(f) for f in folders if not (f / "__init__.py").is_file()
    )


def test_the_kernels_install_under_the_projects_name() -> None:
    link = REPO / "nmoe_serve" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()
    setuptools = pytest.importorskip("setuptools")
    found = set(setuptools.find_packages(where=str(REPO), include=["nmoe_serve*"]))
    assert {"nmoe_serve.kernels", "nmoe_serve.serve", "nmoe_serve.frontend", "nmoe_serve.engine"} <= found
    assert not any(name == "kernels" or name.startswith("kernels.") for name in found)
