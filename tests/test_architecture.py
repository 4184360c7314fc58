"""The rooms of tokopt are layered by a tool, not by memory: import-linter's contracts in pyproject.toml.

cli > jobs > report > measure > passes | frontends | backends > plugins > optimizer > errors, and inside
the optimizer ir < interpret < manager.  Function-local imports count; a broken contract fails the suite
with the offending import chain in the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import tokopt

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(capsys):
    lint = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    code = lint.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_public_api_is_what_the_readme_documents():
    readme = (ROOT / "README.md").read_text()
    for name in tokopt.__all__:
        assert f"tokopt.{name}" in readme or name == "__version__", f"tokopt.{name} is exported but not documented"
