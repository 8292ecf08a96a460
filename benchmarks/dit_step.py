"""DiT training-step benchmark: forward + backward + (fused) AdamW step of ours vs diffusers' CogVideoXTransformer3DModel.

Same config and weights (ours loaded from the diffusers model's save_pretrained), fp32 and bf16. The variants run
interleaved within every round (ours, diffusers, ... and the order rotates), and a short square-matmul peak is
measured at the start of every round, so machine noise (other processes on a small CPU) hits all of them alike.
Reports the median over rounds of the per-round time ratio (diffusers / ours: > 1 means ours is faster),
tokens/s, achieved model GFLOP/s and the matmul peak.

A per-op breakdown (torch.profiler on extra, untimed steps) splits each variant's forward + backward into linear
layers, attention, norms, element-wise work and copies, and gives the linear layers' own GFLOP/s (their FLOPs from
the recorded matmul shapes over their kernel time) as a percentage of the matmul peak.

GPU (`--device cuda`, for a lent accelerator): the same step in bf16 on the 2B/5B shapes with fewer layers
(`--preset 2b|5b --layers 2`: 49x480x720 clips, 226 text tokens), timed with CUDA synchronisation; the peak is a
dense bf16 matmul measured on the card in the same run, so "% of peak" is the model FLOPs utilisation (MFU)
against it, and `--spec-tflops` adds the MFU against the card's datasheet peak. Peak memory per variant is
reported; the per-op breakdown is CPU-only.

bf16: on CPUs where oneDNN has no native bf16 kernels (AVX2-only), ours runs its matmul-type ops in fp32 from the
bf16 weights (`model.cpu_half_compute=auto`, printed as "ours[bf16 storage, fp32 matmul]"); diffusers runs native
bf16. `--bf16-native` adds ours with native bf16 matmuls (slow there) for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    device_clock,
    matmul_peak_gflops,
    median,
    op_breakdown,
    print_table,
    write_results,
)

# Model shapes: the default CPU size, and CogVideoX-2B / -5B at 49x480x720 (13 latent frames of 60x90, 226 text
# tokens, T5-XXL embeddings); --layers picks how many of their blocks to run.
PRESETS = {
    "cpu": dict(heads=8, head_dim=64, latent=[4, 32, 32], text_len=64, text_dim=512, rope=True),
    "2b": dict(heads=30, head_dim=64, latent=[13, 60, 90], text_len=226, text_dim=4096, rope=False),
    "5b": dict(heads=48, head_dim=64, latent=[13, 60, 90], text_len=226, text_dim=4096, rope=True),
}


def model_flops(layers: int, dim: int, n_tokens: int, heads_dim: int, latent_patches: int, text_len: int,
                text_in_last_block: bool = True) -> float:
    """Matmul FLOPs of one forward pass (linear layers + attention), times 3 for forward + backward.
    text_in_last_block=False: ours, whose last block runs the text tokens as keys and values only (no text
    queries, output projection or MLP: cogvx_ds.models.dit.layers.ExpertBlock); diffusers computes them."""
    seq = n_tokens + text_len
    per_layer = 2 * seq * dim * 3 * dim + 2 * seq * dim * dim + 2 * 2 * seq * dim * 4 * dim + 2 * 2 * seq * seq * dim
    skipped = 0 if text_in_last_block else 2 * text_len * dim * dim * 9 + 2 * 2 * text_len * seq * dim
    return 3 * (layers * per_layer - skipped)


def _iqr(ratios) -> str:
    """The per-round ratios' middle half (25th-75th percentile): how much the machine moved them around."""
    if len(ratios) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{q1:.2f}-{q3:.2f}x"


