"""Latent data loader benchmark: samples/s the loader delivers vs samples/s one training step consumes.

Writes latent shards shaped like the config's data (bf16 posterior mean/logvar [C, F, H, W] + text embeddings,
`--samples` samples in shards of `--per-shard`), then measures on this machine:
  1. loader alone: cogvx_ds.data.loader's GlobalPlan + RankLoader (prefetch thread, data.prefetch batches) drained
     as fast as possible, micro-batches of train.micro_batch_size;
  2. training step alone: the config's transformer, forward + backward + AdamW on one micro-batch of the same
     shape (a bare step, no DeepSpeed: faster than the trainer's, so the ratio below is a conservative one), with
     1 thread and with torch's default thread count; the faster one counts (on a small, busy CPU one thread can
     be several times faster for a tiny model: every parallel region waits for a descheduled thread);
  3. both together: every step takes its batch from the loader, as the trainer does, and the time spent waiting
     for data is recorded (the loader thread shares the CPU with the step here).
Done when the loader delivers >= 5x what a step consumes (ratio of 1 over 2) and steps never wait in 3.
  4. start-up: building the global plan over `--plan-samples` samples (tiny latents: only the plan's work counts),
     from the shards' manifests and by walking the tars, and the plan's memory per sample (tracemalloc) against
     an object per sample (a SampleRef each, as plans held before the columns); both scaled to 10M samples.

    python benchmarks/loader.py                 # cogvx_ds/configs/tiny.yaml
    python benchmarks/loader.py --quick
Writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median, print_table, write_results  # noqa: E402


def write_shards(folder: Path, n: int, per_shard: int, latent: tuple, text: tuple) -> list[Path]:
    from cogvx_ds.data.shards import ShardWriter, write_index

    g = torch.Generator().manual_seed(0)
    entries, writer = [], None
    c, f, h, w = latent
    for i in range(n):
        if i % per_shard == 0:
            if writer:
                entries.append(writer.close())
            writer = ShardWriter(folder / f"shard-{i // per_shard:05d}.tar")
        mean = torch.randn(latent, generator=g)
        writer.add(f"s{i:06d}", mean, torch.full_like(mean, -4.0),
                   {"caption": f"sample {i}", "bucket": f"{f}x{h}x{w}", "latent_frames": f},
                   text_embedding=torch.randn(text, generator=g))
    entries.append(writer.close())
    write_index(folder, entries)
    return sorted(folder.glob("shard-*.tar"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="packaged config name or YAML path (default: tiny)")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batches", type=int, default=300, help="micro-batches drained in the loader-alone run")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed (alone, and with the loader)")
    ap.add_argument("--plan-samples", type=int, default=50000, help="samples in the start-up measurement (4.)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.per_shard, args.batches, args.steps = 256, 64, 100, 6
        args.plan_samples = min(args.plan_samples, 4000)
    plan_row = plan_start(args.plan_samples)

    from cogvx_ds.config import load_config, validate
    from cogvx_ds.data.loader import GlobalPlan, RankLoader
    from cogvx_ds.models import CogVideoXTransformer

    cfg = validate(load_config(args.config))
    m, d, t = cfg.model, cfg.data, cfg.train
    latent = (m.in_channels, (d.num_frames - 1) // m.temporal_compression_ratio + 1,
              d.height // d.vae_spatial_compression, d.width // d.vae_spatial_compression)
    text_shape = (m.max_text_seq_length, m.text_embed_dim)
    micro = t.micro_batch_size

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), args.samples, args.per_shard, latent, text_shape)
        plan = GlobalPlan(shards, micro, seed=0)

        # 1. loader alone
        loader = RankLoader(plan, 0, 1, micro, 1, prefetch=d.prefetch)
        loader.next()  # first batch: thread start-up and plan build
        t0 = time.perf_counter()
        for _ in range(args.batches):
            loader.next()
        loader_sps = args.batches * micro / (time.perf_counter() - t0)
        loader.close()

        # 2. training step alone (fp32 here, like the tiny config)
        torch.manual_seed(0)
        model = CogVideoXTransformer.from_config(m)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(batch):
            mean, logvar = batch["mean"].float(), batch["logvar"].float()
            z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * d.latent_scale
            x = z.permute(0, 2, 1, 3, 4)  # [b, F, C, H, W]
            out = model(x, batch["text"].float(), torch.randint(0, 1000, (x.shape[0],)).float())
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fixed = {"mean": torch.randn(micro, *latent).bfloat16(), "logvar": torch.full((micro, *latent), -4.0),
                 "text": torch.randn(micro, *text_shape)}
        default_threads = torch.get_num_threads()
        step_times = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            step(fixed)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(fixed)
                times.append(time.perf_counter() - t0)
            step_times[threads] = median(times)
        threads = min(step_times, key=step_times.get)
        torch.set_num_threads(threads)
        step_s = step_times[threads]
        step_sps = micro / step_s

        # 3. both: the step pulls its batches from the loader
        loader = RankLoader(plan, 0, 1, micro, 1, prefetch=d.prefetch)
        step(loader.next())
        waits, totals = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = loader.next()
            t1 = time.perf_counter()
            step(batch)
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
        loader.close()

    row = {"config": args.config, "latent": list(latent), "micro_batch": micro, "prefetch": d.prefetch,
           "step_threads": threads, "step_s_by_threads": step_times,
           "loader_samples_per_s": loader_sps, "step_s": step_s, "step_samples_per_s": step_sps,
           "ratio": loader_sps / step_sps, "with_loader_samples_per_s": args.steps * micro / sum(totals),
           "data_wait_fraction": sum(waits) / sum(totals), "max_wait_ms": 1e3 * max(waits)}
    print(f"\nLatent loader vs training step, config {args.config}: latents {tuple(latent)} bf16 + text "
          f"{text_shape}, micro-batch {micro}, prefetch {d.prefetch}; step with {threads} thread(s) (s/step by "
          f"threads: {', '.join(f'{k}: {v:.4f}' for k, v in step_times.items())})")
    print_table([row], [("loader_samples_per_s", "loader samples/s", "{:.0f}"),
                        ("step_samples_per_s", "step consumes samples/s", "{:.1f}"),
                        ("ratio", "loader/step", "{:.1f}x"),
                        ("with_loader_samples_per_s", "train+loader samples/s", "{:.1f}"),
                        ("data_wait_fraction", "time waiting for data", "{:.1%}"),
                        ("max_wait_ms", "longest wait ms", "{:.1f}")])
    print(f"done-when (loader >= 5x a step's consumption): {'yes' if row['ratio'] >= 5 else 'NO'}")
    path = write_results("loader", {**row, "plan_start": plan_row})
    print(f"wrote {path}")
    return 0


def plan_start(n: int, per_shard: int = 1000) -> dict:
    """Time and memory of building the global plan over n samples, from manifests and from the tars (4.)."""
    import tracemalloc
    import warnings

    from cogvx_ds.data.loader import GlobalPlan
    from cogvx_ds.data.shards import manifest_path

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), n, per_shard, (1, 1, 1, 1), (1, 1))
        times = {}
        for source in ("manifests", "tar walk"):
            if source == "tar walk":
                for shard in shards:
                    manifest_path(shard).unlink()
            t0 = time.perf_counter()
            plan = GlobalPlan(shards, 8, seed=0)
            times[source] = time.perf_counter() - t0
        del plan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            plan = GlobalPlan(shards, 8, seed=0)
            columns = tracemalloc.get_traced_memory()[0] - base
            objects = [plan.ref(i) for i in range(len(plan))]
            per_object = (tracemalloc.get_traced_memory()[0] - base - columns) / n
            tracemalloc.stop()
        del objects
    scale = 10_000_000 / n
    row = {"samples": n, "per_shard": per_shard, "manifests_s": times["manifests"], "tar_walk_s": times["tar walk"],
           "speedup": times["tar walk"] / times["manifests"], "columns_bytes_per_sample": columns / n,
           "objects_bytes_per_sample": per_object, "manifests_s_at_10M": times["manifests"] * scale,
           "tar_walk_s_at_10M": times["tar walk"] * scale, "columns_GB_at_10M": columns * scale / 1e9,
           "objects_GB_at_10M": per_object * 1e7 / 1e9}
    print(f"\nStart-up: the global plan over {n} samples in shards of {per_shard} (per rank; scaled to 10M samples)")
    print_table([row], [("manifests_s", "from manifests s", "{:.2f}"), ("tar_walk_s", "tar walk s", "{:.2f}"),
                        ("speedup", "speed-up", "{:.1f}x"), ("manifests_s_at_10M", "at 10M s", "{:.0f}"),
                        ("tar_walk_s_at_10M", "walk at 10M s", "{:.0f}"),
                        ("columns_bytes_per_sample", "B/sample", "{:.0f}"),
                        ("objects_bytes_per_sample", "object per sample B", "{:.0f}"),
                        ("columns_GB_at_10M", "GB at 10M", "{:.1f}"), ("objects_GB_at_10M", "objects GB at 10M", "{:.1f}")])
    return row


if __name__ == "__main__":
    sys.exit(main())
