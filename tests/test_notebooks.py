"""The demo notebooks of `demos/`: stored without outputs, equal to what
`scripts/make_notebooks.py` writes, Colab-ready (install cell, one-line model switch), and
executed end to end on the demo model by a "python3" Jupyter kernel."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
DEMOS = REPO / "demos"
DEMO_MODEL_CONFIG = REPO / "moe_hooked" / "assets" / "demo_model" / "config.json"
CELL_TIMEOUT = 120
"""Seconds one cell may run; the slowest cell (perplexity vs top-k', four passes) takes seconds."""


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
NAMES = list(GENERATOR.NOTEBOOKS)


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(DEMOS / name, as_version=4)


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_demos_folder_holds_exactly_the_generated_notebooks():
    assert sorted(path.name for path in DEMOS.glob("*.ipynb")) == sorted(NAMES)
    assert len(NAMES) == 5


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    for cell in _code_cells(notebook):
        assert cell.outputs == [], f"{name}: a code cell has stored outputs: {cell.source[:60]!r}"
        assert cell.execution_count is None, f"{name}: a code cell has an execution count: {cell.source[:60]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_equals_what_the_generator_writes(name):
    stored = json.loads((DEMOS / name).read_text(encoding="utf-8"))
    generated = json.loads(nbformat.writes(GENERATOR.build(name, GENERATOR.NOTEBOOKS[name])))
    assert stored == generated, f"demos/{name} differs from scripts/make_notebooks.py: run the script"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_opens_with_title_install_and_config(name):
    title, install, config = _read(name).cells[:3]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    lines = [line.strip() for line in install.source.splitlines()]
    # pip runs only in the except branch of the import, i.e. when moe_hooked is not importable
    assert lines.index("try:") < lines.index("import moe_hooked") < lines.index("except ImportError:")
    assert lines.index("except ImportError:") < lines.index("%pip install --quiet {source}")
    assert 'MOE_HOOKED_SOURCE = ""' in lines
    config_lines = config.source.splitlines()
    assert any(line.startswith('MODEL, DTYPE, DEVICE = "moe-hooked/demo"') for line in config_lines)
    assert '# MODEL, DTYPE, DEVICE = "allenai/OLMoE-1B-7B-0924", torch.bfloat16, "cuda"' in config_lines


@pytest.mark.skipif(
    not DEMO_MODEL_CONFIG.is_file(),
    reason=f"the demo model is absent ({DEMO_MODEL_CONFIG} does not exist): train it with "
    "scripts/train_demo_model.py, then the notebooks run on it",
)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_end_to_end_on_the_demo_model(name, monkeypatch):
    if name in GENERATOR.REQUIRES:  # e.g. sae-lens, an optional extra
        pytest.importorskip(GENERATOR.REQUIRES[name])
    # the kernel imports this checkout's moe_hooked, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = _read(name)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(DEMOS)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    code = _code_cells(notebook)
    assert all(cell.execution_count is not None for cell in code)
    install_output = "".join(output.get("text", "") for output in code[0].outputs)
    assert "installing moe_hooked" not in install_output, "the install cell ran pip although moe_hooked is importable"
    for cell in code:  # figures display as images, circuitsvis views and the expert-lens grid as HTML
        shown = {mime for output in cell.outputs for mime in output.get("data", {})}
        if "_figure(" in cell.source:
            assert "image/png" in shown, f"{name}: no image shown by {cell.source[:70]!r}"
        if "_view(" in cell.source or "ExpertLensGrid(" in cell.source:
            assert "text/html" in shown, f"{name}: no HTML shown by {cell.source[:70]!r}"
