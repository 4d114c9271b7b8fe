"""The rerun state inside a label store: pieces round-trip exactly; altered state is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nuclick_wsi.store.chunks import ChunkTable
from nuclick_wsi.store.rerun import FOLDER, PackedPiece, RerunState, read_state, write_state


def some_piece(seed=0, h=7, w=11):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) > 0.4
    seed_mask = np.zeros((h, w), bool)
    seed_mask[3, 5] = True
    prob = rng.random((h, w)).astype(np.float16)
    return mask, prob, seed_mask


def test_a_piece_round_trips_bit_for_bit():
    mask, prob, seed = some_piece()
    p = PackedPiece.pack(-3, 1024, mask, prob, seed, 0.8123456789012345)
    m2, p2, s2 = p.unpack()
    assert p.x0 == -3 and p.y0 == 1024 and (p.h, p.w) == (7, 11) and p.confidence == 0.8123456789012345
    np.testing.assert_array_equal(m2, mask)
    np.testing.assert_array_equal(s2, seed)
    assert p2.dtype == np.float16 and p2.tobytes() == prob.tobytes()
    m2[0, 0] = not m2[0, 0]  # fresh arrays: the stitcher may change them
    np.testing.assert_array_equal(p.unpack()[0], mask)


def state():
    pieces = {f"{k:032x}": PackedPiece.pack(k, 2 * k, *some_piece(k), 0.5 + k / 10) for k in range(4)}
    pieces["f" * 32] = PackedPiece(reason="nothing segmented: below threshold")
    outlines = {"9" * 32: b"\x01\x03polygon", "1" * 32: b"", "5" * 32: bytes(range(256))}
    chunks = ChunkTable({"ngff": "0.5", "chunk": 64}, {(1, 0, 2): ("d1", "s1"), (0, 3, 1): ("d0", "s0"),
                                                       (0, 0, 12): ("d2", "s2")})
    finals = {f"{0:032x}:1": (12.0, 0.75, 3.5, 4.25, "9" * 32), f"{1:032x}:2": ()}  # an instance; a lost piece
    contents = {"c" * 32: f"{2:032x}", "a" * 32: "f" * 32}  # content keys of a piece and of a reason
    return RerunState({"mpp": 0.25, "model": {"weights_sha256": "ab"}}, {"next_id": 6, "rows": []}, pieces, outlines,
                      chunks, finals, contents)


def test_state_round_trips_and_the_same_state_writes_the_same_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sha = write_state(tmp_path / "a", state())
    assert write_state(tmp_path / "b", state()) == sha
    for name in ("state.json", "pieces.bin"):
        assert (tmp_path / "a" / FOLDER / name).read_bytes() == (tmp_path / "b" / FOLDER / name).read_bytes()
    back = read_state(tmp_path / "a", sha)
    want = state()
    assert back.fingerprint == want.fingerprint and back.ids == want.ids
    assert back.pieces == want.pieces and back.outlines == want.outlines
    assert back.chunks == want.chunks and back.chunks.rows[(0, 3, 1)] == ("d0", "s0")
    assert back.finals == want.finals and back.contents == want.contents
    doc = json.loads((tmp_path / "a" / FOLDER / "state.json").read_bytes())
    assert doc["format"] == "nuclick-wsi-rerun/4"
    assert doc["contents"]["rows"] == [["a" * 32, "f" * 32], ["c" * 32, f"{2:032x}"]]  # sorted by key
    assert [row[:3] for row in doc["chunks"]["rows"]] == [[0, 0, 12], [0, 3, 1], [1, 0, 2]]  # sorted by key


def as_older_format(folder, fmt: str, *dropped: str) -> tuple[dict, Path]:
    """Rewrite the state in ``folder`` as one of format ``fmt`` without its ``dropped`` sections: (doc, path)."""
    path = folder / FOLDER / "state.json"
    doc = json.loads(path.read_bytes())
    doc["format"] = fmt
    for key in dropped:
        del doc[key]
    path.write_text(json.dumps(doc))
    return doc, path


def test_a_state_of_the_older_format_is_read_without_a_chunk_table(tmp_path):
    """/1 (before chunk tables): its ids and pieces still count, so an upgrade keeps the folder's ids."""
    want = state()
    write_state(tmp_path, want)
    doc, path = as_older_format(tmp_path, "nuclick-wsi-rerun/1", "chunks", "contents")
    back = read_state(tmp_path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert back.ids == want.ids and back.pieces == want.pieces and not back.chunks.rows and not back.finals
    assert not back.contents
    doc["format"] = "nuclick-wsi-rerun/0"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="format 'nuclick-wsi-rerun/0'"):
        read_state(tmp_path, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.parametrize("damage", ["flip a byte of pieces.bin", "truncate pieces.bin", "edit state.json",
                                    "flip a byte of outlines.bin",
                                    "remove state.json", "another run's report"])
def test_altered_or_missing_state_is_refused(tmp_path, damage):
    sha = write_state(tmp_path, state())
    folder = tmp_path / FOLDER
    if damage == "flip a byte of pieces.bin":
        data = bytearray((folder / "pieces.bin").read_bytes())
        data[len(data) // 2] ^= 1
        (folder / "pieces.bin").write_bytes(bytes(data))
    elif damage == "flip a byte of outlines.bin":
        data = bytearray((folder / "outlines.bin").read_bytes())
        data[-3] ^= 1
        (folder / "outlines.bin").write_bytes(bytes(data))
    elif damage == "truncate pieces.bin":
        (folder / "pieces.bin").write_bytes((folder / "pieces.bin").read_bytes()[:-5])
    elif damage == "edit state.json":
        (folder / "state.json").write_text((folder / "state.json").read_text().replace("0.25", "0.26"))
    elif damage == "remove state.json":
        (folder / "state.json").unlink()
    else:
        sha = "0" * 64
    with pytest.raises(ValueError):
        read_state(tmp_path, sha)


def test_final_instances_must_name_pieces_that_gave_an_instance(tmp_path):
    for bad in (f"{9:032x}:3", "f" * 32 + ":4", f"{0:032x}:x"):  # no such piece; a piece with a reason; no label
        want = state()
        want.finals[bad] = ()
        sha = write_state(tmp_path, want)
        with pytest.raises(ValueError, match="names no piece"):
            read_state(tmp_path, sha)
    want = state()
    want.finals[f"{2:032x}:3"] = (5.0, 0.5, 1.0, 1.0, "7" * 32)  # a piece of the state, an outline it lacks
    sha = write_state(tmp_path, want)
    with pytest.raises(ValueError, match="names no outline"):
        read_state(tmp_path, sha)


def test_a_state_of_format_3_is_read_with_its_finals_and_no_content_keys(tmp_path):
    """/3 (before content keys): its finals still count (instances are taken); no piece is reused by content."""
    want = state()
    write_state(tmp_path, want)
    _, path = as_older_format(tmp_path, "nuclick-wsi-rerun/3", "contents")
    back = read_state(tmp_path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert back.pieces == want.pieces and back.finals == want.finals and back.contents == {}


def test_content_keys_must_name_pieces_of_the_state(tmp_path):
    want = state()
    want.contents["b" * 32] = f"{9:032x}"  # no such piece
    sha = write_state(tmp_path, want)
    with pytest.raises(ValueError, match="content key .* names no piece"):
        read_state(tmp_path, sha)
