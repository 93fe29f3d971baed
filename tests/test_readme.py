"""Every Python example in the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SHARED = README.parent.parent / "shared"
"""The data beside the repository, which examples read as ../shared (paths from the repository root)."""


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    if "sae_lens" in EXAMPLES[index]:  # the [sae] extra
        pytest.importorskip("sae_lens")
    matplotlib.use("Agg")
    workdir = tmp_path
    if "../shared/" in EXAMPLES[index]:  # run beside a link to the data, as from the repository root
        if not SHARED.is_dir():
            pytest.skip(f"the example reads ../shared, which is not at {SHARED}")
        (tmp_path / "shared").symlink_to(SHARED)
        workdir = tmp_path / "repository"
        workdir.mkdir()
    monkeypatch.chdir(workdir)
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})
