"""Latent shard format: round trip, atomic writes, index, corrupt shards, and members that are never unpickled."""

import io
import pickle
import tarfile

import pytest
import torch

from cogvx_ds.data.shards import ShardError, ShardWriter, iter_shard, resolve_shards, write_index


def _write(path, n=3, frames=2):
    with ShardWriter(path) as w:
        for i in range(n):
            mean = torch.randn(4, frames if i % 2 == 0 else 1, 4, 6)
            w.add(f"s{i:03d}", mean, mean * 0 - 2, {"caption": f"clip {i}", "bucket": f"{mean.shape[1]}x4x6"},
                  text_embedding=torch.randn(5, 8), text_mask=torch.ones(5, dtype=torch.bool))
    return path


def test_round_trip_index_and_resolution(tmp_path):
    w = ShardWriter(tmp_path / "a.tar", latent_dtype=torch.float16)
    means = [torch.randn(4, 2, 4, 6) for _ in range(3)]
    for i, m in enumerate(means):
        w.add(f"k{i}", m, m - 1, {"caption": f"c{i}", "bucket": "2x4x6"}, torch.randn(5, 8))
    entry = w.close()
    assert entry == {"path": "a.tar", "num_samples": 3, "buckets": {"2x4x6": 3}}
    samples = list(iter_shard(tmp_path / "a.tar"))
    assert [s.key for s in samples] == ["k0", "k1", "k2"]
    for s, m in zip(samples, means):
        assert s.mean.dtype == torch.float16 and torch.equal(s.mean, m.half())
        assert s.meta["caption"] == f"c{s.key[1]}" and s.text_embedding.shape == (5, 8) and s.text_mask is None
    write_index(tmp_path, [entry])
    assert resolve_shards([str(tmp_path)]) == [tmp_path / "a.tar"]
    assert resolve_shards([str(tmp_path / "index.json")]) == [tmp_path / "a.tar"]
    with pytest.raises(FileNotFoundError, match="data.shards"):
        resolve_shards([str(tmp_path / "nope.tar")])


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "b.tar") as w:
            w.add("x", torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2), {})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_raises_named_error(tmp_path):
    _write(tmp_path / "c.tar")
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="c.tar"):
        list(iter_shard(tmp_path / "c.tar"))
    (tmp_path / "d.tar").write_text("not a tar")
    with pytest.raises(ShardError, match="d.tar"):
        list(iter_shard(tmp_path / "d.tar"))


class _SideEffect:
    def __reduce__(self):  # unpickling this would create a file
        return (open, ("/tmp/cogvx_ds_pickle_was_loaded", "w"))


def test_pickle_members_are_never_loaded(tmp_path):
    marker = "/tmp/cogvx_ds_pickle_was_loaded"
    import os

    if os.path.exists(marker):
        os.remove(marker)
    _write(tmp_path / "e.tar", n=1)
    payload = pickle.dumps(_SideEffect())
    with tarfile.open(tmp_path / "e.tar", "a") as tar:
        for name in ("s000.pyd", "s001.pickle"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    samples = list(iter_shard(tmp_path / "e.tar"))
    assert not os.path.exists(marker)
    assert [s.key for s in samples] == ["s000"]
    assert samples[0].skipped_members == ["s000.pyd", "s001.pickle"]
    pickle.loads(payload)  # the payload really has the side effect, so the check above can fail
    assert os.path.exists(marker)
    os.remove(marker)


@pytest.mark.parametrize("meta", [b"[1]", b'{"frames": "nine"}', b'{"frames": null}', b'{"latent_frames": 0}',
                                  b'{"latent_frames": NaN}', b'{"frames": Infinity}', b'{"frames": 1e400}',
                                  b'{"frames": 2.5}', b'{"frames": 1' + b"0" * 400 + b"}", b'{"frames": 1e300}'])
def test_a_malformed_sample_json_is_a_named_shard_error(tmp_path, meta):
    """A sample json that is not an object with a positive whole frame count (written by another tool, or
    damaged) is a ShardError naming the shard and the member, so the plan skips that shard as bad; it crashed the
    trainer's start-up (AttributeError / ValueError / TypeError, no file named) and inspect_shards."""
    from cogvx_ds.data.loader import GlobalPlan
    from data_tools import inspect_shards

    bad = _write(tmp_path / "bad.tar", n=1)
    good = _write(tmp_path / "good.tar", n=2)
    with tarfile.open(bad) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(bad, "w") as tar:
        for m, data in members:
            data = meta if m.name.endswith(".json") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"bad.tar: s000.json: "):
        list(iter_shard(bad))
    plan = GlobalPlan([bad, good], global_batch=1, seed=0)
    assert len(plan) == 2 and len(plan.bad_shards) == 1 and "bad.tar: s000.json" in plan.bad_shards[0]
    assert inspect_shards.main([str(bad)]) == 0 and inspect_shards.main([str(bad), "--check"]) == 1  # no traceback
