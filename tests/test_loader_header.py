"""Corrupt safetensors headers: every message names the file and, where there is one, the tensor.

Each test edits the header of a real tiny checkpoint (written by transformers) and leaves the
data section as it was, or cuts the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moeserve.model.loader import CheckpointError, load_model
from tests.checkpoints import make_checkpoint
from tests.test_loader import _copy, _load_error

# Mid-file in the single-shard Mixtral checkpoint: F32 [48, 32], 6144 bytes.
NAME = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
OTHER = "model.layers.1.block_sparse_moe.experts.1.w1.weight"  # same shape and dtype


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "mixtral", "mixtral")


def _split(file: Path) -> tuple[dict[str, Any], bytes]:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(file: Path, header: dict[str, Any] | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def _with_header(mixtral: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """The load error once `edit` has changed the header in place."""
    path = _copy(mixtral, tmp_path / "c")
    header, body = _split(path / "model.safetensors")
    edit(header)
    _join(path / "model.safetensors", header, body)
    return _load_error(path)


def _offsets(mixtral: Path, name: str) -> list[int]:
    return _split(mixtral / "model.safetensors")[0][name]["data_offsets"]


# A far move (past whole tensors) is the case safetensors blames on the neighbour.
@pytest.mark.parametrize("shift", [16, -16, 3 * 6144 + 16])
def test_moved_offsets_name_the_moved_tensor(mixtral: Path, tmp_path: Path, shift: int) -> None:
    begin, end = _offsets(mixtral, NAME)

    def move(h: dict[str, Any]) -> None:
        h[NAME]["data_offsets"] = [begin + shift, end + shift]

    msg = _with_header(mixtral, tmp_path, move)
    # The moved tensor is the subject, not its neighbour (safetensors names the neighbour).
    assert (
        f"model.safetensors: tensor '{NAME}' data_offsets [{begin + shift}, {end + shift}]" in msg
    )
    assert "overlap" in msg


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "dtype",
            "BF16",
            "data_offsets [{b}, {e}] hold 6144 bytes but shape [48, 32] of BF16 needs 3072",
        ),
        ("shape", [48, 16], "hold 6144 bytes but shape [48, 16] of F32 needs 3072"),
        ("shape", [48, 32, 2], "shape [48, 32, 2] of F32 needs 12288"),
        ("dtype", "F33", "unknown dtype 'F33'"),
        ("shape", [48, -32], "shape must be a list of non-negative integers"),
        ("shape", "48x32", "shape must be a list of non-negative integers"),
        ("data_offsets", [0], "data_offsets must be two non-negative integers"),
        ("data_offsets", "reversed", "end before they begin"),
    ],
)
def test_entry_disagrees_with_its_bytes(
    mixtral: Path, tmp_path: Path, field: str, value: Any, expected: str
) -> None:
    begin, end = _offsets(mixtral, NAME)

    def change(h: dict[str, Any]) -> None:
        h[NAME][field] = [end, begin] if value == "reversed" else value

    msg = _with_header(mixtral, tmp_path, change)
    assert f"model.safetensors: tensor '{NAME}'" in msg
    assert expected.format(b=begin, e=end) in msg


def test_non_float_dtype_of_the_same_size(mixtral: Path, tmp_path: Path) -> None:
    # A valid header whose dtype the model cannot use: the loader's own check names it.
    msg = _with_header(mixtral, tmp_path, lambda h: h[NAME].update(dtype="I32"))
    assert f"tensor '{NAME}' has dtype I32" in msg and "model.safetensors" in msg


def test_overlapping_tensors(mixtral: Path, tmp_path: Path) -> None:
    other = _offsets(mixtral, OTHER)
    msg = _with_header(mixtral, tmp_path, lambda h: h[NAME].update(data_offsets=other))
    assert "overlap" in msg and NAME in msg and OTHER in msg and "model.safetensors" in msg


def test_truncated_file_names_the_cut_tensor(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = _offsets(mixtral, NAME)
    (path / "model.safetensors").write_bytes(data[: 8 + n + begin + 100])
    msg = _load_error(path)
    assert f"model.safetensors: tensor '{NAME}' data_offsets [{begin}, {end}]" in msg
    assert f"data section ({begin + 100} bytes)" in msg and "truncated" in msg


def test_bytes_after_the_last_tensor(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    header, body = _split(path / "model.safetensors")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    _join(path / "model.safetensors", header, body + bytes(64))
    msg = _load_error(path)
    assert f"after tensor '{last}' belong to no tensor" in msg and "model.safetensors" in msg


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        ("past_end", "runs past the end of the file"),
        (100_000_001, "exceeds safetensors' limit of 100000000 bytes"),
        ("short", "too short for a safetensors header"),
    ],
)
def test_header_length(mixtral: Path, tmp_path: Path, length: Any, expected: str) -> None:
    # The header itself is unreadable here, so there is no tensor to name: the file and why.
    path = _copy(mixtral, tmp_path / "c")
    file = path / "model.safetensors"
    data = file.read_bytes()
    if length == "short":
        file.write_bytes(data[:5])
    else:
        n = len(data) - 7 if length == "past_end" else length
        file.write_bytes(n.to_bytes(8, "little") + data[8:])
    msg = _load_error(path)
    assert str(file) in msg and expected in msg


def _raw_header_error(mixtral: Path, tmp_path: Path, edit: Callable[[bytes], bytes]) -> str:
    path = _copy(mixtral, tmp_path / "c")
    header, body = _split(path / "model.safetensors")
    _join(path / "model.safetensors", edit(json.dumps(header).encode()), body)
    return _load_error(path)


def _in_entry(raw: bytes, old: bytes, new: bytes) -> bytes:
    """Replace the first `old` inside NAME's entry."""
    at = raw.index(old, raw.index(f'"{NAME}"'.encode()))
    return raw[:at] + new + raw[at + len(old) :]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (b'"shape": [', b'"shape" [', "is not valid JSON (Expecting ':' delimiter"),
        (b"32]", b"32", "is not valid JSON"),
        (b"shape", b"sh\xffpe", "is not valid UTF-8"),
    ],
)
def test_bad_json_names_the_entry(
    mixtral: Path, tmp_path: Path, old: bytes, new: bytes, expected: str
) -> None:
    msg = _raw_header_error(mixtral, tmp_path, lambda raw: _in_entry(raw, old, new))
    assert "model.safetensors: header" in msg and expected in msg
    assert f"in or after the entry of tensor '{NAME}'" in msg


