"""The distribution installs llmexec.* only, and lists every package folder."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    roots = project["package-dir"]
    found = set()
    for package, folder in roots.items():
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found == listed
    assert all(name == "llmexec" or name.startswith("llmexec.") for name in listed)


def test_layout_imports_as_llmexec():
    import llmexec.kernels
    import llmexec.loader
    import llmexec.runner
    import llmexec.scheduler

    assert Path(llmexec.loader.__file__).parent == REPO / "services" / "loader"
    assert Path(llmexec.runner.__file__).parent == REPO / "services" / "runner"
    assert Path(llmexec.scheduler.__file__).parent == REPO / "services" / "scheduler"
    assert Path(llmexec.kernels.__file__).parent == REPO / "kernels"
