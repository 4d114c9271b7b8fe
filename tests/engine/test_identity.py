"""The id table: a click's id and uuid follow its key (position to 0.01 px, class, occurrence)."""

from __future__ import annotations

import pytest

from nuclick_wsi.engine.identity import IdTable, click_keys, fresh_ids
from nuclick_wsi.postprocess.trace import deterministic_uuid
from nuclick_wsi.records import Click


def clicks(*xyc):
    return [Click(x, y, c, index=k) for k, (x, y, c) in enumerate(xyc)]


A = clicks((10.5, 20.5, "T"), (30.0, 40.0, None), (50.25, 60.75, "L"), (70.0, 80.0, "T"))


def test_fresh_ids_are_the_file_order_and_the_uuids_runs_always_had():
    labels, uuids = fresh_ids(A, "slide")
    assert labels == [1, 2, 3, 4]
    assert uuids == [deterministic_uuid("slide", k, c.x, c.y, "nucleus") for k, c in enumerate(A)]


def test_ids_follow_the_click_not_its_place():
    _, _, table = IdTable().assign(A, "s")
    labels, uuids, again = table.assign(A[::-1], "s")
    first = dict(zip([(c.x, c.y) for c in A], zip(*IdTable().assign(A, "s")[:2])))
    assert [first[(c.x, c.y)] for c in A[::-1]] == list(zip(labels, uuids))
    assert again.counts == {"kept": 4, "new": 0, "removed": 0} and again.next_id == 5


def test_position_counts_to_a_hundredth_of_a_pixel_and_class_counts():
    _, _, table = IdTable().assign(A, "s")
    near = clicks((10.501, 20.499, "T"))  # the same click, through a format round trip
    moved = clicks((10.52, 20.5, "T"))
    other_class = clicks((10.5, 20.5, "L"))
    assert table.assign(near, "s")[0] == [1]
    assert table.assign(moved, "s")[0] == [5]
    assert table.assign(other_class, "s")[0] == [5]


def test_new_clicks_get_new_ids_and_removed_ids_are_never_given_again():
    _, _, t1 = IdTable().assign(A, "s")
    labels, uuids, t2 = t1.assign(A[:2], "s")  # two removed
    assert labels == [1, 2] and t2.next_id == 5 and t2.counts["removed"] == 2
    labels, uuids, t3 = t2.assign(A, "s")  # they come back: as new clicks
    assert labels == [1, 2, 5, 6]
    assert uuids[2] == deterministic_uuid("s", 4, A[2].x, A[2].y, "nucleus")
    assert uuids[2] != fresh_ids(A, "s")[1][2]
    assert t3.next_id == 7


def test_duplicate_clicks_at_one_key_are_told_apart_by_occurrence():
    dup = clicks((5.0, 5.0, "T"), (9.0, 9.0, None), (5.0, 5.0, "T"), (5.004, 5.0, "T"))
    assert [k[3] for k in click_keys(dup)] == [0, 0, 1, 2]
    _, _, table = IdTable().assign(dup, "s")
    # drop the first of the three: the remaining two are now occurrences 0 and 1 of the key
    labels, _, _ = table.assign(dup[1:], "s")
    assert labels == [2, 1, 3]


def test_table_round_trips_and_rejects_malformed_json():
    _, _, table = IdTable().assign(A, "s")
    back = IdTable.from_json(table.to_json())
    assert back.ids == table.ids and back.next_id == table.next_id
    bad = table.to_json()
    bad["next_id"] = 2
    with pytest.raises(ValueError, match="next_id"):
        IdTable.from_json(bad)
    with pytest.raises(ValueError, match="malformed"):
        IdTable.from_json({"rows": [[1, 2]], "next_id": 3})
