"""Reading compiled HLO text in tests: its computations and the data dependencies between instructions."""

from __future__ import annotations

import re

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_NAME = re.compile(r"%([\w.\-]+)")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """Compiled HLO text split into {computation name: its lines}, plus the entry's name."""
    comps, cur, entry = {}, None, None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            cur = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[cur] = []
            entry = cur if line.startswith("ENTRY") else entry
        elif cur is not None:
            comps[cur].append(line)
    return comps, entry


def instructions(lines: list[str]) -> dict[str, tuple[str, set[str]]]:
    """One computation's instructions: {name: (its line, the names of its operands)}."""
    parsed = {m.group(1): m.group(2) for line in lines if (m := _INSTRUCTION.match(line))}
    return {name: (rhs, {n for n in _NAME.findall(rhs) if n in parsed and n != name})
            for name, rhs in parsed.items()}


def ancestors(insts: dict[str, tuple[str, set[str]]], name: str) -> set[str]:
    """Every instruction ``name`` depends on, directly or not."""
    seen, todo = set(), list(insts[name][1])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(insts[n][1])
    return seen


def matmuls(comps: dict[str, list[str]], insts: dict[str, tuple[str, set[str]]]) -> list[str]:
    """The instructions of ``insts`` that multiply matrices: a ``dot``, or a fusion of one (XLA:CPU
    wraps its matmuls in fusions, e.g. ``ynn_fusion``)."""
    with_dot = {name for name, lines in comps.items() if any(" dot(" in line for line in lines)}

    def calls_dot(rhs: str) -> bool:
        called = re.search(r"calls=%([\w.\-]+)", rhs)
        return called is not None and called.group(1) in with_dot

    return [name for name, (rhs, _) in insts.items() if " dot(" in rhs or (" fusion(" in rhs and calls_dot(rhs))]


def custom_calls(insts: dict[str, tuple[str, set[str]]], target: str) -> list[str]:
    """The custom calls of ``insts`` whose target contains ``target`` after a prefix (``geqrf`` finds
    ``lapack_sgeqrf_ffi``)."""
    return [name for name, (rhs, _) in insts.items() if re.search(rf'custom_call_target="\w*{target}', rhs)]
