"""Shard manifests (what training plans from without walking the tars), the columnar data plan against the
per-sample reference algorithm, and shards cut short at a member boundary."""

import json
import os
import random
import re
import warnings

import pytest
import torch
from train_helpers import make_shards

from cogvx_ds.data import loader
from cogvx_ds.data.loader import GlobalPlan, load_sample, scan_shard
from cogvx_ds.data.shards import ShardError, ShardWriter, iter_shard, manifest_path, read_manifest, resolve_shards
from data_tools import inspect_shards


@pytest.fixture()
def shards(tmp_path):
    folder = make_shards(tmp_path / "shards", n_video=14, n_image=7, per_shard=5)
    return resolve_shards([str(folder)])


def walk(plan, n=None):
    n = n or 3 * len(plan.epoch(0))
    return [[(r.shard.name, r.key, r.bucket, r.frames, r.members) for r in plan.batch(p)] for p in range(n)]


def plan_quietly(shards, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = GlobalPlan(shards, *args, **kw)
    return plan, [str(w.message) for w in caught]


def test_writer_manifests_equal_the_scan_and_the_plan_needs_no_tar_walk(shards, monkeypatch):
    for shard in shards:
        manifest, why = read_manifest(shard)
        assert why == "" and manifest == scan_shard(shard)
    scanned = {}
    for ratio in (None, 0.4):
        monkeypatch.setattr(loader, "scan_shard", scan_shard)
        for shard in shards:
            manifest_path(shard).rename(manifest_path(shard).with_suffix(".off"))
        scanned[ratio] = walk(GlobalPlan(shards, 3, seed=4, image_ratio=ratio))
        for shard in shards:
            manifest_path(shard).with_suffix(".off").rename(manifest_path(shard))

        def no_walk(path):
            raise AssertionError(f"walked {path}")
        monkeypatch.setattr(loader, "scan_shard", no_walk)
        plan, notes = plan_quietly(shards, 3, seed=4, image_ratio=ratio)
        assert notes == [] and walk(plan) == scanned[ratio]
    ref = plan.batch(0)[0]
    assert load_sample(ref)["key"] == ref.key and load_sample(ref)["mean"].shape[1] == ref.frames


@pytest.mark.parametrize("damage", ["same size and time, other bytes", "touched", "appended", "garbage",
                                    "not an object", "ranges past the end", "older format"])
def test_a_manifest_that_does_not_match_its_shard_is_not_used(shards, damage):
    shard, manifest = shards[1], manifest_path(shards[1])
    expected = walk(GlobalPlan(shards, 3, seed=1))
    doc = json.loads(manifest.read_text())
    if damage == "same size and time, other bytes":  # e.g. re-encoded with other settings, times kept by a copy
        data = bytearray(shard.read_bytes())
        offset, size = doc["spans"][0][:2]  # the first latent's bytes
        data[offset + size - 1] ^= 0xFF
        mtime = shard.stat().st_mtime_ns
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(mtime, mtime))
        expected = walk(plan_quietly(shards, 3, seed=1)[0])  # the plan itself does not change with a latent's values
        doc["buckets"][0] = "999x9x9"  # ... but a manifest that no longer matches must not be believed
        manifest.write_text(json.dumps(doc))
    elif damage == "touched":  # rewritten (or copied without keeping times): believed only after a walk
        mtime = shard.stat().st_mtime_ns + 10**9
        os.utime(shard, ns=(mtime, mtime))
    elif damage == "not an object":
        manifest.write_text("[]")
    elif damage == "appended":
        with open(shard, "ab") as f:
            f.write(b"\0" * 512)
    elif damage == "garbage":
        manifest.write_text("{not json")
    elif damage == "ranges past the end":
        doc["spans"][0][0] = doc["shard_bytes"]
        manifest.write_text(json.dumps(doc))
    else:
        doc["format"] = "cogvx_ds.shard_manifest/0"
        manifest.write_text(json.dumps(doc))
    plan, notes = plan_quietly(shards, 3, seed=1)
    assert walk(plan) == expected
    assert len(notes) == 1 and "1 shard manifest(s) not used" in notes[0] and manifest.name in notes[0], notes


def reference_epoch(refs, global_batch, gen, image_ratio):
    """The plan's shuffle written per sample, as it was before the columns (an independent reference)."""
    def batches(rs):
        order = torch.randperm(len(rs), generator=gen).tolist()
        pools, out = {}, []
        for i in order:
            pool = pools.setdefault(rs[i][1], [])
            pool.append(rs[i][0])
            if len(pool) == global_batch:
                out.append(pool)
                pools[rs[i][1]] = []
        return out
    if image_ratio is None:
        return batches(refs)
    images, videos = batches([r for r in refs if r[2] == 1]), batches([r for r in refs if r[2] != 1])
    if image_ratio == 0 or not images:
        return videos
    if image_ratio == 1 or not videos:
        return images
    out = []
    for u in torch.rand(len(images) + len(videos), generator=gen).tolist():  # one draw per slot, as the plan's
        pool = images if u < image_ratio else videos
        if not pool:  # the kind drawn has run out: the epoch ends here
            break
        out.append(pool.pop(0))
    return out


