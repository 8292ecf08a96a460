"""`make demo`: the whole cogvx_ds pipeline in miniature, on the CPU.

  1. synthetic captioned moving-shapes videos + stills, with held-out attribute combinations
  2. a tiny 3D causal VAE trained on those videos (2 processes, data parallel), exported in diffusers format
  3. a tiny random T5 text encoder (one token per caption word); latents + text embeddings pre-encoded into
     webdataset shards at low resolution (LQ) and at higher resolution (HQ), both encodes at once
  4. three training stages of the expert transformer: LQ pretraining -> HQ fine-tuning (2 processes, Ulysses
     sequence parallel, ZeRO-3) -> caption fine-tuning, each starting from the previous stage's weights (the
     one-process stages use ZeRO-2: ZeRO-3 over a single rank partitions nothing)
  5. videos sampled for the held-out prompts (DDIM, classifier-free guidance), written as mp4
  6. a score: simple colour / shape / motion classifiers read the decoded frames; accuracy next to chance

Everything lands in one run dir: data, shards, run dirs with TensorBoard logs and checkpoints, mp4s, score.json.
Each step is the same CLI a user would run (printed before it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    # name: (videos, images, heldout, vae_steps, lq_steps, hq_steps, caption_steps, batch, sample_steps)
    "full": (500, 120, 24, 500, 600, 100, 100, 32, 25),
    "quick": (48, 16, 6, 4, 6, 4, 4, 8, 4),
}
LQ_SIZE, HQ_SIZE = 32, 48  # pixels; the demo VAE compresses 4x in space (and 4x in time)
# The demo VAE: 4x spatial compression and 16 channels (a 12x compression, against 48x for CogVideoX's 8x/16 ch):
# a VAE trained for a few minutes keeps colour only at such mild compression. Colour (chroma) is learnt after
# luminance; the chroma-weighted L2 loss brings it forward.
# A strong KL: 1e-6 per latent element summed, i.e. 0.0276 per video element of a 3x9x32x32 clip (kl_weight's
# unit, as in taming): with taming's 1e-6 the 500-step VAE's latents stray further from the prior and the DiT scored
# shape 21% / motion 21% against 25% / 25% with this weight (VAE round trip of shapes 92% against 96%).
VAE_ARGS = ["model.block_out_channels=[16,32,64]", "model.latent_channels=16", "recon=l2", "betas=[0.9,0.99]",
            "lr=0.002", "batch_size=4", "height=32", "width=32", "frames=9",  # batch 4 on each of 2 processes
            "kl_weight=0.027648"]
# Shapes a third of the frame across: the 1.7M-parameter DiT learns their colour within its few hundred steps
# (with make_synthetic's default radius 0.15-0.2 it did not, in 1000 steps).
SHAPE_ARGS = ["--radius", "0.22,0.28", "--travel", "0.2"]
TEXT_LEN = 16  # tokens per caption: the demo's captions have at most 10 words (+ </s>)


_HINT = ""  # set by main when the run dir already held a demo: its steps resume from what is there


def _run(cmd: list, log: Path, env: dict | None = None) -> float:
    return _run_together([cmd], [log], env)


def _run_together(cmds: list[list], logs: list[Path], env: dict | None) -> float:
    """Run commands at the same time, each appending to its log; on a failure stop the others and show the tail.
    (Two 1-thread processes beat one 2-thread process on a 2-core box, hence the encodes run together.)"""
    t0 = time.time()
    procs = []
    for cmd, log in zip(cmds, logs):
        print("   $ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
        with open(log, "a") as f:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env))
    for proc, log in zip(procs, logs):
        if proc.wait() != 0:
            for other in procs:
                other.kill()
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"step failed (exit {proc.returncode}); last lines of {log}:\n{tail}{_HINT}")
    return time.time() - t0


def _latent_std(shards: Path) -> float:
    """Std of the latents training draws (posterior mean + std * eps): 1/std becomes data.latent_scale."""
    import torch

    from cogvx_ds.data.shards import iter_shard

    samples = [s for shard in sorted(shards.glob("*.tar"))[:2] for s in iter_shard(shard)]
    means = torch.cat([s.mean.float().flatten() for s in samples])
    noise_var = torch.cat([s.logvar.float().exp().flatten() for s in samples]).mean()
    return (means.var() + noise_var).sqrt().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cogvx_ds.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS),
                    help="full: the real miniature (10-16 min on 2 cores); quick: a smoke run of every step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n_vid, n_img, n_held, vae_steps, lq_steps, hq_steps, cap_steps, batch, sample_steps = PRESETS[args.preset]
    run = Path(args.run_dir).resolve()
    global _HINT
    if run.is_dir() and any(run.iterdir()):
        _HINT = (f"\n{run} already held a demo run, and each step resumes from what it finds there; if that "
                 f"was made by another version or other settings, remove it or pass --run-dir NEW_DIR")
    run.mkdir(parents=True, exist_ok=True)
    log = run / "demo.log"
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    timings = {}
    t_start = time.time()
    print(f"cogvx_ds demo ({args.preset}) -> {run}   (full log: {log})\n", flush=True)

    print("1/6 synthetic captioned videos (shape x colour x motion x background), held-out combinations", flush=True)
    data = run / "data"
    timings["data"] = _run([py, "-m", "data_tools.make_synthetic", "--out", data, "--num-videos", n_vid,
                            "--num-images", n_img, "--num-heldout", n_held, "--frames", 9, "--height", HQ_SIZE,
                            "--width", HQ_SIZE, *SHAPE_ARGS, "--seed", args.seed, "--no-progress"], log, env)

    print("2/6 tiny 3D causal VAE trained on the videos (2 processes; L2 + KL, the 3D GAN is off at this budget), "
          "exported in diffusers format", flush=True)
    vae_run = run / "vae"
    one_thread = dict(env, OMP_NUM_THREADS="1")
    ddp = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    timings["vae"] = _run([*ddp, "-m", "cogvx_ds.train_vae", "--run-dir", vae_run, "--steps", vae_steps,
                           f"data={data / 'videos.txt'}", *VAE_ARGS, f"disc_start={vae_steps + 1}",
                           f"ckpt_every={max(1, vae_steps // 2)}", f"video_every={max(1, vae_steps // 2)}",
                           f"seed={args.seed}"], log, one_thread)
    vae = vae_run / "export"

    print(f"3/6 tiny T5 text encoder; latents + text embeddings into shards (LQ {LQ_SIZE}x{LQ_SIZE}, "
          f"HQ {HQ_SIZE}x{HQ_SIZE}, 9 frames)", flush=True)
    t5 = run / "text_encoder"
    _run([py, "-c", f"import json; from cogvx_ds.models.text_encoder import build_tiny_t5; "
                    f"captions = [json.loads(x)['caption'] for x in open({str(data / 'manifest.jsonl')!r})]; "
                    f"build_tiny_t5({str(t5)!r}, d_model=64, seed={args.seed}, vocabulary=captions)"], log, env)
    encodes = [[py, "-m", "data_tools.encode_latents", "--input", data / "videos.txt", "--out", run / f"shards_{name}",
                "--vae", vae, "--text-encoder", t5, "--text-max-length", TEXT_LEN,
                "--buckets", f"{size}x{size}x9,{size}x{size}x1", "--fps", 8, "--samples-per-shard", 128,
                "--no-progress"] for name, size in (("lq", LQ_SIZE), ("hq", HQ_SIZE))]
    timings["encode"] = _run_together(encodes, [run / "encode_lq.log", run / "encode_hq.log"], one_thread)
    scale = 1.0 / _latent_std(run / "shards_lq")

    print(f"4/6 three training stages (data.latent_scale = {scale:.3f}): LQ (ZeRO-2) -> HQ (2 processes, SP=2, "
          "ZeRO-3) -> captions (ZeRO-2)", flush=True)
    common = ["--config", "model/demo", f"model.max_text_seq_length={TEXT_LEN}", f"data.latent_scale={scale}",
              f"train.micro_batch_size={batch}",
              "train.precision=fp32", "parallel.backend=gloo", "data.num_frames=9",
              "data.vae_spatial_compression=4", "train.log_every=1",
              "data.image_ratio=0.2", f"train.seed={args.seed}", "diffusion.caption_dropout=0.1"]
    stages = [("lq_pretrain", "lq", lq_steps, LQ_SIZE, ["train.lr=1e-3", f"train.warmup_steps={max(1, lq_steps // 20)}"]),
              ("hq_finetune", "hq", hq_steps, HQ_SIZE, ["train.lr=5e-4", "train.warmup_steps=1"]),
              ("caption_finetune", "hq", cap_steps, HQ_SIZE, ["train.lr=2e-4", "train.warmup_steps=1"])]
    previous = None
    for stage, shards, steps, size, extra in stages:
        stage_run = run / stage
        cmd = [*common, "--config", f"stages/{stage}", f"train.run_dir={stage_run}", f"data.shards=[{run / f'shards_{shards}'}]",
               f"train.max_steps={steps}", f"train.save_every={max(1, steps // 2)}", f"data.height={size}",
               f"data.width={size}", *extra, f"train.init_from={previous}" if previous else "train.init_from=null"]
        if stage == "hq_finetune":
            launch = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cogvx_ds.train",
                      "parallel.sequence_parallel=2", f"train.micro_batch_size={batch}"]
            timings[stage] = _run([*launch, *cmd], log, dict(env, OMP_NUM_THREADS="1"))
        else:
            # One process: ZeRO-3 would partition over a group of one and only add its per-module gather hooks
            # (1.5x slower LQ steps for this 1.7M-parameter model); ZeRO-2 runs the same DeepSpeed engine and gives
            # the same losses. The HQ stage above is the ZeRO-3 + sequence-parallel run.
            timings[stage] = _run([py, "-m", "cogvx_ds.train", *cmd, "train.zero_stage=2"], log, env)
        metrics = [json.loads(x) for x in (stage_run / "metrics.jsonl").read_text().splitlines()]
        print(f"   {stage}: loss {metrics[0]['loss']:.3f} -> {_tail_mean(metrics):.3f} over {len(metrics)} steps, "
              f"{timings[stage]:.0f}s", flush=True)
        previous = stage_run

    print("5/6 sampling the held-out prompts (never seen in training): DDIM, guidance 4", flush=True)
    heldout = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines()]
    heldout = [r for r in heldout if r["split"] == "heldout" and r["kind"] == "video"]
    (run / "heldout_prompts.txt").write_text("".join(r["caption"] + "\n" for r in heldout))
    timings["sample"] = _run([py, "-m", "cogvx_ds.sample", "--model", previous, "--vae", vae, "--text-encoder", t5,
                              "--prompts-file", run / "heldout_prompts.txt", "--out", run / "samples", "--frames", 9,
                              "--height", HQ_SIZE, "--width", HQ_SIZE, "--steps", sample_steps, "--guidance", 4, "--batch-size",
                              8, "--seed", args.seed], log, env)

    print("6/6 scoring the sampled videos with simple colour / shape / motion classifiers", flush=True)
    score = score_samples(run / "samples", heldout)
    score["vae_ceiling"] = vae_ceiling(vae, data, heldout)
    score["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    score["total_s"] = round(time.time() - t_start, 1)
    (run / "score.json").write_text(json.dumps(score, indent=2))
    print_score(score)
    print(f"\nTensorBoard: tensorboard --logdir {run}    videos: {run / 'samples'}    score: {run / 'score.json'}")
    return 0


def _tail_mean(metrics: list[dict], n: int = 20) -> float:
    tail = metrics[-n:]
    return sum(m["loss"] for m in tail) / len(tail)


def score_samples(samples: Path, heldout: list[dict]) -> dict:
    from data_tools._video_io import read_video
    from data_tools.make_synthetic import COLORS, MOTIONS, SHAPES, classify_clip

    records = json.loads((samples / "samples.json").read_text())
    truth = {r["caption"]: r["attributes"] for r in heldout}
    hits = dict.fromkeys(ATTRIBUTES, 0)
    per_sample = []
    for rec in records:
        frames, _ = read_video(samples / rec["path"])
        got = classify_clip(frames)
        row = {"prompt": rec["prompt"], "path": rec["path"], "read": got}
        row.update({f"{attr}_ok": ok for attr, ok in _tally(hits, got, truth[rec["prompt"]]).items()})
        per_sample.append(row)
    chance = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "motion": 1 / len(MOTIONS)}
    return {"num_prompts": len(records), "accuracy": _rates(hits, len(records)), "chance": chance,
            "samples": per_sample}


ATTRIBUTES = ("color", "shape", "motion")


def _tally(hits: dict, got: dict, want: dict) -> dict:
    """Add one clip's classifier reading to `hits`; returns {attribute: correct?}."""
    ok = {attr: got.get(attr) == want[attr] for attr in ATTRIBUTES}
    for attr, right in ok.items():
        hits[attr] += right
    return ok


