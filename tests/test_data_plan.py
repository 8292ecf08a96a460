"""The training data plan (cogvx_ds.data.loader.GlobalPlan) over many epochs, and a sample that goes bad after the
startup scan."""

import pytest
from train_helpers import make_shards

from cogvx_ds.data.loader import GlobalPlan, load_sample
from cogvx_ds.data.shards import ShardError, resolve_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = make_shards(tmp_path_factory.mktemp("plan") / "shards", n_video=12, n_image=6, per_shard=6)
    return resolve_shards([str(folder)])


@pytest.mark.parametrize("image_ratio", [None, 0.5])
def test_each_epoch_is_shuffled_once_and_batches_do_not_depend_on_the_access_order(shards, monkeypatch,
                                                                                     image_ratio):
    """Reading batch after batch through six epochs shuffles each epoch once (it used to rebuild every earlier
    epoch for every batch: seconds per step at 10M samples), and a resume that starts deep in epoch 5 gets the
    same batches as the run that got there step by step."""
    # (under a ratio an epoch ends where the kind drawn runs out, so epochs differ in length)
    lengths = [len(GlobalPlan(shards, global_batch=3, seed=7, image_ratio=image_ratio).epoch(e)) for e in range(6)]
    plan = GlobalPlan(shards, global_batch=3, seed=7, image_ratio=image_ratio)
    calls = []
    build = plan._batches
    monkeypatch.setattr(plan, "_batches", lambda refs, gen: calls.append(len(refs)) or build(refs, gen))
    walked = [[r.key for r in plan.batch(p)] for p in range(sum(lengths))]
    assert len(calls) == 6 * (1 if image_ratio is None else 2)  # one shuffle per epoch (images and videos apart)
    fresh = GlobalPlan(shards, global_batch=3, seed=7, image_ratio=image_ratio)
    deep = sum(lengths[:5]) + 1
    assert [r.key for r in fresh.batch(deep)] == walked[deep]
    assert [[r.key for r in fresh.batch(p)] for p in range(sum(lengths))] == walked
    assert walked[:lengths[0]] != walked[lengths[0]:lengths[0] + lengths[1]]  # epochs are reshuffled


