"""encode_latents at scale: the input list is read as a stream and only this worker's inputs are kept (with the
same listing hash as before, so folders encoded earlier resume), and an input that kills the worker while it is
decoded (the OOM killer on a huge video) is found and rejected instead of killing every re-run."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encode_latents import BUCKETS, encode, make_vae, synthetic_frames, write_jsonl

from cogvx_ds.data.shards import iter_shard
from data_tools import encode_latents as el

ROOT = Path(__file__).resolve().parents[1]


def old_listing_sha(items):
    """The listing hash as computed before (one json.dumps of the whole list): encode_plan.json keeps it."""
    return hashlib.sha256(json.dumps([[i.source, i.caption, i.start, i.end] for i in items]).encode()).hexdigest()


def test_streamed_inputs_keep_the_listing_hash_and_only_this_workers_share(tmp_path):
    records = [{"path": f"v{i}.mp4", "caption": f"clip {i} \u00e9\"q\"", "start": i % 3 or None} for i in range(23)]
    records[5] = {"caption": "no path"}
    inputs = {"jsonl": write_jsonl(tmp_path / "m.jsonl", records)}
    # a raw U+2028 (json.dumps(ensure_ascii=False)) is inside a record: one good record (listing 2); listing 1, what
    # folders encoded before keep using, cut it in two bad lines, as str.splitlines does
    odd = json.dumps({"path": "u.mp4", "caption": "a\u2028b"}, ensure_ascii=False)
    (tmp_path / "m.jsonl").write_text((tmp_path / "m.jsonl").read_text() + "not json\n" + odd + "\n")
    (tmp_path / "m.csv").write_text("path,caption,start\n" + "".join(f"v{i}.mp4,c {i},{i}\n" for i in range(9)))
    inputs["csv"] = tmp_path / "m.csv"
    (tmp_path / "videos.txt").write_text("".join(f"v{i}.mp4\n" if i != 4 else "\n" for i in range(12)))
    (tmp_path / "prompts.txt").write_text("".join(f"p {i}\n" for i in range(12)) + "\n\n")
    inputs["txt"] = tmp_path / "videos.txt"
    assert [i.error[0] for i in list(el.iter_inputs(inputs["jsonl"], listing=1))[-3:]] == ["bad_manifest_line"] * 3
    tail = el.load_inputs(inputs["jsonl"])[-2:]
    assert tail[0].error[0] == "bad_manifest_line" and tail[1].error is None and tail[1].caption == "a\u2028b"
    for name, path in inputs.items():
        items = el.load_inputs(path)
        for world, rank in ((1, 0), (3, 1)):
            count, sha, mine = el.read_inputs(path, None, 2, rank, world)
            assert count == len(items) and sha == old_listing_sha(items), name
            plan = el.ShardPlan(count, 2)
            assert sorted(mine) == [i for k in plan.owned(rank, world) for i in plan.inputs_of(k)], name
            assert all(mine[i] == items[i] for i in mine)
    (tmp_path / "prompts.txt").write_text("".join(f"p {i}\n" for i in range(11)))
    with pytest.raises(ValueError, match="has 11 lines but .* has 12"):
        el.read_inputs(inputs["txt"], None, 2, 0, 1)


def test_died_while_decoding_counts_attempts_that_were_killed(tmp_path):
    path = tmp_path / "shard-000000.attempts.jsonl"
    lines = [{"attempt": "a"}, {"started": 3}, {"started": 4}, {"done": 3},  # killed with 4 in flight
             {"attempt": "b"}, {"started": 4}, {"started": 5}, {"aborted": True},  # an ordinary error: no blame
             {"attempt": "c"}, {"started": 4}, {"done": 4}, {"started": 5}]  # killed with 5 in flight
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"start')  # and a line cut by the kill
    assert el.died_while_decoding(path) == {4: 1, 5: 1}
    assert el.died_while_decoding(tmp_path / "none.jsonl") == {}
    # the next attempt's header does not land on the cut line: both deaths with input 5 in flight count
    journal = el.AttemptJournal(tmp_path, el.ShardPlan(10, 10))
    journal.started(5)
    assert el.died_while_decoding(path) == {4: 1, 5: 2}
    journal.aborted()  # then an ordinary stop: nothing more counts against input 5
    assert el.died_while_decoding(path) == {4: 1, 5: 1}


def synthetic_run(tmp_path, **env):
    from data_tools.make_synthetic import generate

    vae = make_vae(tmp_path / "vae")
    generate(tmp_path / "data", num_videos=6, num_images=0, num_heldout=0, frames=17, height=32, width=32,
             progress=False)
    manifest = tmp_path / "data" / "manifest.jsonl"
    cmd = [sys.executable, "-m", "data_tools.encode_latents", "--input", str(manifest), "--out", str(tmp_path / "out"),
           "--vae", str(vae), "--buckets", BUCKETS, "--samples-per-shard", "3", "--no-progress"]
    return manifest, vae, cmd, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)


@pytest.mark.slow
def test_a_sigterm_is_a_stop_not_a_death(tmp_path):
    """slurm's preemption and time limit send SIGTERM: no input is blamed for it, and the re-run finishes all."""
    manifest, vae, cmd, env = synthetic_run(tmp_path, COGVX_FAULT_KILL_SIGNAL="SIGTERM")
    env["COGVX_FAULT_KILL_ON_SOURCE"] = json.loads(manifest.read_text().splitlines()[3])["path"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert el.died_while_decoding(tmp_path / "out" / "shard-000001.attempts.jsonl") == {}
    del env["COGVX_FAULT_KILL_ON_SOURCE"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "out" / "rejects.jsonl").read_text() == "", proc.stderr[-2000:]


@pytest.mark.slow
def test_an_input_that_kills_the_worker_is_rejected_after_two_deaths(tmp_path):
    manifest, vae, cmd, env = synthetic_run(tmp_path)
    env["COGVX_FAULT_KILL_ON_SOURCE"] = json.loads(manifest.read_text().splitlines()[3])["path"]
    out = tmp_path / "out"
    for attempt in (1, 2):  # the first death has the next inputs in flight too; the second decodes one at a time
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert el.died_while_decoding(out / "shard-000001.attempts.jsonl")[3] == attempt
    died = el.died_while_decoding(out / "shard-000001.attempts.jsonl")  # only the culprit twice; others in
    assert died.pop(3) == 2 and set(died.values()) <= {1}                # flight with it the first time, once
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["input_index"], r["reason"]) for r in rejects] == [(3, "worker_killed")]
    assert "died while decoding it in 2 attempts" in rejects[0]["detail"]
    keys = sorted(s.key for p in sorted(out.glob("shard-*.tar")) for s in iter_shard(p))
    assert keys == [f"{i:09d}_000" for i in (0, 1, 2, 4, 5)]
    assert not list(out.glob("*.attempts.jsonl"))  # finished shards keep no journal
    clean = encode(manifest, tmp_path / "clean", vae, "--samples-per-shard", 3)
    assert clean["clips"] == 6
    for name in ("shard-000000.tar",):  # the shard without the culprit is byte-identical to a clean run's
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("fps", [None, 50.0])  # the source's 25 fps, and upsampled (neighbouring clips share frames)
def test_clips_are_scaled_as_they_are_decoded_holding_one_clip_at_source_size(tmp_path, backend, fps):
    """--clips-per-video 0 on a long, large video used to hold every clip at the source resolution at once."""
    import tracemalloc

    from data_tools._video_io import write_mp4
    from data_tools.video_decode import Bucket, plan_clips, read_clips, resize_center_crop

    path = tmp_path / "long.mp4"
    write_mp4(path, np.concatenate([synthetic_frames(i, 40, 64, 96) for i in range(4)]), 25.0)

    def choose(info):
        return plan_clips(info, [Bucket(16, 16, 9)], fps, 0)

    def fit(clip, plan):
        return resize_center_crop(clip, plan.bucket.height, plan.bucket.width)

    tracemalloc.start()
    info, plans, plain, used = read_clips(path, choose, backend)
    held = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert used == backend and len(plans) >= 8
    source_bytes = sum(c.nbytes for c in plain)
    tracemalloc.start()
    info2, plans2, fitted, _ = read_clips(path, choose, backend, transform=fit)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert plans2 == plans and len(fitted) == len(plain)
    for clip, small in zip(plain, fitted):
        assert torch.equal(fit(clip, plans[0]), small)
    assert held >= source_bytes  # the measure sees the decoded frames
    other = "pyav" if backend == "decord" else "decord"
    assert all(np.array_equal(a, b) for a, b in zip(plain, read_clips(path, choose, other)[2]))
    assert peak < 4 * source_bytes / len(plans), (peak, source_bytes, len(plans))  # about one clip, not all


