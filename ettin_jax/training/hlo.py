"""The collectives of a compiled program, read from its HLO text (`compiled.as_text()`).

One `Collective` per collective instruction: its kind (all-reduce, all-gather, reduce-scatter,
all-to-all, collective-permute; an async start/done pair counts once, as its kind), the
element type and bytes of its result, and whether it runs inside a while loop (a `lax.scan`,
e.g. the microbatch loop of the train step) -- that is, whether its computation is reachable
from a while loop's body or condition. Tests and benchmarks use it to check where gradients are
reduced and in which dtype weights are gathered.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: `kind` (one of KINDS), result element `dtype`
    ("bf16", "f32", ...; the first array of a tuple result), result `bytes` (all arrays of
    the result), `shapes` of the result arrays, and `in_loop` (inside a while loop)."""

    kind: str
    dtype: str
    bytes: int
    shapes: tuple[tuple[int, ...], ...]
    in_loop: bool
    computation: str


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(shape_text) if dtype in _BYTES]


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for dtype, dims in arrays:
        size = _BYTES[dtype]
        for d in dims:
            size *= d
        total += size
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the HLO module `hlo_text`, in text order. An async collective is
    read from its `-done` instruction (the result); `-start` instructions are skipped."""
    computation = None
    found: list[tuple[str, str, list, str]] = []
    calls: dict[str, set[str]] = {}
    loops: set[str] = set()
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            calls.setdefault(computation, set())
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction or computation is None:
            continue
        shape, opcode, rest = instruction.groups()
        for called in _CALLED.findall(rest):
            names = {n.strip().lstrip("%") for n in called.strip("{}").split(",") if n.strip()}
            calls[computation] |= names
            if opcode == "while":
                loops |= names
        if opcode.endswith("-start"):
            continue
        kind = opcode.removesuffix("-done")
        if opcode == "fusion" and re.search(r"calls=%?all-reduce-scatter", rest):
            kind = "reduce-scatter"
        if kind in KINDS and not computation.startswith("all-reduce-scatter"):
            found.append((kind, shape, _arrays(shape), computation))
    in_loop = set()
    frontier = list(loops)
    while frontier:
        name = frontier.pop()
        if name not in in_loop:
            in_loop.add(name)
            frontier.extend(calls.get(name, ()))
    return [Collective(kind, arrays[0][0] if arrays else "", _nbytes(arrays),
                       tuple(dims for _, dims in arrays), comp in in_loop, comp)
            for kind, _, arrays, comp in found]


def summary(found: list[Collective]) -> dict[str, dict[str, int]]:
    """{"<kind> <dtype> <in loop|after loop>": {"count": n, "bytes": total}} of `found`,
    e.g. for a benchmark table."""
    counts: Counter = Counter()
    sizes: Counter = Counter()
    for c in found:
        key = f"{c.kind} {c.dtype} {'in loop' if c.in_loop else 'outside loops'}"
        counts[key] += 1
        sizes[key] += c.bytes
    return {key: {"count": counts[key], "bytes": sizes[key]} for key in sorted(counts)}
