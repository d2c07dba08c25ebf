"""The README is a quickstart that works: its two commands first, its Python example runs as
written, every page it links exists, and it stays short (the measurements live in docs/)."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_stays_short():
    head = README.splitlines()[:10]
    assert any(line.startswith("make export BACKBONE=resnet") for line in head), head
    assert any(line.startswith("make test") for line in head), head
    assert len(README.splitlines()) <= 150


def test_every_linked_page_exists():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert missing == []
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", README))
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")}, "a docs page the README does not link"


@pytest.mark.slow
@pytest.mark.xdist_group("readme")
def test_the_readme_python_example_runs_as_written(tmp_path):
    """The README's Python block, verbatim, in a fresh process: a full-size ResNet-18 exported
    (every file verified by the export itself), loaded and called."""
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code += "\nassert result.ok and logits.shape == (4, 10) and features.shape == (4, 512)\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert (tmp_path / "artifacts" / "resnet18" / "manifest.json").is_file()
