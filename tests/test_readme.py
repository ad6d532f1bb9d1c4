"""README.md is a user's document whose examples run as written.

Every ```python block runs in a fresh interpreter, in an empty folder (so it can import only what an
installed so-optax offers), unless the line before it is an HTML comment ``<!-- not run: why -->`` (a
fragment, e.g. methods of a class). The README stays within its length budget, and every relative link
points at a file of the repository (no paths outside it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES = 260


def _python_blocks() -> list[tuple[str, str]]:
    """(the section heading above it, code) of every README python block that is meant to run."""
    blocks, heading = [], "top"
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        if line.strip() == "```python":
            end = lines.index("```", i + 1)
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if not previous.startswith("<!-- not run"):
                blocks.append((heading, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


BLOCKS = _python_blocks()


def test_the_readme_has_runnable_jax_and_pytorch_examples():
    code = "\n".join(c for _, c in BLOCKS)
    assert "import so_optax" in code and "from torch_bridge import" in code


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[h for h, _ in BLOCKS])
def test_python_block_runs_as_written(code, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "an example left files behind"


def test_length_and_links_stay_inside_the_repository():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    links = re.findall(r"\]\(([^)]+)\)", text)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://|#", link)]
    assert local and all((REPO / link).exists() for link in local), local
    assert not [link for link in local if link.startswith(("/", ".."))]
    assert "../" not in text and "/work/" not in text