def test_decord_reads_forward_and_a_transform_error_is_not_a_decoder_error(tmp_path):
    """Clips fetched one by one with a seek back each (overlapping clips, when fps is upsampled) made decord 0.6
    return wrong frames from an H.264 AVI with short keyframe gaps, and 10x slower; a failing transform used to
    send the video to the other decoder and end as 'unreadable'."""
    import av

    from data_tools.video_decode import Bucket, plan_clips, read_clips

    path = tmp_path / "short_gop.avi"
    frames = np.concatenate([synthetic_frames(i, 30, 64, 64) for i in range(3)])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "10", "keyint_min": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())

    def choose(info):
        return plan_clips(info, [Bucket(16, 16, 9)], 50.0, 0)

    _, plans, by_decord, used = read_clips(path, choose, "decord")
    _, _, by_pyav, _ = read_clips(path, choose, "pyav")
    assert used == "decord" and len(plans) > 10
    assert all(np.array_equal(a, b) for a, b in zip(by_decord, by_pyav))

    calls = []

    def failing(clip, plan):
        calls.append(plan)
        raise MemoryError("resize ran out of memory")
    with pytest.raises(MemoryError, match="resize ran out of memory"):
        read_clips(path, choose, "auto", transform=failing)
    assert len(calls) == 1


