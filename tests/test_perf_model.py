"""The analytic FLOP / memory model (cogvx_ds.perf_model) against the real model and measured runs."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cogvx_ds.config import load_config, video_tokens
from cogvx_ds.models import CogVideoXTransformer
from cogvx_ds.perf_measure import live_bytes, model_constants, saved_tensor_bytes
from cogvx_ds.perf_model import (
    Clip,
    Layout,
    activation_bytes,
    flops_per_sample,
    markdown,
    memory_per_gpu,
    model_state_bytes,
    param_count,
    param_inventory,
)

ROOT = Path(__file__).resolve().parents[1]
# analytic vs measured activation bytes: observed within 1% with checkpointing and with the tiled kernel, 1.04-1.05x
# without checkpointing on SDPA (the CPU path's token-major copy of the attention output, which GPUs do not make and
# the model leaves out)
ACT_TOL = 0.06


def _model(kind="model/tiny", **changes):
    m = load_config(kind).model
    if "cpu_half_compute" in {f.name for f in dataclasses.fields(m)}:
        changes.setdefault("cpu_half_compute", "native")  # measure what a GPU does, not the CPU fp32 fallback
    return dataclasses.replace(m, **changes)


@pytest.mark.parametrize("kind,expected", [("model/2b", 1_693_783_872), ("model/5b", 5_570_283_072)])
def test_parameter_inventory_equals_real_model(kind, expected):
    m = load_config(kind).model
    with torch.device("meta"):
        net = CogVideoXTransformer(m)
    real = {n: p.numel() for n, p in net.named_parameters()}
    assert {p.name: p.numel for p in param_inventory(m)} == real
    assert param_count(m) == sum(real.values()) == expected


def test_token_count_of_a_49x480x720_clip():
    for kind in ("model/2b", "model/5b"):
        m = load_config(kind).model
        n_text, n_video = Clip(49, 480, 720).tokens(m)
        assert (n_text, n_video) == (226, 13 * 30 * 45)
        assert n_text + n_video == 17_776
        assert n_video == video_tokens(m, 49, 480, 720)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("ckpt", [False, True])
def test_flops_equal_flop_counter(rope, ckpt):
    """Forward + backward matmul FLOPs of a tiny model as torch's FlopCounterMode counts them (SDPA on its math
    path, which the counter sees as matmuls): equal to the analytic count."""
    m = _model(use_rotary_positional_embeddings=rope, activation_checkpointing=ckpt)
    net = CogVideoXTransformer.from_config(m)
    f, h, w = 3, 8, 12
    x = torch.randn(1, f, m.in_channels, h, w)
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, text, torch.tensor([500.0])).square().mean().backward()
    expected = flops_per_sample(m, m.max_text_seq_length, f * h * w // 4, recompute=ckpt)["total"]
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("kernel", ["sdpa", "tiled"])
@pytest.mark.parametrize("gelu", [False, True], ids=["keep_gelu", "recompute_gelu"])
def test_activation_bytes_match_measured(dtype, rope, ckpt, kernel, gelu):
    """What one forward leaves for backward (saved-tensor storages, and the net allocation the profiler sees)
    is the analytic activation memory within ACT_TOL, at 1040 tokens and width 128, for both CPU attention
    kernels (the tiled one keeps the attention probabilities: 2.6x the SDPA total here without checkpointing),
    with and without `model.recompute_gelu`."""
    m = _model(num_attention_heads=4, attention_head_dim=32, num_layers=2, max_text_seq_length=16,
               use_rotary_positional_embeddings=rope, activation_checkpointing=ckpt, cpu_attention=kernel,
               recompute_gelu=gelu)
    net = CogVideoXTransformer.from_config(m).to(dtype)
    f, h, w = 4, 32, 32
    x = torch.randn(1, f, m.in_channels, h, w, dtype=dtype)
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim, dtype=dtype)
    t = torch.tensor([500.0])
    with torch.no_grad():
        net(x, text, t)  # caches the position tables

    def forward():
        return net(x, text, t, gather_output=False)

    out, saved = saved_tensor_bytes(forward, model_constants(net))
    del out
    out, live = live_bytes(forward)
    live -= out.numel() * out.element_size()
    expected = activation_bytes(m, m.max_text_seq_length, f * h * w // 4, dtype_bytes=dtype.itemsize,
                                checkpointing=ckpt, attention=kernel, recompute_gelu=gelu)["stored"]
    # the tolerance is a share of the full (GELU-keeping) total: the model's few-% gap on this CPU path (SDPA's
    # output copied for the projection, see _layer_saved) does not shrink when the GELU outputs go
    full = activation_bytes(m, m.max_text_seq_length, f * h * w // 4, dtype_bytes=dtype.itemsize,
                            checkpointing=ckpt, attention=kernel)["stored"]
    tol = ACT_TOL if kernel == "sdpa" and not ckpt else 0.015  # the copy above exists only there
    assert saved == pytest.approx(expected, abs=tol * full)
    assert live == pytest.approx(expected, abs=tol * full)


def test_memory_model_bookkeeping():
    m = load_config("model/5b").model
    n = param_count(m)
    # ZeRO-3: 2 (bf16 param) + 2 (bf16 grad) + 4 (fp32 master) + 8 (Adam) bytes per parameter, over DP x SP
    for dp, sp in [(8, 1), (4, 2), (64, 1)]:
        st = model_state_bytes(m, Layout(dp=dp, sp=sp, zero_stage=3))
        assert st["model_states"] == pytest.approx(16 * n / (dp * sp), rel=1e-4)
    # TP splits the attention and MLP matrices first; ZeRO-2 keeps whole bf16 params; offload moves master + Adam + grads
    assert 0.5 * n < param_count(m, tp=2) < 0.6 * n  # the AdaLN linears (14% of 5B) are replicated
    z2 = model_state_bytes(m, Layout(dp=8, zero_stage=2))
    assert z2["params"] == 2 * n and z2["grads"] == pytest.approx(2 * n / 8, rel=1e-4)
    off = model_state_bytes(m, Layout(dp=8, offload_optimizer=True))
    # host: fp32 master + Adam (12 B), bf16 gradient (2 B) and the fp32 gradient DeepSpeed keeps beside them (4 B)
    assert off["optimizer"] == off["grads"] == 0 and off["host"] == pytest.approx(18 * n / 8, rel=1e-4)
    # checkpointing trades per-layer activations for block inputs; SP divides activations
    n_text, n_video = Clip().tokens(m)
    full = activation_bytes(m, n_text, n_video)["peak"]
    assert activation_bytes(m, n_text, n_video, checkpointing=True)["peak"] < 0.1 * full
    # (Ulysses keeps SDPA's own q/k/v copies and the re-joined output: ~12% above full / SP)
    assert full / 4 < activation_bytes(m, n_text, n_video, sp=4)["peak"] < 1.15 * full / 4
    # recomputing the GELU output drops 4 of a block's 20 width-sized tensors (with flash attention)
    gelu = activation_bytes(m, n_text, n_video, recompute_gelu=True)["peak"]
    assert 0.78 * full < gelu < 0.82 * full
    assert activation_bytes(m, n_text, n_video, checkpointing=True, recompute_gelu=True)["peak"] == \
        activation_bytes(m, n_text, n_video, checkpointing=True)["peak"]
    # the README's 5B rows exist and add up
    mem = memory_per_gpu(m, Clip(), Layout(dp=8))
    assert mem["total"] == mem["model_states"] + mem["buffers"] + mem["activations"]
    table = markdown(Clip())
    assert "| 5B | 8 |" in table and "| 5B | 64 |" in table


def test_perf_model_cli_prints_the_table(capsys):
    from cogvx_ds.perf_model import main

    assert main([]) == 0
    assert "17,776" in capsys.readouterr().out
    # a user's own layout: the same numbers as memory_per_gpu, and the README's 5B DP2 x SP4 rows
    assert main(["--model", "5b", "--gpus", "8", "--sp", "4", "--no-ckpt"]) == 0
    out = capsys.readouterr().out
    mem = memory_per_gpu(load_config("model/5b").model, Clip(), Layout(dp=2, sp=4, checkpointing=False))
    assert "DP2xSP4xTP1 ZeRO-3 ckpt off" in out and f"{mem['total'] / 2**30:8.1f}" in out and "37.0" in out
    assert main(["--model", "5b", "--gpus", "8", "--sp", "4", "--no-ckpt", "--recompute-gelu"]) == 0
    assert "32.8" in capsys.readouterr().out
    for bad, message in [(["--model", "2b", "--sp", "4"], "30 heads"), (["--gpus", "10", "--sp", "4"], "multiple"),
                         (["--model", "7b"], "--model 7b"), (["--offload", "param", "--zero", "2"], "ZeRO-3"),
                         (["--gpus", "0"], "at least 1"), (["--height", "-480"], "--height must be a positive"),
                         (["--frames", "10"], "--frames must be 4k+1")]:
        with pytest.raises(SystemExit):
            main(bad)
        assert message in capsys.readouterr().err, bad


# ------------------------------------------------------------------------------------------- multi-process
def _worker(torchrun, tmp_path, nproc, *args):
    out = tmp_path / f"result-{nproc}-{'-'.join(args)}.json"
    torchrun(nproc, str(ROOT / "benchmarks" / "memory.py"), *args, "--out", str(out))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_zero3_model_states_per_rank_match_analytic(torchrun, tmp_path):
    """bf16 ZeRO-3 over 2 ranks: parameter, gradient, fp32 master and Adam partitions the engine holds after
    one step are the analytic per-rank bytes within 10% (observed: equal)."""
    res = _worker(torchrun, tmp_path, 2, "--worker", "zero3")
    for rank in res["per_rank"]:
        assert rank["model_states"] == pytest.approx(res["analytic"]["model_states"], rel=0.10)
        assert rank["persistent"] == pytest.approx(res["analytic"]["persistent"], rel=0.10)
    total = res["params_total"]
    assert res["per_rank"][0]["model_states"] == pytest.approx(16 * total / 2, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("gathered,ckpt", [(("42", "7.56", "7.56"), True), (("42", "4", "12"), False),
                                           (("42", "3", "3"), True)])
def test_zero3_gathered_parameters_match_analytic(torchrun, tmp_path, gathered, ckpt):
    """ZeRO-3 holds gathered, at its peak (the turn from forward to backward), the larger of max live parameters
    and max reuse distance in whole blocks: 8 blocks of a 42-block model scaled as the 5B model is at the shipped
    1e9 / 1e9, not the two the model assumed (observed within 0.11 blocks: the non-block parameters)."""
    res = _worker(torchrun, tmp_path, 1, "--worker", "gathered", "--gathered", *gathered,
                  *([] if ckpt else ["--no-ckpt"]))
    assert res["measured"] == pytest.approx(res["analytic"], abs=0.25 * res["block"]), res


def test_readme_memory_table_is_the_models():
    """Every per-GPU row of the README's memory table is what memory_per_gpu gives for its layout."""
    readme = (ROOT / "README.md").read_text()
    rows = {  # the row's label -> its layout
        ("2B", "8", "DP8, ZeRO-3, ckpt"): Layout(dp=8),
        ("5B", "8", "DP8, ZeRO-3, ckpt"): Layout(dp=8),
        ("5B", "8", "DP8, ZeRO-3 + optimizer offload"): Layout(dp=8, offload_optimizer=True),
        ("5B", "8", "DP2 x SP4, ZeRO-3, no ckpt"): Layout(dp=2, sp=4, checkpointing=False),
        ("5B", "8", "DP2 x SP4, ZeRO-3, no ckpt, GELU recomputed"): Layout(dp=2, sp=4, checkpointing=False,
                                                                             recompute_gelu=True),
        ("5B", "64", "DP64, ZeRO-3, ckpt"): Layout(dp=64),
        ("5B", "64", "DP16 x SP4, ZeRO-3, no ckpt"): Layout(dp=16, sp=4, checkpointing=False),
    }
    for (size, gpus, label), lay in rows.items():
        line = next(x for x in readme.splitlines() if x.startswith(f"| {size} | {gpus} | {label}")
                    and (", GELU" in x) == ("GELU" in label))
        mem = memory_per_gpu(load_config(f"model/{size.lower()}").model, Clip(), lay)
        cells = [c.strip() for c in line.strip("|").split("|")]
        want = [f"{mem[k] / 2**30:.1f}" for k in ("model_states", "buffers", "activations")]
        assert cells[3:6] == want and cells[6] == f"**{mem['total'] / 2**30:.1f} GiB**", (line, want)
        if lay.offload_optimizer:
            assert f"({mem['host'] / 2**30:.1f} GiB CPU per rank)" in line


@pytest.mark.slow
def test_sp_divides_activation_memory(torchrun, tmp_path):
    """Activations per rank (saved-tensor storages) under Ulysses SP=2 are 1/2 of SP=1 within 15% at 4096 video
    tokens (observed ~1.09: Ulysses' received q/k/v buffer and the re-joined attention output), and equal the analytic
    model within 5%."""
    common = ["--worker", "sp", "--latent", "4", "64", "64", "--dtype", "fp32"]
    sp1 = _worker(torchrun, tmp_path, 1, *common, "--sp", "1")
    sp2 = _worker(torchrun, tmp_path, 2, *common, "--sp", "2")
    for res in (sp1, sp2):
        for rank in res["per_rank"]:
            assert rank["saved"] == pytest.approx(res["analytic"], rel=ACT_TOL)
    base = sp1["per_rank"][0]["saved"]
    for rank in sp2["per_rank"]:
        assert rank["saved"] == pytest.approx(base / 2, rel=0.15)
