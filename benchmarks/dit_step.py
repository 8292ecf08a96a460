"""DiT training-step benchmark: forward + backward of ours vs diffusers' CogVideoXTransformer3DModel.

Same config and weights (ours loaded from the diffusers model's save_pretrained), fp32 and bf16, the two
implementations interleaved rep by rep so machine noise hits both alike. Reports the time ratio
(diffusers / ours: > 1 means ours is faster) and achieved GFLOP/s against this machine's matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import matmul_peak_gflops, median, print_table, timeit, write_results  # noqa: E402


def model_flops(layers: int, dim: int, n_tokens: int, heads_dim: int, latent_patches: int, text_len: int) -> float:
    """Matmul FLOPs of one forward pass (linear layers + attention), times 3 for forward + backward."""
    seq = n_tokens + text_len
    per_layer = 2 * seq * dim * 3 * dim + 2 * seq * dim * dim + 2 * 2 * seq * dim * 4 * dim + 2 * 2 * seq * seq * dim
    return 3 * layers * per_layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("F", "H", "W"),
                    help="latent frames, height, width (tokens = F*H*W/4)")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="a few seconds: 1 layer, 512 tokens, 2 reps")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.latent, args.reps = 1, [2, 32, 32], 2

    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from cogvx_ds.models import CogVideoXTransformer

    f, h, w = args.latent
    cfg = dict(num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16, out_channels=16,
               time_embed_dim=512, text_embed_dim=512, num_layers=args.layers, sample_frames=4 * (f - 1) + 1,
               sample_height=h, sample_width=w, max_text_seq_length=args.text_len,
               use_rotary_positional_embeddings=True)
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**cfg)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = CogVideoXTransformer.from_diffusers(d)
    rope = get_3d_rotary_pos_embed(args.head_dim, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f, use_real=True)
    tokens = f * h * w // 4
    dim = args.heads * args.head_dim
    flops = args.batch * model_flops(args.layers, dim, tokens, args.head_dim, tokens, args.text_len)

    rows = []
    for dt_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        ours.to(dtype)
        ref.to(dtype)
        x = torch.randn(args.batch, f, 16, h, w, dtype=dtype)
        text = torch.randn(args.batch, args.text_len, 512, dtype=dtype)
        t = torch.full((args.batch,), 500.0)

        def step_ours(x=x, text=text, t=t):
            ours.zero_grad(set_to_none=True)
            ours(x, text, t).float().square().mean().backward()

        def step_ref(x=x, text=text, t=t):
            ref.zero_grad(set_to_none=True)
            ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0].float().square().mean().backward()

        step_ours(), step_ref()  # warm-up
        t_ours, t_ref = [], []
        for _ in range(args.reps):  # interleaved
            t_ours += timeit(step_ours, warmup=0, reps=1)
            t_ref += timeit(step_ref, warmup=0, reps=1)
        peak = matmul_peak_gflops(dtype)
        mo, mr = median(t_ours), median(t_ref)
        rows.append({"dtype": dt_name, "tokens": tokens + args.text_len, "ours_s": mo, "diffusers_s": mr,
                     "speedup": mr / mo, "ours_gflops": flops / mo / 1e9, "diffusers_gflops": flops / mr / 1e9,
                     "matmul_peak_gflops": peak, "ours_pct_peak": 100 * flops / mo / 1e9 / peak,
                     "ours_all_s": t_ours, "diffusers_all_s": t_ref})

    print(f"DiT step (forward+backward), {args.layers} layers, hidden {dim}, batch {args.batch}, "
          f"{tokens} video + {args.text_len} text tokens, {torch.get_num_threads()} threads")
    print_table(rows, [("dtype", "dtype"), ("tokens", "tokens"), ("ours_s", "ours s", "{:.3f}"),
                       ("diffusers_s", "diffusers s", "{:.3f}"), ("speedup", "diffusers/ours", "{:.2f}x"),
                       ("ours_gflops", "ours GFLOP/s", "{:.0f}"), ("matmul_peak_gflops", "matmul peak", "{:.0f}"),
                       ("ours_pct_peak", "% of peak", "{:.0f}%")])
    path = write_results("dit_step", {"config": cfg, "batch": args.batch, "flops_per_step": flops, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
