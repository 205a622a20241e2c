"""The install: every sub-package of fsdpqlora/ and every group directory of conf/ is declared a
package in pyproject.toml, so that a wheel or `pip install -e .` carries it (and setuptools has
nothing to warn about)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[2]


def test_every_conf_group_is_a_declared_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = {p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "__pycache__"}
    declared = {name.removeprefix("fsdpqlora.conf.") for name in setuptools["packages"] if name.startswith("fsdpqlora.conf.")}
    assert declared == groups
    assert setuptools["package-dir"] == {"fsdpqlora.conf": "conf"}


def test_every_sub_package_is_a_declared_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "fsdpqlora").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    conf = {name for name in setuptools["packages"] if name == "fsdpqlora.conf" or name.startswith("fsdpqlora.conf.")}
    assert found == set(setuptools["packages"]) - conf
