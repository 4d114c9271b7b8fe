"""The report's text (nuclick_wsi.outputs.commit.report_text): the same JSON, one click per line."""

from __future__ import annotations

import json

from nuclick_wsi.outputs.commit import report_text


def test_report_text_is_the_same_json_with_one_record_per_line():
    clicks = [{"index": k, "x": k + 0.25, "y": 2.5, "class": None if k % 2 else "Tumor", "status": "segmented",
               "uuid": f"u-{k}", "reason": 'a "quoted"\nline'} for k in range(200)]
    report = {"nuclick_wsi": "1.0", "slide": {"path": "/a b/ü.svs", "size": [10, 20], "nested": {"k": [1, 2]}},
              "clicks": clicks, "empty": [], "numbers": [1.5, 2], "squiggles": [{"index": 0}], "last": None}
    text = report_text(report)
    assert json.loads(text) == report
    assert list(json.loads(text)) == list(report)  # key order kept
    lines = text.splitlines()
    for rec in clicks:  # each click record is one line of its own
        assert "  " + json.dumps(rec) + ("," if rec["index"] < 199 else "") in lines
    assert text.endswith("}\n") and '\n "slide": {\n  "path"' in text  # the rest stays indented