def test_header_not_an_object(mixtral: Path, tmp_path: Path) -> None:
    msg = _raw_header_error(mixtral, tmp_path, lambda raw: b"[" + raw[1:-1] + b"]")
    assert "model.safetensors: header is not a JSON object" in msg


def test_tensor_listed_twice_in_a_header(mixtral: Path, tmp_path: Path) -> None:
    def duplicate(raw: bytes) -> bytes:
        entry = json.dumps({NAME: _split(mixtral / "model.safetensors")[0][NAME]})
        return raw[:-1] + b", " + entry[1:-1].encode() + b"}"

    msg = _raw_header_error(mixtral, tmp_path, duplicate)
    assert f"model.safetensors: header has the key '{NAME}' twice" in msg


def test_metadata_must_be_strings(mixtral: Path, tmp_path: Path) -> None:
    msg = _with_header(mixtral, tmp_path, lambda h: h.update(__metadata__={"format": 1}))
    assert "model.safetensors: header __metadata__ must map strings to strings" in msg


def test_every_header_checked_before_any_tensor_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad entry in the last shard fails the load before the first shard's data is read."""
    path = make_checkpoint(tmp_path / "sharded", "mixtral", max_shard_size="20KB")
    last = sorted(path.glob("model-*.safetensors"))[-1]
    header, body = _split(last)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "I32"
    _join(last, header, body)

    def no_read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensor data opened before the checks")

    monkeypatch.setattr("moeserve.model.loader.safe_open", no_read)
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    assert f"{last}: tensor '{name}' has dtype I32" in str(e.value)