def _rates(hits: dict, n: int) -> dict:
    return {k: v / max(1, n) for k, v in hits.items()}


def vae_ceiling(vae_dir: Path, data: Path, heldout: list[dict]) -> dict:
    """Accuracy of the same classifiers on the held-out clips themselves after a VAE round trip (encode, decode
    the posterior mean): the best the generated videos can score through this VAE."""
    import numpy as np
    import torch

    from cogvx_ds.models.vae import CogVideoXVAE
    from cogvx_ds.sample import to_uint8
    from data_tools._video_io import read_video
    from data_tools.make_synthetic import classify_clip

    vae = CogVideoXVAE.from_diffusers(vae_dir).eval()
    hits = dict.fromkeys(ATTRIBUTES, 0)
    with torch.no_grad():
        for rec in heldout:
            frames, _ = read_video(data / rec["path"])
            x = torch.from_numpy(np.asarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
            _tally(hits, classify_clip(to_uint8(vae.decode(vae.encode(x)[0])[0].clamp(-1, 1))), rec["attributes"])
    return _rates(hits, len(heldout))


def print_score(score: dict) -> None:
    print(f"\n   held-out prompts: {score['num_prompts']} (attribute combinations never seen in training)")
    ceiling = score.get("vae_ceiling")
    print(f"   {'attribute':<10}{'accuracy':>10}{'chance':>10}" + (f"{'VAE round trip':>16}" if ceiling else ""))
    for attr in ATTRIBUTES:
        print(f"   {attr:<10}{score['accuracy'][attr]:>10.0%}{score['chance'][attr]:>10.0%}"
              + (f"{ceiling[attr]:>16.0%}" if ceiling else ""))
    if ceiling:
        print("   (VAE round trip: the held-out clips themselves, encoded and decoded by the demo VAE: the most the "
              "samples can score)")
    print(f"   total time {score['total_s'] / 60:.1f} min: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in score["timings_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
