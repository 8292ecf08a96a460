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
BENCHES = ["dit_step.py", "vae_encode.py", "encode_throughput.py"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    failed = []
    for bench in BENCHES:
        print(f"\n=== {bench} ===", flush=True)
        cmd = [sys.executable, str(HERE / bench)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(bench)
    lines = ["# Benchmark summary", ""]
    dit = HERE / "results" / "dit_step.json"
    if dit.is_file():
        lines += ["## DiT training step (forward + backward), ours vs diffusers", "",
                  "| dtype | tokens | ours s | diffusers s | diffusers/ours | % of matmul peak |", "|---|---|---|---|---|---|"]
        for r in json.loads(dit.read_text())["rows"]:
            lines.append(f"| {r['dtype']} | {r['tokens']} | {r['ours_s']:.3f} | {r['diffusers_s']:.3f} | "
                         f"{r['speedup']:.2f}x | {r['ours_pct_peak']:.0f}% |")
    for name in ("vae_encode", "encode_throughput"):
        path = HERE / "results" / f"{name}.json"
        if path.is_file():
            lines += ["", f"## {name}", "", f"see `benchmarks/results/{name}.json`"]
    (HERE / "results" / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {HERE / 'results' / 'summary.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
