"""Stable identities: a click's label id and uuid follow the click, not its place in the file.

A click is known by its key: its position rounded to 0.01 level-0 px, its class, and its occurrence
(0 for the first click of the file at that rounded position and class, 1 for the next, ...). The id
table of an output maps each key to a label id and a uuid, and keeps the next free id, so:

* the same click keeps its id and uuid however the file is reordered or edited;
* a new click gets the next free id (new clicks in file order), and a uuid made from that id;
* a removed click's id is never given again within that output (``next_id`` only grows).

A fresh table (``--full``, or no earlier run) numbers the clicks in file order, ``index + 1``, with
``deterministic_uuid(stem, index, x, y, "nucleus")``: the ids and uuids runs always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nuclick_wsi.postprocess.trace import deterministic_uuid
from nuclick_wsi.records import Click

ClickKey = tuple[str, str, "str | None", int]


def _coord(v: float) -> str:
    return f"{round(float(v), 2) + 0.0:.2f}"  # + 0.0: -0.0 and 0.0 are one position


def click_keys(clicks: list[Click]) -> list[ClickKey]:
    """The key of every click: (x, y rounded to 0.01 px, class, occurrence of that position and class)."""
    seen: dict[tuple[str, str, str | None], int] = {}
    keys = []
    for c in clicks:
        base = (_coord(c.x), _coord(c.y), c.class_name)
        occ = seen.get(base, 0)
        seen[base] = occ + 1
        keys.append((*base, occ))
    return keys


@dataclass
class IdTable:
    """Click key -> (label id, uuid), and the next free id of the output."""

    ids: dict[ClickKey, tuple[int, str]] = field(default_factory=dict)
    next_id: int = 1
    #: how this table came from the previous one: ids kept, new, removed (set by :meth:`assign`)
    counts: dict[str, int] = field(default_factory=dict, compare=False)

    def assign(self, clicks: list[Click], stem: str, kind: str = "nucleus") -> tuple[list[int], list[str], IdTable]:
        """Ids and uuids of ``clicks`` (file order) and the table of this run (removed keys dropped)."""
        out: dict[ClickKey, tuple[int, str]] = {}
        nxt, labels, uuids = self.next_id, [], []
        for c, key in zip(clicks, click_keys(clicks)):
            got = self.ids.get(key)
            if got is None:
                got = (nxt, deterministic_uuid(stem, nxt - 1, c.x, c.y, kind))
                nxt += 1
            out[key] = got
            labels.append(got[0])
            uuids.append(got[1])
        counts = {"kept": sum(k in self.ids for k in out), "new": sum(k not in self.ids for k in out),
                  "removed": sum(k not in out for k in self.ids)}
        return labels, uuids, IdTable(out, nxt, counts)

    def to_json(self) -> dict[str, Any]:
        rows = sorted(([*k, lab, uid] for k, (lab, uid) in self.ids.items()), key=lambda r: r[4])
        return {"next_id": self.next_id, "columns": ["x", "y", "class", "occurrence", "label", "uuid"], "rows": rows}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IdTable:
        """The table written by :meth:`to_json`; ValueError when it is malformed."""
        try:
            ids = {(str(x), str(y), None if c is None else str(c), int(o)): (int(lab), str(uid))
                   for x, y, c, o, lab, uid in data["rows"]}
            nxt = int(data["next_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed id table ({exc})") from None
        labels = [lab for lab, _ in ids.values()]
        if len(set(labels)) != len(labels) or any(lab < 1 or lab >= nxt for lab in labels):
            raise ValueError("malformed id table (ids repeated or not below next_id)")
        return cls(ids, nxt)


def fresh_ids(clicks: list[Click], stem: str) -> tuple[list[int], list[str]]:
    """Ids and uuids of a fresh table: ``index + 1`` and the index's deterministic uuid."""
    labels, uuids, _ = IdTable().assign(clicks, stem)
    return labels, uuids