@pytest.mark.parametrize("global_batch,image_ratio", [(1, None), (3, None), (4, 0.3), (7, 0.8), (2, 0.0), (2, 1.0), (1, 0.5)])
def test_columnar_plan_equals_the_per_sample_reference(tmp_path, global_batch, image_ratio):
    rng = random.Random(global_batch)
    buckets = ["1x8x8", "1x4x4", "3x8x8", "5x4x8", "2x2x2"]
    with ShardWriter(tmp_path / "a.tar") as w:
        for i in range(150):
            b = rng.choice(buckets)
            w.add(f"k{i:04d}", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                  {"bucket": b, "latent_frames": int(b.split("x")[0])})
    plan, _ = plan_quietly([tmp_path / "a.tar"], global_batch, seed=9, image_ratio=image_ratio)
    refs = [(plan.keys[i], str(plan.bucket_names[plan.bucket_ids[i]]), int(plan.frames[i])) for i in range(150)]
    for epoch in range(3):
        gen = torch.Generator().manual_seed(9 * 1_000_003 + epoch)
        expected = reference_epoch(refs, global_batch, gen, image_ratio)
        assert [[plan.keys[i] for i in b] for b in plan.epoch(epoch)] == expected


def test_plan_memory_per_sample_is_small(tmp_path):
    """Columns, not an object per sample: about 820 bytes per sample before, 8 GB per rank at 10M samples."""
    import tracemalloc
    with ShardWriter(tmp_path / "a.tar") as w:
        for i in range(20000):
            w.add(f"{i:09d}_000", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                  {"bucket": f"{1 + i % 3}x60x90", "latent_frames": 1 + i % 3})
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    plan = GlobalPlan([tmp_path / "a.tar"], 8, seed=0)
    per_sample = (tracemalloc.get_traced_memory()[0] - before) / len(plan)
    tracemalloc.stop()
    assert per_sample < 200, per_sample


def cut(path, end):
    path.write_bytes(path.read_bytes()[:end])


@pytest.mark.parametrize("where", ["after a member", "inside a header"])
def test_a_shard_cut_at_a_member_boundary_is_truncated_not_shorter(shards, where, capsys):
    """tarfile reads a file cut after a member, or inside the next header, as a complete shorter archive."""
    shard = shards[0]
    last = scan_shard(shard).span_array()[2]  # the third sample's members
    end = int((last[:, 0] + last[:, 1]).max() + 511) // 512 * 512
    cut(shard, end + (0 if where == "after a member" else 100))
    for read in (scan_shard, lambda p: list(iter_shard(p))):
        with pytest.raises(ShardError, match=f"{shard}: (truncated|not one complete tar)"):
            read(shard)
    plan, notes = plan_quietly(shards, 3, seed=0)
    assert shard not in plan.shards and str(shard) in plan.bad_paths
    assert inspect_shards.main([str(shard.parent), "--check"]) == 1
    assert re.search("truncated|not one complete tar", capsys.readouterr().out)


def test_inspect_writes_and_checks_manifests(shards, capsys):
    folder = shards[0].parent
    for shard in shards[:2]:
        manifest_path(shard).unlink()
    assert inspect_shards.main([str(folder), "--write-manifests"]) == 0
    assert f"manifests: wrote 2, {len(shards) - 2} already current" in capsys.readouterr().out
    assert all(read_manifest(s)[0] == scan_shard(s) for s in shards)
    assert all(inspect_shards.manifest_problems(s) == [] for s in shards)
    doc = json.loads(manifest_path(shards[3]).read_text())  # matches the shard's bytes, lists something else
    doc["frames"][0] += 1
    manifest_path(shards[3]).write_text(json.dumps(doc))
    problems = inspect_shards.check(shards, None)[0]
    assert f"{manifest_path(shards[3]).name} does not list what {shards[3].name} holds" in " ".join(problems)
    assert inspect_shards.main([str(folder), "--write-manifests"]) == 0  # and renews it
    assert f"manifests: wrote 1, {len(shards) - 1} already current" in capsys.readouterr().out
    assert inspect_shards.manifest_problems(shards[3]) == []


def test_the_manifest_lists_buckets_as_a_reader_sees_them(tmp_path):
    with ShardWriter(tmp_path / "a.tar") as w:  # a tuple is written to the json as a list
        w.add("k", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), {"bucket": (1, 8, 8), "latent_frames": 1})
    assert read_manifest(tmp_path / "a.tar")[0] == scan_shard(tmp_path / "a.tar")
