"""The examples of docs/distributed-jax.md run as written (in this 8-device process)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

_DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed-jax.md"


def test_full_fsdp_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _DOC.read_text(), flags=re.S)
    exec(compile(blocks[0], str(_DOC), "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert "float32[32@fsdp,32]" in out and "loss after restoring onto 4 devices" in out


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Distributed training (JAX)", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    scope = {"__name__": "__readme_example__"}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["state"][0].count == 1 and len(scope["state"][0].factors["w"][0].sharding.device_set) == 8
