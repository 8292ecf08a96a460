"""Memory per rank, measured beside the analytic model (`cogvx_ds.perf_model`).

(a) ZeRO-3 model states vs number of ranks (1, 2, 4; gloo on CPU, bf16): the bytes of the partitions the
    DeepSpeed engine really holds after one optimizer step -- parameter partitions (`p.ds_tensor`), the gradient
    partition buffer, fp32 master partitions and Adam moments -- not process RSS.
(b) Activation memory per rank vs Ulysses SP degree (1, 2, 4) at a long sequence (8192 video tokens, width 256,
    2 layers, fp32 by default, RoPE): bytes of the storages autograd saves during one forward (saved-tensor hooks),
    against the analytic value and 1/SP of SP=1; and, as a cross-check, the net allocation the forward leaves
    alive (CPU memory profiler; reads a few MiB high under gloo, whose threads free tensors the profiler misses).

    python benchmarks/memory.py            # both, writes benchmarks/results/memory.json
    python benchmarks/memory.py --quick    # smaller sizes, ranks 1 and 2 only
    python benchmarks/memory.py --recompute-gelu   # (b) with model.recompute_gelu=true

(c) ZeRO-3's gathered working set: the most parameter elements held gathered at once during a step of a 42-block
    model whose stage3_max_live_parameters / stage3_max_reuse_distance are scaled to its blocks as the shipped
    config's are to the 5B model's, with and without activation checkpointing, beside the analytic count.

Each measurement runs under torchrun in its own processes (`--worker zero3|sp|gathered`, rank 0 writes a JSON
file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, write_results  # noqa: E402

MiB = 2**20
# (a): a model large enough that per-parameter partition padding is negligible, small enough for 4 CPU ranks.
ZERO3_MODEL = ["model.num_attention_heads=8", "model.attention_head_dim=32", "model.num_layers=4",
               "model.time_embed_dim=128", "model.text_embed_dim=64", "model.max_text_seq_length=16"]
# The shipped ZeRO-3 config, with a persistence threshold and reduce bucket sized for this small model.
ZERO3_DS = {"stage3_param_persistence_threshold": 10_000, "reduce_bucket_size": 1_000_000,
            "stage3_prefetch_bucket_size": 1_000_000}


def _layout_model(overrides: list[str]):
    from cogvx_ds.config import load_config

    return load_config("model/tiny", overrides=overrides)


# --------------------------------------------------------------------------------------------------- workers
def worker_zero3(out: Path, model_overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from cogvx_ds.parallel import init_distributed, state
    from cogvx_ds.perf_measure import zero3_state_bytes
    from cogvx_ds.perf_model import Layout, model_state_bytes
    from cogvx_ds.train.trainer import build_ds_config, build_engine

    cfg = _layout_model(model_overrides + [f"train.ds_config={ROOT / 'ds_configs' / 'zero3_bf16.json'}",
                                           "train.zero_stage=3", "train.precision=bf16"])
    ds = build_ds_config(cfg)
    ds["zero_optimization"].update(ZERO3_DS)
    init_distributed(backend="gloo")
    engine, model = build_engine(cfg, ds)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, m.in_channels, 8, 8, generator=g)
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim, generator=g)
    loss = engine(x, text, torch.tensor([500.0]), gather_output=False).float().square().mean()
    engine.backward(loss)
    engine.step()
    measured = zero3_state_bytes(engine)
    world = dist.get_world_size()
    analytic = model_state_bytes(m, Layout(dp=state.dp_size(), sp=state.sp_size(), zero_stage=3,
                                           persistence_threshold=ZERO3_DS["stage3_param_persistence_threshold"]))
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": dist.get_rank(), **measured})
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"ranks": world, "per_rank": rows, "analytic": analytic,
                                   "params_total": sum(p.ds_numel for p in model.parameters())}))
    dist.barrier()


def worker_gathered(out: Path, layers: int, live_blocks: float, reuse_blocks: float, checkpointing: bool) -> None:
    """(c) ZeRO-3's gathered working set: the most non-persistent parameter elements gathered at once during
    forward + backward (at every block's entry and exit), with stage3_max_live_parameters and
    stage3_max_reuse_distance given in blocks of this model, beside perf_model.zero3_gathered_numel."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from cogvx_ds.parallel import init_distributed
    from cogvx_ds.perf_model import Layout, zero3_gathered_numel
    from cogvx_ds.train.trainer import build_ds_config, build_engine

    cfg = _layout_model(ZERO3_MODEL[:-1] + [f"model.num_layers={layers}", "model.max_text_seq_length=16",
                                            f"model.activation_checkpointing={str(checkpointing).lower()}",
                                            f"train.ds_config={ROOT / 'ds_configs' / 'zero3_bf16.json'}",
                                            "train.zero_stage=3", "train.precision=bf16"])
    ds = build_ds_config(cfg)
    init_distributed(backend="gloo")
    from cogvx_ds.models import CogVideoXTransformer

    with torch.device("meta"):
        probe = CogVideoXTransformer(cfg.model)
    threshold = ZERO3_DS["stage3_param_persistence_threshold"]
    block = sum(p.numel() for p in probe.blocks[0].parameters() if p.numel() >= threshold)
    total = sum(p.numel() for b in probe.blocks for p in b.parameters() if p.numel() >= threshold)
    del probe
    zero = ds["zero_optimization"]
    zero.update(ZERO3_DS, stage3_max_live_parameters=int(live_blocks * block),
                stage3_max_reuse_distance=int(reuse_blocks * block), stage3_prefetch_bucket_size=int(0.5 * live_blocks * block))
    engine, model = build_engine(cfg, ds)
    params = [p for p in model.parameters() if p.ds_numel >= threshold]
    peak = [0]

    def note(*_):
        peak[0] = max(peak[0], sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))

    for b in [mod for mod in model.modules() if type(mod).__name__ == "ExpertBlock"]:
        b.register_forward_pre_hook(note)
        b.register_forward_hook(note)
        b.register_full_backward_hook(note)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, m.in_channels, 8, 8, generator=g)
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim, generator=g)
    peaks = []
    for _ in range(2):  # the second step runs with DeepSpeed's recorded module order (its prefetching)
        peak[0] = 0
        loss = engine(x, text, torch.tensor([500.0]), gather_output=False).float().square().mean()
        engine.backward(loss)
        engine.step()
        peaks.append(peak[0])
    lay = Layout(dp=1, max_live_parameters=zero["stage3_max_live_parameters"],
                 max_reuse_distance=zero["stage3_max_reuse_distance"], persistence_threshold=threshold)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"layers": layers, "checkpointing": checkpointing, "block": block,
                                   "measured": max(peaks), "analytic": zero3_gathered_numel(block, total, lay),
                                   "live_blocks": live_blocks, "reuse_blocks": reuse_blocks}))
    dist.barrier()