def test_byte_order_marks_bad_ranges_and_a_lone_rank(tmp_path, monkeypatch):
    """Excel's "CSV UTF-8" and some editors start files with a UTF-8 byte-order mark: read as text it was part of
    the first column name (every csv row: no path), broke the first JSONL record, or began the first caption. A
    negative start (decord reads it from the video's end) and an empty or reversed range are bad_clip_range. And
    --world-size without --rank (or the reverse) is refused: every worker was rank 0."""
    bom = "\ufeff"
    (tmp_path / "m.csv").write_text(bom + "path,caption\nv0.mp4,a cat\nv1.mp4,a dog\n", encoding="utf-8")
    (tmp_path / "m.jsonl").write_text(bom + json.dumps({"path": "v0.mp4", "caption": "a cat"}) + "\n",
                                      encoding="utf-8")
    (tmp_path / "videos.txt").write_text(bom + "v0.mp4\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text(bom + "a cat\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "v0.mp4").write_bytes(b"")
    (tmp_path / "folder" / "v0.txt").write_text(bom + "a cat", encoding="utf-8")
    for source in ("m.csv", "m.jsonl", "videos.txt", "folder"):
        items = el.load_inputs(tmp_path / source)
        assert items[0].error is None and items[0].source == "v0.mp4" and items[0].caption == "a cat", (source, items)
    ranges = [{"path": "v.mp4", "caption": "c", "start": a, "end": b}
              for a, b in ((-1, None), (2, 2), (3, 1), ("nan", None), (1.5, 4))]
    errors = [i.error and i.error[0] for i in el.load_inputs(write_jsonl(tmp_path / "r.jsonl", ranges))]
    assert errors == ["bad_clip_range"] * 4 + [None], errors
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="--rank and --world-size go together"):
        el.detect_rank(None, 4)
    with pytest.raises(ValueError, match="--rank and --world-size go together"):
        el.detect_rank(2, None)
    assert el.detect_rank(2, 4) == (2, 4)


def test_folders_encoded_before_listing_2_keep_reading_their_inputs_as_they_did(tmp_path):
    """encode_plan.json records how the inputs were read. A folder begun before the key was read by rule 1 (plain
    UTF-8, JSONL cut at every str.splitlines break): a re-run reads it so again, its listing hash holds and the run
    goes on; a new folder is read by rule 2, whose hash differs on such a manifest."""
    from test_encode_latents import encode, make_vae

    from data_tools.make_synthetic import generate

    vae = make_vae(tmp_path / "vae")
    generate(tmp_path / "data", num_videos=2, num_images=0, num_heldout=0, frames=9, height=32, width=32, fps=8.0,
             progress=False)
    records = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    records[1]["caption"] = "a\u2028b"  # raw in the file (ensure_ascii=False): rule 1 cuts the record in two
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        encoding="utf-8")
    legacy = list(el.iter_inputs(manifest, listing=1))
    assert len(legacy) == 3 and legacy[0].error[0] == "bad_manifest_line"  # the BOM spoils the first record too
    count, sha1, _ = el.read_inputs(manifest, None, 2, 0, 1, listing=1)
    assert count == 3 and sha1 == old_listing_sha(legacy)
    assert el.read_inputs(manifest, None, 2, 0, 1)[1] != sha1
    out = tmp_path / "out"
    encode(manifest, out, vae, "--samples-per-shard", 1)
    plan = json.loads((out / el.PLAN_NAME).read_text())
    assert plan["listing"] == 2 and plan["num_inputs"] == 2
    # the same folder as a run before the key would have left it: rule 1's count and hash, no "listing"
    old = {k: v for k, v in plan.items() if k != "listing"}
    (out / el.PLAN_NAME).write_text(json.dumps({**old, "num_inputs": 3, "num_shards": 3, "inputs_sha256": sha1}))
    for tar in out.glob("*.tar"):
        tar.unlink()
    encode(manifest, out, vae, "--samples-per-shard", 1)  # no "encoded with other settings"
    assert "listing" not in json.loads((out / el.PLAN_NAME).read_text())
