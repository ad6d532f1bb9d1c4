"""Where the tests find the reference implementations, which the repository does not contain.

"The reference implementations" are the two PyTorch optimizers this project reproduces, as published
(code and usage examples, in the documents the project started from): the SOAP class of Vyas et al.
(``001_5ab0d411e69aa167.txt``) and a from-scratch Sophia class with its two example scripts
(``000_8e79b5adb9178ad8.txt``). Their code is never copied into the repository: the tests that compare
against them load it at run time from the folder named by ``$SO_OPTAX_REFERENCE_DIR`` (in the development
checkout, the ``shared/seeds`` folder beside the repository), and skip, saying what they check, without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "SO_OPTAX_REFERENCE_DIR"
SOAP_DOC = "001_5ab0d411e69aa167.txt"
SOPHIA_DOC = "000_8e79b5adb9178ad8.txt"


def reference_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(__file__).resolve().parents[1].parent / "shared" / "seeds"


def reference_document(name: str, checks: str) -> Path:
    """The reference document ``name``, or a skip whose message says what the test ``checks`` and how to run it."""
    path = reference_dir() / name
    if not path.is_file():
        pytest.skip(
            f"needs the reference implementation ({name}, not part of this repository) to check {checks}; "
            f"set {ENV} to a folder that holds it to run this test"
        )
    return path