def worker_sp(out: Path, sp: int, model_overrides: list[str], latent: list[int], dtype_name: str) -> None:
    import torch
    import torch.distributed as dist

    from cogvx_ds.models import CogVideoXTransformer
    from cogvx_ds.parallel import init_distributed
    from cogvx_ds.perf_measure import live_bytes, model_constants, saved_tensor_bytes
    from cogvx_ds.perf_model import activation_bytes

    init_distributed(tensor_parallel=1, sequence_parallel=sp, backend="gloo")
    m = _layout_model(model_overrides).model
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = CogVideoXTransformer.from_config(m).to(dtype)
    f, h, w = latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, f, m.in_channels, h, w, generator=g, dtype=dtype)
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim, generator=g, dtype=dtype)
    t = torch.tensor([500.0])
    with torch.no_grad():  # warm-up: position tables are cached on the first call
        model(x, text, t, gather_output=False)

    def forward():
        return model(x, text, t, gather_output=False)

    out_t, saved = saved_tensor_bytes(forward, model_constants(model))
    del out_t
    out_t, live = live_bytes(forward)
    live -= out_t.numel() * out_t.element_size()  # the output is not an activation
    n_text, n_video = m.max_text_seq_length, f * h * w // m.patch_size**2
    analytic = activation_bytes(m, n_text, n_video, sp=sp, dtype_bytes=dtype.itemsize,
                                recompute_gelu=m.recompute_gelu)["stored"]
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"rank": dist.get_rank(), "saved": saved, "live": live})
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"sp": sp, "per_rank": rows, "analytic": analytic, "text_tokens": n_text,
                                   "video_tokens": n_video, "width": m.inner_dim, "layers": m.num_layers,
                                   "dtype": dtype_name}))
    dist.barrier()