@pytest.mark.parametrize("image_ratio", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_the_image_ratio_holds_to_the_end_of_every_epoch(tmp_path_factory, image_ratio):
    """Each batch slot is an image with probability image_ratio, to the last one: the epoch ends where the kind
    drawn runs out. It used to append the other kind's surplus as a one-kind tail, so image_ratio=0 (the caption
    stage) still trained every image, all at the end of each epoch."""
    folder = make_shards(tmp_path_factory.mktemp("mix") / "shards", n_video=60, n_image=60, per_shard=30)
    plan = GlobalPlan(resolve_shards([str(folder)]), global_batch=1, seed=3, image_ratio=image_ratio)
    kinds = "".join("i" if plan.frames[b[0]] == 1 else "v" for e in range(20) for b in plan.epoch(e))
    if image_ratio in (0, 1):
        assert set(kinds) == {"i" if image_ratio else "v"}
        assert "left out" in plan.mix_note()
    else:
        assert abs(kinds.count("i") / len(kinds) - image_ratio) < 0.05, kinds.count("i") / len(kinds)
        for e in range(20):  # no one-kind tail: the last quarter of an epoch mixes like the rest
            epoch = "".join("i" if plan.frames[b[0]] == 1 else "v" for b in plan.epoch(e))
            tail = epoch[-len(epoch) // 4:]
            assert abs(tail.count("i") / len(tail) - image_ratio) < 0.45, epoch
        assert plan.mix_note() is None


def test_a_sample_that_goes_bad_after_the_scan_is_named(shards, tmp_path):
    plan = GlobalPlan(shards, global_batch=3, seed=0)
    ref = plan.batch(0)[0]
    copy = tmp_path / ref.shard.name
    copy.write_bytes(ref.shard.read_bytes())
    ref = type(ref)(copy, ref.key, ref.bucket, ref.frames, ref.members)
    assert load_sample(ref)["key"] == ref.key
    latent = dict((s, (o, n)) for s, o, n in ref.members)["latent.safetensors"]
    with open(copy, "r+b") as f:  # the latent's header now claims more bytes than the member has
        f.seek(latent[0])
        f.write((10**9).to_bytes(8, "little"))
    with pytest.raises(ShardError, match=f"{copy}: sample '{ref.key}' is unreadable") as caught:
        load_sample(ref)
    assert f"inspect_shards {copy.parent} --check" in str(caught.value) and "resume_with_new_data" in str(caught.value)


def test_shards_unreadable_on_another_rank_are_dropped_everywhere(shards):
    """Every rank plans from the same samples; the fingerprint a checkpoint keeps changes with them."""
    plan = GlobalPlan(shards, global_batch=3, seed=0)
    before = plan.fingerprint()
    plan.drop_shards({str(shards[1])})
    assert all(plan.ref(i).shard != shards[1] for i in plan.samples) and plan.bad_paths == [str(shards[1])]
    after = plan.fingerprint()
    assert after["samples"] == before["samples"] - 6 and after["unreadable_shards"] == 1
    assert after["shards_sha256"] != before["shards_sha256"]
    other = GlobalPlan(shards, global_batch=3, seed=0)
    other.drop_shards({str(shards[1])})
    assert other.fingerprint() == after
    assert [[r.key for r in plan.batch(p)] for p in range(4)] == [[r.key for r in other.batch(p)] for p in range(4)]


def test_buckets_smaller_than_a_global_batch_are_reported(tmp_path):
    folder = make_shards(tmp_path / "s", n_video=12, n_image=2, per_shard=7)
    with pytest.warns(UserWarning, match=r"2 sample\(s\) in bucket\(s\) smaller than the global batch of 3"):
        plan = GlobalPlan(resolve_shards([str(folder)]), global_batch=3, seed=0)
    assert plan.small_buckets == {"1x8x8": 2}
    assert all(r.bucket == "3x8x8" for p in range(8) for r in plan.batch(p))  # the images never come


def test_the_fingerprint_follows_the_order_of_the_shards(shards):
    """The shuffle indexes shards in the order given, so data.shards [A, B] and [B, A] plan other batches from the
    same files; the fingerprint (which only counted names) now says so. A checkpoint written before that key
    existed is not checked on it: it resumes as before."""
    import types

    from cogvx_ds.train.trainer import Trainer

    ab, ba = GlobalPlan(shards, global_batch=3, seed=0), GlobalPlan(shards[::-1], global_batch=3, seed=0)
    assert [[r.key for r in ab.batch(p)] for p in range(4)] != [[r.key for r in ba.batch(p)] for p in range(4)]
    assert ab.fingerprint()["shards_sha256"] == ba.fingerprint()["shards_sha256"]
    assert ab.fingerprint()["shards_order_sha256"] != ba.fingerprint()["shards_order_sha256"]

    def check(saved, plan):
        fake = types.SimpleNamespace(resume_from=("step00000002", {"data_plan": saved, "data_position": 6}),
                                     plan=plan, ckpt_dir=shards[0].parent, is_main=True,
                                     cfg=types.SimpleNamespace(train=types.SimpleNamespace(resume_with_new_data=False)))
        Trainer._check_data_plan(fake)

    check(ab.fingerprint(), ab)
    with pytest.raises(ValueError, match="the data plan changed since this checkpoint.*shards_order_sha256"):
        check(ab.fingerprint(), ba)
    old = {k: v for k, v in ab.fingerprint().items() if k != "shards_order_sha256"}
    check(old, ba)  # written before the key: not checked on it


def test_swapping_two_encodes_of_the_same_inputs_changes_the_fingerprint(tmp_path):
    """An LQ and an HQ encode of one input list have the same shard names and counts; listed the other way round
    they plan other batches, so the order key names each shard's folder."""
    lq = resolve_shards([str(make_shards(tmp_path / "lq" / "latents", n_video=6, n_image=0, size=(8, 8)))])
    hq = resolve_shards([str(make_shards(tmp_path / "hq" / "latents", n_video=6, n_image=0, size=(16, 16)))])
    a, b = GlobalPlan(lq + hq, global_batch=2, seed=0), GlobalPlan(hq + lq, global_batch=2, seed=0)
    assert [[str(r.shard) for r in a.batch(p)] for p in range(3)] != [[str(r.shard) for r in b.batch(p)] for p in range(3)]
    assert a.fingerprint()["shards_order_sha256"] != b.fingerprint()["shards_order_sha256"]
    import shutil  # a data folder moved and renamed keeps its fingerprint

    shutil.copytree(tmp_path / "lq", tmp_path / "moved_lq", copy_function=shutil.copy2)
    moved = resolve_shards([str(tmp_path / "moved_lq" / "latents")])
    assert GlobalPlan(moved + hq, global_batch=2, seed=0).fingerprint() == a.fingerprint()
