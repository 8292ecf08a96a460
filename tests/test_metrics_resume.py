"""metrics.jsonl / sample_order.jsonl on resume: lines past the checkpoint's step, and a line cut short by a kill,
are cut off in place."""

import json

from cogvx_ds.train.metrics import _truncate_jsonl


def test_lines_past_the_resumed_step_and_a_partial_last_line_are_cut(tmp_path):
    path = tmp_path / "sample_order.jsonl"
    lines = [json.dumps({"step": s, "keys": [f"v{s}"]}) + "\n" for s in range(1, 6)]
    path.write_text("".join(lines) + '{"step": 6, "ke')  # killed while writing step 6
    _truncate_jsonl(path, 5)
    assert path.read_text() == "".join(lines)  # (the partial line used to make the resume fail to parse)
    _truncate_jsonl(path, 3)
    assert path.read_text() == "".join(lines[:3])
    _truncate_jsonl(path, 0)
    assert path.read_text() == ""
    _truncate_jsonl(tmp_path / "missing.jsonl", 3)  # a first run: nothing to do