# --------------------------------------------------------------------------------------------------- driver
def torchrun(nproc: int, *args: str, timeout: int = 600) -> dict:
    """Run this file as a worker on `nproc` CPU processes; return the JSON rank 0 wrote."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), *args, "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(out.read_text())


def zero3_row(res: dict) -> dict:
    ranks = res["per_rank"]
    worst = max(ranks, key=lambda r: r["model_states"])
    a = res["analytic"]
    return {"ranks": res["ranks"], "params_mib": worst["params"] / MiB, "grads_mib": worst["grads"] / MiB,
            "master_adam_mib": (worst["master"] + worst["adam"]) / MiB, "measured_mib": worst["model_states"] / MiB,
            "analytic_mib": a["model_states"] / MiB, "ratio": worst["model_states"] / a["model_states"],
            "persistent_mib": worst["persistent"] / MiB, "persistent_analytic_mib": a["persistent"] / MiB,
            "bucket_mib": worst["bucket"] / MiB}


def sp_row(res: dict, sp1: dict | None) -> dict:
    """The largest rank's bytes; `saved` (saved-tensor storages) is the precise measure. `live` (profiler) is a
    cross-check that reads a few MiB high under gloo: frees that happen on gloo's threads are not recorded."""
    saved = max(r["saved"] for r in res["per_rank"])
    live = max(r["live"] for r in res["per_rank"])
    row = {"sp": res["sp"], "tokens": res["text_tokens"] + res["video_tokens"], "saved_mib": saved / MiB,
           "live_mib": live / MiB, "analytic_mib": res["analytic"] / MiB, "saved_vs_analytic": saved / res["analytic"],
           "live_vs_analytic": live / res["analytic"]}
    if sp1 is not None:
        row["saved_vs_sp1_over_sp"] = saved / (max(r["saved"] for r in sp1["per_rank"]) / res["sp"])
        row["live_vs_sp1_over_sp"] = live / (max(r["live"] for r in sp1["per_rank"]) / res["sp"])
    else:
        row["saved_vs_sp1_over_sp"] = row["live_vs_sp1_over_sp"] = float("nan")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ranks 1-2, 2048 video tokens")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="ZeRO-3 world sizes and SP degrees")
    ap.add_argument("--latent", type=int, nargs=3, default=[8, 64, 64], metavar=("F", "H", "W"),
                    help="latent frames/height/width for (b); video tokens = F*H*W/4")
    ap.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"],
                    help="dtype of (b) (fp32: bf16 matmuls are emulated and slow on CPUs without AVX512-BF16)")
    ap.add_argument("--worker", choices=["zero3", "sp", "gathered"], help=argparse.SUPPRESS)
    ap.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--gathered", type=float, nargs=3, default=None, metavar=("LAYERS", "LIVE", "REUSE"),
                    help=argparse.SUPPRESS)  # worker (c): layers, max live / reuse distance in blocks
    ap.add_argument("--no-ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", nargs="*", default=None, help="model.* overrides (default: per measurement)")
    ap.add_argument("--recompute-gelu", action="store_true",
                    help="(b) with model.recompute_gelu=true (the GELU outputs rebuilt in backward, not kept)")
    args = ap.parse_args(argv)
    sp_model = ["model.num_attention_heads=8", "model.attention_head_dim=32", "model.num_layers=2",
                "model.max_text_seq_length=64", "model.use_rotary_positional_embeddings=true"]
    if args.worker == "zero3":
        worker_zero3(args.out, args.model if args.model is not None else ZERO3_MODEL)
        return 0
    if args.worker == "sp":
        worker_sp(args.out, args.sp, args.model if args.model is not None else sp_model, args.latent, args.dtype)
        return 0
    if args.worker == "gathered":
        layers, live, reuse = args.gathered or (42, 7.56, 7.56)  # 5B's blocks at the shipped 1e9 / 1e9
        worker_gathered(args.out, int(layers), live, reuse, not args.no_ckpt)
        return 0
    if args.quick:
        args.ranks, args.latent = [1, 2], [2, 64, 64]
    if args.recompute_gelu:
        sp_model.append("model.recompute_gelu=true")

    gathered = [torchrun(1, "--worker", "gathered", *(["--no-ckpt"] if not ckpt else []))
                for ckpt in (True, False)]
    print("(c) ZeRO-3 gathered parameters at once (42 blocks, max live / reuse distance of 7.56 blocks each: the "
          "5B model's at the shipped 1e9 / 1e9), in blocks")
    print_table([{"ckpt": "on" if r["checkpointing"] else "off", "measured": r["measured"] / r["block"],
                  "analytic": r["analytic"] / r["block"]} for r in gathered],
                [("ckpt", "checkpointing"), ("measured", "measured", "{:.2f}"), ("analytic", "analytic", "{:.2f}")])

    zero3_runs = [torchrun(n, "--worker", "zero3") for n in args.ranks]
    zero3 = [zero3_row(r) for r in zero3_runs]
    print("(a) ZeRO-3 model states per rank (bf16 params + grads, fp32 master + Adam), MiB, largest rank")
    print_table(zero3, [("ranks", "ranks"), ("params_mib", "params", "{:.2f}"), ("grads_mib", "grads", "{:.2f}"),
                        ("master_adam_mib", "master+Adam", "{:.2f}"), ("measured_mib", "measured", "{:.2f}"),
                        ("analytic_mib", "analytic", "{:.2f}"), ("ratio", "measured/analytic", "{:.3f}"),
                        ("persistent_mib", "persistent", "{:.2f}"),
                        ("persistent_analytic_mib", "persistent analytic", "{:.2f}")])

    sp_runs = []
    for sp in args.ranks:
        sp_runs.append(torchrun(sp, "--worker", "sp", "--sp", str(sp), "--dtype", args.dtype,
                                "--latent", *map(str, args.latent), "--model", *sp_model))
    sp1 = next((r for r in sp_runs if r["sp"] == 1), None)
    sp_rows = [sp_row(r, sp1) for r in sp_runs]
    r0 = sp_runs[0]
    gelu = ", GELU outputs recomputed" if args.recompute_gelu else ""
    print(f"\n(b) activations per rank, {r0['layers']} layers, width {r0['width']}, {r0['video_tokens']} video + "
          f"{r0['text_tokens']} text tokens, {r0['dtype']}{gelu}, MiB, largest rank")
    print_table(sp_rows, [("sp", "SP"), ("saved_mib", "saved tensors", "{:.1f}"),
                          ("analytic_mib", "analytic", "{:.1f}"), ("saved_vs_analytic", "saved/analytic", "{:.3f}"),
                          ("saved_vs_sp1_over_sp", "saved / (SP1/SP)", "{:.3f}"), ("live_mib", "live", "{:.1f}"),
                          ("live_vs_sp1_over_sp", "live / (SP1/SP)", "{:.3f}")])
    name = "memory_recompute_gelu" if args.recompute_gelu else "memory"
    path = write_results(name, {"zero3": zero3, "sp_activations": sp_rows, "zero3_gathered": gathered,
                                "zero3_model": ZERO3_MODEL,
                                "zero3_ds_overrides": ZERO3_DS, "sp_model": sp_model, "latent": args.latent,
                                "raw": {"zero3": zero3_runs, "sp": sp_runs}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
