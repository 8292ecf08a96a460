"""`make bench`: run every benchmark (each prints its table and writes benchmarks/results/<name>.json), then
collect the headline numbers into benchmarks/results/summary.md.

    python benchmarks/run_all.py           # full sizes (the bf16 DiT step is slow on CPUs without AVX512-BF16/AMX)
    python benchmarks/run_all.py --quick   # seconds per benchmark, for a smoke check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.common import RESULTS  # noqa: E402  (honours COGVX_BENCH_RESULTS)

BENCHES = ["dit_step.py", "attention.py", "vae_encode.py", "encode_throughput.py", "memory.py", "loader.py"]
EXTRA_ARGS = {"dit_step.py": ["--linear-kernels"]}  # ours with the aten linear too: the oneDNN kernel's before/after


def memory_summary() -> list[str]:
    """benchmarks/memory.py's measured-vs-analytic rows, then the analytic 2B/5B table (cogvx_ds.perf_model)."""
    from cogvx_ds.perf_model import Clip, markdown

    lines = []
    mem = RESULTS / "memory.json"
    if mem.is_file():
        res = json.loads(mem.read_text())
        lines += ["", "## Memory per rank, measured vs analytic (cogvx_ds.perf_model)", "",
                  "| ZeRO-3 ranks | model states measured MiB | analytic MiB | measured/analytic |", "|---|---|---|---|"]
        lines += [f"| {r['ranks']} | {r['measured_mib']:.2f} | {r['analytic_mib']:.2f} | {r['ratio']:.3f} |"
                  for r in res["zero3"]]
        lines += ["", "| SP | tokens | activations measured MiB | analytic MiB | measured / (SP=1 / SP) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['sp']} | {r['tokens']} | {r['saved_mib']:.1f} | {r['analytic_mib']:.1f} | "
                  f"{r.get('saved_vs_sp1_over_sp', float('nan')):.3f} |" for r in res["sp_activations"]]
    return lines + ["", "## CogVideoX-2B / 5B FLOP and memory model", "", markdown(Clip())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    failed = []
    for bench in BENCHES:
        print(f"\n=== {bench} ===", flush=True)
        cmd = [sys.executable, str(HERE / bench), *EXTRA_ARGS.get(bench, [])] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(bench)
    lines = ["# Benchmark summary", ""]
    dit = RESULTS / "dit_step.json"
    if dit.is_file():
        lines += ["## DiT training step (forward + backward + AdamW), ours vs diffusers, interleaved", "",
                  "| dtype | ours | tokens | ours s | diffusers s | diffusers/ours | middle half of rounds | tokens/s "
                  "| model % of peak | matmuls % of peak | large matmuls % of peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in json.loads(dit.read_text())["rows"]:
            lin = " | ".join(f"{r[k]:.0f}%" if k in r else "-" for k in ("linear_pct_peak", "large_linear_pct_peak"))
            lines.append(f"| {r['dtype']} | {r.get('variant', 'ours')} | {r['tokens']} | {r['ours_s']:.3f} | "
                         f"{r['diffusers_s']:.3f} | {r['speedup']:.2f}x | {r.get('speedup_iqr', '-')} | "
                         f"{r.get('ours_tokens_per_s', 0):.0f} | "
                         f"{r['ours_pct_peak']:.0f}% | {lin} |")
    lines += memory_summary()
    loader = RESULTS / "loader.json"
    if loader.is_file():
        r = json.loads(loader.read_text())
        lines += ["", "## Latent data loader vs one training step", "",
                  "| config | loader samples/s | step consumes samples/s | loader/step | waiting for data |",
                  "|---|---|---|---|---|",
                  f"| {r['config']} | {r['loader_samples_per_s']:.0f} | {r['step_samples_per_s']:.1f} | "
                  f"{r['ratio']:.1f}x | {r['data_wait_fraction']:.1%} |"]
    attn = RESULTS / "attention.json"
    if attn.is_file():
        lines += ["", "## Attention on the CPU: tiled kernel vs torch SDPA (forward + backward)", "",
                  "| dtype | threads | B x S x H x d | tiled ms | SDPA ms | SDPA/tiled | auto picks |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['threads']} | {r['shape']} | {r['tiled_ms']:.2f} | {r['sdpa_ms']:.2f} | "
                  f"{r['sdpa_over_tiled']:.2f}x | {r['auto']} |" for r in json.loads(attn.read_text())["rows"]]
    for name in ("vae_encode", "encode_throughput"):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            lines += ["", f"## {name}", "", f"see `benchmarks/results/{name}.json`"]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {RESULTS / 'summary.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
