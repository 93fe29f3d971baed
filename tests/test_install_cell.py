"""The notebooks' install cell installs moe_hooked only from a source the user sets (a git URL,
a wheel or a local checkout), stops with a clear message when none is set, and never installs a
bare package name. The cell is run as IPython would run it, with `%pip` recorded, not executed."""

from __future__ import annotations

import builtins
import importlib.util
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

REPO = Path(__file__).resolve().parents[1]


def _install_source() -> str:
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.INSTALL


INSTALL = _install_source()


class FakeIPython:
    """Records line magics, with `{name}` expanded from the cell's namespace as IPython does."""

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.magics = []

    def run_line_magic(self, name, line, _stack_depth=1):
        self.magics.append(f"%{name} {line.format(**self.namespace)}")


def run_install_cell(monkeypatch, source: str, importable: bool) -> list[str]:
    """Run the install cell with MOE_HOOKED_SOURCE = `source`; returns the magics it ran."""
    code = TransformerManager().transform_cell(INSTALL.replace('MOE_HOOKED_SOURCE = ""', f"MOE_HOOKED_SOURCE = {source!r}"))
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "moe_hooked" and not (importable or shell.magics):
            raise ImportError("No module named 'moe_hooked'")
        return real_import(name, *args, **kwargs)

    namespace = {"__name__": "__cell__"}
    shell = FakeIPython(namespace)
    namespace["get_ipython"] = lambda: shell
    monkeypatch.setattr(builtins, "__import__", fake_import)
    exec(compile(code, "install cell", "exec"), namespace)
    return shell.magics


def test_the_cell_sets_no_source_by_default():
    assert 'MOE_HOOKED_SOURCE = ""' in INSTALL.splitlines()
    assert "%pip install --quiet {source}" in INSTALL


def test_nothing_is_installed_when_moe_hooked_is_importable(monkeypatch):
    assert run_install_cell(monkeypatch, "", importable=True) == []


def test_without_a_source_the_cell_stops_and_says_what_to_set(monkeypatch):
    with pytest.raises(RuntimeError, match="moe_hooked is not installed: set MOE_HOOKED_SOURCE in this cell to a git URL"):
        run_install_cell(monkeypatch, "  ", importable=False)


@pytest.mark.parametrize("bare", ["moe_hooked", "moe-hooked", "moe_hooked==0.1.0"])
def test_a_bare_package_name_is_refused(monkeypatch, tmp_path, bare):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="neither a URL nor an existing file or folder; a bare name"):
        run_install_cell(monkeypatch, bare, importable=False)


def test_a_git_url_a_wheel_or_a_checkout_is_installed(monkeypatch, tmp_path):
    url = "git+https://github.com/example/moe_hooked@v0.1.0"
    wheel = tmp_path / "moe_hooked-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    for source in (url, str(wheel), str(REPO)):
        assert run_install_cell(monkeypatch, source, importable=False) == [f"%pip install --quiet {source}"]
    monkeypatch.chdir(tmp_path)  # a relative path is passed to pip as an absolute one, never as a name
    assert run_install_cell(monkeypatch, wheel.name, importable=False) == [f"%pip install --quiet {wheel}"]