def _step_fn(model, x, text, t, rope, is_ref: bool, clock=time.perf_counter):
    # The same optimizer for both: AdamW with its fused CPU kernel (one pass per tensor; the for-loop default costs
    # ~10 kernel launches per parameter, which would swamp a tiny model). Under ZeRO the trainer steps flat fp32
    # partitions, which is closer to this than to the per-parameter loop.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        if is_ref:
            out = model(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
        else:
            out = model(x, text, t)
        out.float().square().mean().backward()

    def step():
        t0 = clock()
        fwd_bwd()
        t1 = clock()
        opt.step()
        return clock() - t0, t1 - t0

    return step, fwd_bwd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="model shape: cpu (hidden 512, 1024 video + 64 text tokens) or CogVideoX-2B/5B at "
                         "49x480x720; --heads/--head-dim/--latent/--text-len override its values")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset's)")
    ap.add_argument("--head-dim", type=int, default=None, help="channels per head (default: the preset's)")
    ap.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                    help="latent frames, height, width (tokens = F*H*W/4)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default: the preset's)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] on a GPU machine (bf16 by default there)")
    ap.add_argument("--spec-tflops", type=float, default=None,
                    help="GPU only: the card's datasheet dense peak in the benchmark dtype (e.g. 989 for H100/H200 "
                         "bf16), for an MFU against it beside the measured one")
    ap.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    ap.add_argument("--reps", type=int, default=15,
                    help="timed rounds per dtype, default 15 (bf16 on a CPU without native bf16 kernels: "
                         "min(reps, 3), it is slow there); a 2-core VM's step-to-step noise is +-10%%, so fewer "
                         "rounds give unsteady medians")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this thread's CPU time (needs --threads 1); steadier than wall time on a CPU shared "
                         "with other work, since time spent descheduled is not counted")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32 and bf16 on the CPU, bf16 on a GPU")
    ap.add_argument("--compile", action="store_true", help="also time ours with model.compile_blocks=true")
    ap.add_argument("--linear-kernels", action="store_true",
                    help="also time ours with model.cpu_linear=aten (F.linear / MKL), the before of the oneDNN "
                         "linear kernel that ours uses by default on x86 CPUs")
    ap.add_argument("--attention-kernels", action="store_true",
                    help="also time ours with model.cpu_attention=sdpa (torch SDPA everywhere: the before of the CPU "
                         "tiled attention kernel, which the default routes bfloat16 to)")
    ap.add_argument("--recompute-gelu", action="store_true",
                    help="also time ours with model.recompute_gelu=true (GELU outputs rebuilt in backward: less "
                         "activation memory, reported as step GiB on a GPU)")
    ap.add_argument("--bf16-native", action="store_true",
                    help="also time ours with native bf16 matmuls (model.cpu_half_compute=native)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op breakdown")
    ap.add_argument("--quick", action="store_true", help="seconds: 1 layer, 512 tokens, 2 rounds")
    args = ap.parse_args(argv)
    from cogvx_ds.utils import tune_malloc

    tune_malloc()  # as the trainer does; this process runs both implementations, so both get it
    preset = PRESETS[args.preset]
    for key in ("heads", "head_dim", "latent", "text_len"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.quick:
        args.layers, args.latent, args.reps = 1, [2, 32, 32], 2
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this PyTorch sees no CUDA device")
    if args.dtypes is None:
        args.dtypes = ["bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    if device.type == "cuda":
        args.no_profile = True  # the per-op breakdown reads CPU kernels
        if args.clock == "cpu":
            ap.error("--clock cpu measures host CPU time; use the default wall clock on a GPU")
    if args.spec_tflops is not None and device.type != "cuda":
        ap.error("--spec-tflops is for GPU runs (--device cuda)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu needs --threads 1 (the other threads' work would not be counted)")
    clock = device_clock(device, time.thread_time if args.clock == "cpu" else time.perf_counter)

    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from cogvx_ds.models import CogVideoXTransformer
    from cogvx_ds.models.dit.fused import compute_dtype, native_half_supported

    f, h, w = args.latent
    cfg = dict(num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16, out_channels=16,
               time_embed_dim=512, text_embed_dim=preset["text_dim"], num_layers=args.layers,
               sample_frames=4 * (f - 1) + 1, sample_height=h, sample_width=w, max_text_seq_length=args.text_len,
               use_rotary_positional_embeddings=preset["rope"])
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**cfg)
    rope = None
    if preset["rope"]:
        rope = tuple(r.to(device) for r in get_3d_rotary_pos_embed(
            args.head_dim, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f, use_real=True))
    tokens = f * h * w // 4
    dim = args.heads * args.head_dim
    flops = args.batch * model_flops(args.layers, dim, tokens, args.head_dim, tokens, args.text_len)  # diffusers'
    ours_flops = args.batch * model_flops(args.layers, dim, tokens, args.head_dim, tokens, args.text_len, False)

    rows, breakdowns, reps_used, peak_dtypes = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        for dt_name in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
            ref.to(device=device, dtype=dtype)

            def build(dtype=dtype, **overrides):
                return CogVideoXTransformer.from_diffusers(d, dtype=dtype, **overrides).to(device)
            variants = {"ours": build()}
            label = {"ours": "ours", "diffusers": "diffusers"}
            mode = getattr(variants["ours"].config, "cpu_half_compute", "native")
            if compute_dtype(mode, dtype, device) is not None:
                label["ours"] = f"ours[{dt_name} storage, fp32 matmul]"
            if args.compile:
                variants["ours+compile"] = build(compile_blocks=True)
                label["ours+compile"] = label["ours"] + "+compile"
            if args.linear_kernels:
                variants["ours_aten"] = build(cpu_linear="aten")
                label["ours_aten"] = label["ours"] + "[aten linear]"
            if args.attention_kernels:
                variants["ours_sdpa"] = build(cpu_attention="sdpa")
                label["ours_sdpa"] = label["ours"] + "[sdpa attention]"
            if args.recompute_gelu:
                variants["ours_regelu"] = build(recompute_gelu=True)
                label["ours_regelu"] = label["ours"] + "[recompute_gelu]"
            if args.bf16_native and dt_name == "bf16":
                variants["ours_native"] = build(cpu_half_compute="native")
                label["ours_native"] = "ours[native bf16]"
            variants["diffusers"] = ref
            x = torch.randn(args.batch, f, 16, h, w, dtype=dtype).to(device)
            text = torch.randn(args.batch, args.text_len, preset["text_dim"], dtype=dtype).to(device)
            t = torch.full((args.batch,), 500.0, device=device)
            fns = {k: _step_fn(m, x, text, t, rope, k == "diffusers", clock) for k, m in variants.items()}
            for name, (step, _) in fns.items():  # warm-up (compiles the compiled variant)
                for _ in range(3 if "compile" in name else 1):
                    step()
            slow_half = device.type == "cpu" and dtype != torch.float32 and not native_half_supported(dtype)
            # the peak is the matmul rate in the dtype ours' matmuls run in: bf16 where the CPU has native bf16
            # kernels (there about 2x fp32's), fp32 where ours computes in fp32 from bf16 storage
            peak_dtype = compute_dtype(mode, dtype, device) or dtype
            peak_dtypes[dt_name] = str(peak_dtype).replace("torch.", "")
            reps = min(args.reps, 3) if slow_half else args.reps
            reps_used[dt_name] = reps
            times = {k: [] for k in fns}
            fwd_bwd_times = {k: [] for k in fns}
            peaks = []
            names = list(fns)
            for r in range(reps):
                peaks.append(matmul_peak_gflops(peak_dtype, reps=3, clock=clock) if device.type == "cpu"
                             else matmul_peak_gflops(dtype, n=8192, reps=10, device=device))
                for name in names[r % len(names):] + names[:r % len(names)]:
                    total, fb = fns[name][0]()
                    times[name].append(total)
                    fwd_bwd_times[name].append(fb)
            peak = median(peaks)
            memory = {}
            if device.type == "cuda":  # peak memory of one step over what the resident models already hold
                for name, (step, _) in fns.items():
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)
                    step()
                    memory[name] = (torch.cuda.max_memory_allocated(device) - resident) / 2**30
            if not args.no_profile:
                for name in ("ours", "diffusers"):
                    breakdowns[f"{dt_name}/{name}"] = op_breakdown(fns[name][1], steps=3 if reps > 3 else 1,
                                                                   peak_dtype=peak_dtype)
            for name in names:
                if name == "diffusers":
                    continue
                ratios = [a / b for a, b in zip(times["diffusers"], times[name])]
                mo, mr = median(times[name]), median(times["diffusers"])
                row = {"dtype": dt_name, "variant": label[name], "tokens": tokens + args.text_len,
                       "ours_s": mo, "diffusers_s": mr, "speedup": median(ratios),
                       "ours_fwd_bwd_s": median(fwd_bwd_times[name]),
                       "diffusers_fwd_bwd_s": median(fwd_bwd_times["diffusers"]),
                       "ours_tokens_per_s": args.batch * (tokens + args.text_len) / mo,
                       "diffusers_tokens_per_s": args.batch * (tokens + args.text_len) / mr,
                       "ours_gflops": ours_flops / mo / 1e9, "diffusers_gflops": flops / mr / 1e9,
                       "matmul_peak_gflops": peak, "peak_dtype": peak_dtypes[dt_name],
                       "ours_pct_peak": 100 * ours_flops / mo / 1e9 / peak,
                       "speedup_iqr": _iqr(ratios),
                       "ratios": ratios, "ours_all_s": times[name], "diffusers_all_s": times["diffusers"],
                       "peaks": peaks, "device": str(device)}
                if memory:
                    row["ours_step_peak_gib"], row["diffusers_step_peak_gib"] = memory[name], memory["diffusers"]
                if args.spec_tflops:
                    row["ours_mfu_spec_pct"] = 100 * ours_flops / mo / 1e12 / args.spec_tflops
                bd = breakdowns.get(f"{dt_name}/ours")
                if name == "ours" and bd:
                    row["linear_gflops"] = bd["linear_gflops"]
                    row["linear_pct_peak"] = bd["linear_pct_of_peak"]
                    row["large_linear_pct_peak"] = bd["large_linear_pct_of_peak"]
                rows.append(row)
            del variants, fns

    where = (f"{torch.get_num_threads()} threads, {args.clock} clock" if device.type == "cpu"
             else f"{torch.cuda.get_device_name(device)}, CUDA-synchronised wall clock")
    peak_desc = ("1536^3 matmul in the dtype ours' matmuls run in (" + ", ".join(f"{k}: {v}" for k, v in
                                                                             peak_dtypes.items())
                 + "; best of aten and oneDNN)" if device.type == "cpu"
                 else "dense 8192^3 matmul in the step's dtype on the card (so % of peak = MFU)")
    print(f"\nDiT training step (forward + backward + AdamW), preset {args.preset}, {args.layers} layers, hidden {dim}, "
          f"batch {args.batch}, {tokens} video + {args.text_len} text tokens, {where}; medians of interleaved rounds "
          f"({', '.join(f'{k}: {v}' for k, v in reps_used.items())}); peak = {peak_desc}, per round")
    columns = [("dtype", "dtype"), ("variant", "variant"), ("ours_s", "s/step", "{:.3f}"),
               ("diffusers_s", "diffusers s", "{:.3f}"), ("speedup", "diffusers/ours", "{:.2f}x"),
               ("speedup_iqr", "middle half of rounds", "{}"),
               ("ours_tokens_per_s", "tokens/s", "{:.0f}"), ("ours_gflops", "GFLOP/s", "{:.1f}"),
               ("matmul_peak_gflops", "peak GFLOP/s", "{:.0f}"), ("ours_pct_peak", "% of peak", "{:.0f}%")]
    if rows and "ours_mfu_spec_pct" in rows[0]:
        columns.append(("ours_mfu_spec_pct", f"MFU vs {args.spec_tflops:g} TFLOP/s", "{:.0f}%"))
    if rows and "ours_step_peak_gib" in rows[0]:
        columns += [("ours_step_peak_gib", "step GiB", "{:.2f}"), ("diffusers_step_peak_gib", "diffusers GiB", "{:.2f}")]
    print_table(rows, columns)
    if breakdowns:
        cats = ["linear", "attention", "norm", "elementwise", "copies", "conv", "other"]
        print("\nPer-op breakdown of forward + backward (torch.profiler self time, ms); matmul GFLOP/s and % of the "
              "matmul peak (as above): all matmuls, and the large ones (all dims >= 256: the blocks' linears; share of "
              "FLOPs)")
        brow = [dict(name=k, **{c: v["ms"].get(c, 0.0) for c in cats}, total=v["total_ms"],
                     lin=v["linear_gflops"], peak=v["peak_gflops"], pct=v["linear_pct_of_peak"],
                     big=v["large_linear_pct_of_peak"], share=v["large_linear_flop_share"])
                for k, v in breakdowns.items()]
        print_table(brow, [("name", "dtype/impl")] + [(c, c, "{:.0f}") for c in cats] +
                    [("total", "total", "{:.0f}"), ("lin", "matmul GFLOP/s", "{:.1f}"),
                     ("peak", "peak", "{:.0f}"), ("pct", "% of peak", "{:.0f}%"),
                     ("big", "large: % of peak", "{:.0f}%"), ("share", "(FLOP share)", "{:.0%}")])
    path = write_results("dit_step", {"config": cfg, "batch": args.batch, "flops_per_step": flops,
                                      "ours_flops_per_step": ours_flops, "rows": rows,
                                      "breakdown": breakdowns, "threads": torch.get_num_threads(),
                                      "clock": args.clock, "preset": args.preset, "device": str(device),
                                      "rounds": reps_used})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
