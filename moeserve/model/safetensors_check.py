"""A safetensors file's header, parsed and checked before the file is handed to safetensors.

The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (per tensor its
`dtype`, `shape` and `data_offsets` into the data section; an optional `__metadata__` of
strings), then the data section, which the tensors must cover exactly. safetensors' own errors
name no tensor, or the neighbour of the broken one; these checks name the file and the tensor.
They read the header only, never tensor data, so they cost next to nothing before a load.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors refuses longer headers (its MAX_HEADER_SIZE): a larger length is corruption.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of each dtype safetensors knows; F4 and F6 pack several into a byte.
DTYPE_BITS: dict[str, int] = {
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 8),
    **dict.fromkeys(("F8_E4M3FNUZ", "F8_E5M2FNUZ"), 8),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 16),
    **dict.fromkeys(("I32", "U32", "F32"), 32),
    **dict.fromkeys(("C64", "F64", "I64", "U64"), 64),
}

# Where a tensor's entry opens in the header text: "name": {
_ENTRY_OPENING = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*\{')


class HeaderError(ValueError):
    """A malformed safetensors header, or one the file disagrees with; names file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; begin and end count from the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _DuplicateKey(Exception):
    pass


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file by name, in header order, once every check passed."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(
                    f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)"
                )
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise HeaderError(
                    f"{path}: header length {length} exceeds safetensors' limit of "
                    f"{MAX_HEADER_BYTES} bytes: corrupt file"
                )
            if 8 + length > size:
                raise HeaderError(
                    f"{path}: header length {length} runs past the end of the file "
                    f"({size} bytes): truncated or corrupt"
                )
            raw = f.read(length)
    except OSError as e:
        raise HeaderError(f"{path}: cannot read the safetensors header ({e})") from e
    header = _parse(path, raw)
    entries = [_entry(path, name, info) for name, info in header.items() if name != "__metadata__"]
    _check_layout(path, entries, size - 8 - length)
    return {e.name: e for e in entries}


def _near(text_before_error: str) -> str:
    # A parse error names a position; the last entry opened before it says which tensor.
    names = _ENTRY_OPENING.findall(text_before_error)
    if not names:
        return ""
    if names[-1] == "__metadata__":
        return ", in or after __metadata__"
    return f", in or after the entry of tensor '{names[-1]}'"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        near = _near(raw[: e.start].decode("utf-8", "replace"))
        raise HeaderError(
            f"{path}: header is not valid UTF-8 (byte {8 + e.start} of the file{near})"
        ) from e
    if not text.startswith("{"):
        raise HeaderError(f"{path}: header is not a JSON object (it starts with {text[:20]!r})")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        at = 8 + len(text[: e.pos].encode("utf-8"))
        raise HeaderError(
            f"{path}: header is not valid JSON ({e.msg} at byte {at} of the file"
            f"{_near(text[: e.pos])})"
        ) from e
    except _DuplicateKey as e:
        raise HeaderError(f"{path}: header has the key '{e.args[0]}' twice") from e
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError(f"{path}: header __metadata__ must map strings to strings")
    return header


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info: Any) -> TensorEntry:
    """One tensor's entry, checked on its own: types, and bytes that match shape and dtype."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict):
        raise HeaderError(f"{where}: header entry must be an object, got {info!r}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise HeaderError(f"{where}: header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(
            f"{where}: unknown dtype {dtype!r} (safetensors dtypes: {', '.join(DTYPE_BITS)})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise HeaderError(
            f"{where}: data_offsets must be two non-negative integers, got {offsets!r}"
        )
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise HeaderError(f"{where}: shape {shape} of {dtype} is not a whole number of bytes")
    if end - begin != bits // 8:
        raise HeaderError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
            f"{shape} of {dtype} needs {bits // 8}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: list[TensorEntry], data_size: int) -> None:
    """The entries must tile the data section: nothing past its end, no overlap, no hole."""
    ordered = sorted(entries, key=lambda t: (t.begin, t.end, t.name))
    for e in ordered:
        if e.end > data_size:
            raise HeaderError(
                f"{path}: tensor '{e.name}' data_offsets [{e.begin}, {e.end}] end past the data "
                f"section ({data_size} bytes): the file is truncated or the offsets are wrong"
            )
    begins = Counter(t.begin for t in entries)
    ends = Counter(t.end for t in entries)

    def misfit(t: TensorEntry) -> int:
        # Ends that meet no other tensor's: a tensor whose offsets were moved misses on both
        # sides, its neighbours on one, so it is the one an overlap message leads with.
        empty = t.begin == t.end
        return (t.begin != 0 and ends[t.begin] - empty < 1) + (
            t.end != data_size and begins[t.end] - empty < 1
        )

    for prev, e in zip(ordered, ordered[1:]):
        if e.begin < prev.end:
            first, second = (prev, e) if misfit(prev) > misfit(e) else (e, prev)
            raise HeaderError(
                f"{path}: tensor '{first.name}' data_offsets [{first.begin}, {first.end}] "
                f"overlap tensor '{second.name}' [{second.begin}, {second.end}]"
            )
    pos, last = 0, None
    for e in ordered:
        if e.begin > pos:
            after = f"after tensor '{last.name}'" if last else "at the start of the data"
            raise HeaderError(
                f"{path}: tensor '{e.name}' data_offsets [{e.begin}, {e.end}] leave bytes "
                f"[{pos}, {e.begin}) {after} to no tensor (safetensors allows no holes)"
            )
        pos, last = e.end, e
    if pos != data_size:
        after = f"after tensor '{last.name}'" if last else "and the header lists no tensor"
        raise HeaderError(
            f"{path}: the data section holds {data_size} bytes but the tensors end at byte "
            f"{pos}: bytes [{pos}, {data_size}) {after} belong to no tensor"
        )
