"""DiT training-step benchmark: forward + backward + (fused) AdamW step of ours vs diffusers' CogVideoXTransformer3DModel.

Same config and weights (ours loaded from the diffusers model's save_pretrained), fp32 and bf16. The variants run
interleaved within every round (ours, diffusers, ... and the order rotates), and a short square-matmul peak is
measured at the start of every round, so machine noise (other processes on a small CPU) hits all of them alike.
Reports the median over rounds of the per-round time ratio (diffusers / ours: > 1 means ours is faster),
tokens/s, achieved model GFLOP/s and the matmul peak.

A per-op breakdown (torch.profiler on extra, untimed steps) splits each variant's forward + backward into linear
layers, attention, norms, element-wise work and copies, and gives the linear layers' own GFLOP/s (their FLOPs from
the recorded matmul shapes over their kernel time) as a percentage of the matmul peak.

bf16: on CPUs where oneDNN has no native bf16 kernels (AVX2-only), ours runs its matmul-type ops in fp32 from the
bf16 weights (`model.cpu_half_compute=auto`, printed as "ours[bf16 storage, fp32 matmul]"); diffusers runs native
bf16. `--bf16-native` adds ours with native bf16 matmuls (slow there) for comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    matmul_peak_gflops,
    median,
    op_breakdown,
    print_table,
    write_results,
)


def model_flops(layers: int, dim: int, n_tokens: int, heads_dim: int, latent_patches: int, text_len: int) -> float:
    """Matmul FLOPs of one forward pass (linear layers + attention), times 3 for forward + backward."""
    seq = n_tokens + text_len
    per_layer = 2 * seq * dim * 3 * dim + 2 * seq * dim * dim + 2 * 2 * seq * dim * 4 * dim + 2 * 2 * seq * seq * dim
    return 3 * layers * per_layer


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
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("F", "H", "W"),
                    help="latent frames, height, width (tokens = F*H*W/4)")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7, help="timed rounds per dtype (bf16: min(reps, 3))")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this thread's CPU time (needs --threads 1); steadier than wall time on a CPU shared "
                         "with other work, since time spent descheduled is not counted")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time ours with model.compile_blocks=true")
    ap.add_argument("--linear-kernels", action="store_true",
                    help="also time ours with model.cpu_linear=aten (F.linear / MKL), the before of the oneDNN "
                         "linear kernel that ours uses by default on x86 CPUs")
    ap.add_argument("--bf16-native", action="store_true",
                    help="also time ours with native bf16 matmuls (model.cpu_half_compute=native)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op breakdown")
    ap.add_argument("--quick", action="store_true", help="seconds: 1 layer, 512 tokens, 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.latent, args.reps = 1, [2, 32, 32], 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu needs --threads 1 (the other threads' work would not be counted)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from cogvx_ds.models import CogVideoXTransformer
    from cogvx_ds.models.dit.fused import compute_dtype

    f, h, w = args.latent
    cfg = dict(num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16, out_channels=16,
               time_embed_dim=512, text_embed_dim=512, num_layers=args.layers, sample_frames=4 * (f - 1) + 1,
               sample_height=h, sample_width=w, max_text_seq_length=args.text_len,
               use_rotary_positional_embeddings=True)
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**cfg)
    rope = get_3d_rotary_pos_embed(args.head_dim, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f, use_real=True)
    tokens = f * h * w // 4
    dim = args.heads * args.head_dim
    flops = args.batch * model_flops(args.layers, dim, tokens, args.head_dim, tokens, args.text_len)

    rows, breakdowns = [], {}
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        for dt_name in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
            ref.to(dtype)
            variants = {"ours": CogVideoXTransformer.from_diffusers(d, dtype=dtype)}
            label = {"ours": "ours", "diffusers": "diffusers"}
            mode = getattr(variants["ours"].config, "cpu_half_compute", "native")
            if compute_dtype(mode, dtype, torch.device("cpu")) is not None:
                label["ours"] = f"ours[{dt_name} storage, fp32 matmul]"
            if args.compile:
                variants["ours+compile"] = CogVideoXTransformer.from_diffusers(d, dtype=dtype, compile_blocks=True)
                label["ours+compile"] = label["ours"] + "+compile"
            if args.linear_kernels:
                variants["ours_aten"] = CogVideoXTransformer.from_diffusers(d, dtype=dtype, cpu_linear="aten")
                label["ours_aten"] = label["ours"] + "[aten linear]"
            if args.bf16_native and dt_name == "bf16":
                variants["ours_native"] = CogVideoXTransformer.from_diffusers(d, dtype=dtype,
                                                                              cpu_half_compute="native")
                label["ours_native"] = "ours[native bf16]"
            variants["diffusers"] = ref
            x = torch.randn(args.batch, f, 16, h, w, dtype=dtype)
            text = torch.randn(args.batch, args.text_len, 512, dtype=dtype)
            t = torch.full((args.batch,), 500.0)
            fns = {k: _step_fn(m, x, text, t, rope, k == "diffusers", clock) for k, m in variants.items()}
            for name, (step, _) in fns.items():  # warm-up (compiles the compiled variant)
                for _ in range(3 if "compile" in name else 1):
                    step()
            reps = args.reps if dt_name == "fp32" else min(args.reps, 3)
            times = {k: [] for k in fns}
            fwd_bwd_times = {k: [] for k in fns}
            peaks = []
            names = list(fns)
            for r in range(reps):
                peaks.append(matmul_peak_gflops(torch.float32, reps=3, clock=clock))
                for name in names[r % len(names):] + names[:r % len(names)]:
                    total, fb = fns[name][0]()
                    times[name].append(total)
                    fwd_bwd_times[name].append(fb)
            peak = median(peaks)
            if not args.no_profile:
                for name in ("ours", "diffusers"):
                    breakdowns[f"{dt_name}/{name}"] = op_breakdown(fns[name][1], steps=3 if reps > 3 else 1)
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
                       "ours_gflops": flops / mo / 1e9, "diffusers_gflops": flops / mr / 1e9,
                       "matmul_peak_gflops": peak, "ours_pct_peak": 100 * flops / mo / 1e9 / peak,
                       "ratios": ratios, "ours_all_s": times[name], "diffusers_all_s": times["diffusers"],
                       "peaks": peaks}
                bd = breakdowns.get(f"{dt_name}/ours")
                if name == "ours" and bd:
                    row["linear_gflops"] = bd["linear_gflops"]
                    row["linear_pct_peak"] = bd["linear_pct_of_fp32_peak"]
                    row["large_linear_pct_peak"] = bd["large_linear_pct_of_fp32_peak"]
                rows.append(row)
            del variants, fns

    print(f"\nDiT training step (forward + backward + AdamW), {args.layers} layers, hidden {dim}, batch {args.batch}, "
          f"{tokens} video + {args.text_len} text tokens, {torch.get_num_threads()} threads, {args.clock} clock; medians of "
          f"{args.reps} interleaved rounds (bf16: {min(args.reps, 3)}); peak = fp32 {1536}^3 matmul (best of aten and oneDNN), per round")
    print_table(rows, [("dtype", "dtype"), ("variant", "variant"), ("ours_s", "s/step", "{:.3f}"),
                       ("diffusers_s", "diffusers s", "{:.3f}"), ("speedup", "diffusers/ours", "{:.2f}x"),
                       ("ours_tokens_per_s", "tokens/s", "{:.0f}"), ("ours_gflops", "GFLOP/s", "{:.1f}"),
                       ("matmul_peak_gflops", "fp32 peak", "{:.0f}"), ("ours_pct_peak", "% of peak", "{:.0f}%")])
    if breakdowns:
        cats = ["linear", "attention", "norm", "elementwise", "copies", "conv", "other"]
        print("\nPer-op breakdown of forward + backward (torch.profiler self time, ms); matmul GFLOP/s and % of the fp32 "
              "matmul peak: all matmuls, and the large ones (all dims >= 256: the blocks' linears; share of FLOPs)")
        brow = [dict(name=k, **{c: v["ms"].get(c, 0.0) for c in cats}, total=v["total_ms"],
                     lin=v["linear_gflops"], peak=v["peak_gflops"], pct=v["linear_pct_of_fp32_peak"],
                     big=v["large_linear_pct_of_fp32_peak"], share=v["large_linear_flop_share"])
                for k, v in breakdowns.items()]
        print_table(brow, [("name", "dtype/impl")] + [(c, c, "{:.0f}") for c in cats] +
                    [("total", "total", "{:.0f}"), ("lin", "matmul GFLOP/s", "{:.1f}"),
                     ("peak", "fp32 peak", "{:.0f}"), ("pct", "% of peak", "{:.0f}%"),
                     ("big", "large: % of peak", "{:.0f}%"), ("share", "(FLOP share)", "{:.0%}")])
    path = write_results("dit_step", {"config": cfg, "batch": args.batch, "flops_per_step": flops, "rows": rows,
                                      "breakdown": breakdowns, "threads": torch.get_num_threads(),
                                      "clock": args.clock})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
