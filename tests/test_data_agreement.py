"""Two real ranks (gloo) that see different data: a shard one rank cannot read is dropped by both, and ranks that
list different shards (a folder still being filled) refuse to train instead of planning apart."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import make_shards

from cogvx_ds.data import loader
from cogvx_ds.data.loader import GlobalPlan
from cogvx_ds.data.shards import ShardError, resolve_shards
from cogvx_ds.train.trainer import Trainer


def _rank(rank: int, init: str, shards: dict, out: str, unreadable: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    read = loader.shard_samples

    def flaky(path, notes=None):  # a transient I/O error on this rank's node only
        if str(path) in unreadable.get(rank, ()):
            raise ShardError(f"{path}: Input/output error")
        return read(path, notes)

    loader.shard_samples = flaky
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            me = SimpleNamespace(plan=GlobalPlan([Path(p) for p in shards[rank]], 3, seed=0), world=2)
        try:
            Trainer._agree_on_shards(me)
            result = {"fingerprint": me.plan.fingerprint(), "keys": [r.key for r in me.plan.batch(0)]}
        except ValueError as e:
            result = {"error": str(e)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, shards, unreadable=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", shards, str(out), unreadable or {}), nprocs=2)
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_agree_on_unreadable_shards_and_refuse_different_listings(tmp_path):
    folder = make_shards(tmp_path / "shards", n_video=18, per_shard=6)
    shards = [str(p) for p in resolve_shards([str(folder)])]
    results = run_ranks(tmp_path, {0: shards, 1: shards}, unreadable={1: [shards[1]]})
    assert "error" not in results[0], results
    assert results[0]["fingerprint"]["samples"] == 12 and results[0]["fingerprint"] == results[1]["fingerprint"]
    assert results[0]["keys"] == results[1]["keys"]
    # rank 1 lists one shard fewer: both ranks refuse, naming the difference
    results = run_ranks(tmp_path, {0: shards, 1: shards[:2]})
    for r in results:
        assert "ranks see different data" in r.get("error", ""), results
