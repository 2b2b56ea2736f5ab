"""The documentation's code runs as written: every Python block of README.md and docs/ (the blocks that talk to an
endpoint run in tests/test_serve.py, against a real one)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(needs_endpoint: bool) -> list[tuple[str, str]]:
    """(page:line, code) of every ```python block, those that call an endpoint or the others."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
            if ("OpenAI(" in match[1]) == needs_endpoint:
                line = text[: match.start()].count("\n") + 1
                blocks.append((f"{page.relative_to(ROOT)}:{line}", match[1]))
    return blocks


def run_block(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("where, code", python_blocks(needs_endpoint=False), ids=lambda v: v if ":" in v else "")
def test_a_python_block_of_the_docs_runs_as_written(where, code, tmp_path):
    run = run_block(code, tmp_path)
    assert run.returncode == 0, f"{where} fails:\n{run.stderr[-3000:]}"


def test_every_page_with_python_is_covered():
    """The collector sees the pages' blocks (a renamed fence would silently skip them)."""
    found = {where.split(":")[0] for where, _ in python_blocks(False) + python_blocks(True)}
    assert {"README.md", "docs/python-api.md", "docs/serving.md"} <= found


def test_the_configuration_page_lists_every_option_as_the_configs_define_it():
    from jobs.configuration_page import page

    assert (ROOT / "docs" / "configuration.md").read_text() == page(), "run `make docs/configuration.md`"
