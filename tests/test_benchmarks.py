"""Smoke runs of the DiT step benchmark at toy sizes: every preset's model (2B: sin-cos positions and T5-XXL-wide
text, 5B: RoPE) builds, steps and is timed side by side with diffusers' on the same weights, the JSON rows carry
what the summary and the issue notes read, and the GPU options fail clearly where they cannot apply. The numbers
themselves are not asserted (wall-clock on a shared CPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import attention, common, dit_step, loader  # noqa: E402

TOY = ["--layers", "1", "--heads", "2", "--head-dim", "16", "--latent", "2", "8", "8", "--text-len", "8",
       "--reps", "1", "--no-profile"]


@pytest.mark.parametrize("preset", ["2b", "5b"])
def test_dit_step_runs_each_preset_beside_diffusers(preset, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    extra = ["--linear-kernels"] + (["--recompute-gelu"] if preset == "5b" else [])
    assert dit_step.main(["--preset", preset, "--dtypes", "fp32", *extra, *TOY]) == 0
    res = json.loads((tmp_path / "dit_step.json").read_text())
    assert res["preset"] == preset and res["device"] == "cpu" and res["rounds"] == {"fp32": 1}
    assert res["config"]["use_rotary_positional_embeddings"] == (preset == "5b")
    assert res["config"]["text_embed_dim"] == 4096
    variants = [r["variant"] for r in res["rows"]]
    assert variants == ["ours", "ours[aten linear]"] + (["ours[recompute_gelu]"] if preset == "5b" else [])
    for row in res["rows"]:
        assert row["tokens"] == 2 * 8 * 8 // 4 + 8
        assert row["ours_s"] > 0 and row["diffusers_s"] > 0 and row["speedup"] > 0
        assert row["matmul_peak_gflops"] > 0
        assert row["ours_tokens_per_s"] == pytest.approx(row["tokens"] / row["ours_s"])


def test_dit_step_profile_counts_the_onednn_linears(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    args = [a for a in TOY if a != "--no-profile"]
    assert dit_step.main(["--dtypes", "fp32", *args]) == 0
    bd = json.loads((tmp_path / "dit_step.json").read_text())["breakdown"]["fp32/ours"]
    assert bd["ms"]["linear"] > 0 and bd["linear_gflops"] > 0
    # oneDNN's linear is a matmul with the FLOPs of input [..., in] @ weight [out, in]^T (a transposed weight view
    # for the input gradient reads the same way)
    op = "mkldnn::_linear_pointwise"
    assert common._category(op) == "linear"
    assert common._matmul_flops(op, [[2, 10, 16], [32, 16], [], [], [], []]) == 2 * 20 * 16 * 32
    assert common._is_large(op, [[1, 1088, 512], [2048, 512], [2048]])
    assert not common._is_large(op, [[1, 1088, 512], [64, 512]])


def test_dit_step_gpu_options_fail_clearly_without_a_gpu(capsys):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            dit_step.main(["--device", "cuda", *TOY])
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dit_step.main(["--spec-tflops", "989", *TOY])
    assert "--spec-tflops is for GPU runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dit_step.main(["--device", "tpu", *TOY])
    assert "--device must be cpu or cuda" in capsys.readouterr().err


def test_attention_benchmark_times_both_kernels_and_reports_the_route(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert attention.main(["--dtypes", "fp32", "--threads", "1", "--rounds", "2",
                           "--shapes", "1x600x2x16", "2x40x2x8"]) == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["rows"]
    assert [(r["shape"], r["auto"]) for r in rows] == [("1x600x2x16", "tiled"), ("2x40x2x8", "sdpa")]
    assert all(r["tiled_ms"] > 0 and r["sdpa_ms"] > 0 and r["sdpa_over_tiled"] > 0 for r in rows)
    # forward only under no_grad (sampling): float32 routes 600 tokens to SDPA there, bfloat16 keeps the tiled kernel
    assert attention.main(["--no-grad", "--threads", "2", "--rounds", "2", "--shapes", "1x600x2x16"]) == 0
    rows = json.loads((tmp_path / "attention_no_grad.json").read_text())["rows"]
    assert [(r["dtype"], r["auto"]) for r in rows if r["dtype"] == "fp32"] == [("fp32", "sdpa")]
    assert all(r["auto"] == "tiled" for r in rows if r["dtype"] == "bf16")
    with pytest.raises(SystemExit) as e:
        attention.main(["--shapes", "1x600x2"])
    assert e.value.code == 2 and "1x600x2" in capsys.readouterr().err


def test_loader_benchmark_reports_the_plan_start(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert loader.main(["--quick", "--plan-samples", "3000", "--batches", "10", "--steps", "2"]) == 0
    res = json.loads((tmp_path / "loader.json").read_text())
    assert res["ratio"] > 0 and 0 <= res["data_wait_fraction"] <= 1
    start = res["plan_start"]
    assert start["samples"] == 3000 and start["manifests_s"] > 0 and start["tar_walk_s"] > 0
    # memory is not wall-clock: the columns hold a sample in a fraction of an object's bytes
    assert start["columns_bytes_per_sample"] < 0.5 * start["objects_bytes_per_sample"]


def test_gpu_smoke_commands_run_on_the_cpu(tmp_path):
    """The smoke part of benchmarks/gpu_mfu.sh (for a lent GPU) runs here as written, on gloo and the CPU, so a
    GPU session does not spend its device minutes on a stale command."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    script = (repo / "benchmarks" / "gpu_mfu.sh").read_text()
    body = script.split("\n    (\n", 1)[1].split("\n    ) 2>&1", 1)[0].replace("s=/tmp/smoke", f"s={tmp_path}/smoke")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", "-e", "-c", body], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "SMOKE OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "smoke" / "dit" / "profile" / "steps_2-3" / "rank0.pt.trace.json").is_file()
    assert (tmp_path / "smoke" / "vae" / "export" / "config.json").is_file()
    assert (tmp_path / "smoke" / "pipe" / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("kind", ["2b", "5b"])
def test_dit_step_flop_counts_are_what_each_model_computes(kind, tmp_path):
    """The benchmark's FLOPs per step: diffusers' (every block on the whole stream) and ours (the last block runs
    the text tokens as keys and values only) differ by what torch's FlopCounterMode counts for the two models on
    the same weights and inputs (SDPA on its math path, which the counter sees as matmuls)."""
    from dit_helpers import CONFIGS, SIZES, make_inputs, make_reference, reference_rope
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cogvx_ds.models import CogVideoXTransformer

    ref = make_reference(kind)
    ref.save_pretrained(tmp_path)
    ours = CogVideoXTransformer.from_diffusers(tmp_path, cpu_attention="sdpa")
    x, text, t, probe = make_inputs(kind, SIZES[0], batch=1)
    rope = reference_rope(CONFIGS[kind], x.shape[1], x.shape[3], x.shape[4]) if kind == "5b" else None

    def counted(fn):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            (fn() * probe).sum().backward()
        return counter.get_total_flops()

    theirs = counted(lambda: ref(x, text, t[:1], image_rotary_emb=rope, return_dict=False)[0])
    mine = counted(lambda: ours(x, text, t[:1]))
    cfg = CONFIGS[kind]
    video, dim = x.shape[1] * x.shape[3] * x.shape[4] // 4, cfg["num_attention_heads"] * cfg["attention_head_dim"]
    args = (cfg["num_layers"], dim, video, cfg["attention_head_dim"], video, cfg["max_text_seq_length"])
    assert theirs - mine == dit_step.model_flops(*args) - dit_step.model_flops(*args, text_in_last_block=False) > 0
