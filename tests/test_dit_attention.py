"""The CPU tiled-math attention kernel (cogvx_ds.models.dit.attention) against float64 attention, SDPA's own
error, gradcheck and diffusers; and the route that picks it."""

import pytest
import torch
from dit_helpers import forward_backward, make_inputs, make_reference, reference_forward_backward, rel_err

from cogvx_ds.config import ConfigError, ModelConfig, validate_model
from cogvx_ds.models import CogVideoXTransformer
from cogvx_ds.models.dit import attention as A

FP32_TOL = 1e-5  # float32 against float64; observed 4e-7 to 1e-6, as SDPA's float32 error
# bfloat16 against float64: at most BF16_RATIO x SDPA's error on the same (rounded) inputs, and below BF16_MAX.
# Observed 2.1e-3 to 6.4e-3, 0.65-1.55x SDPA's (about one bfloat16 ulp, from rounding P and the outputs). The
# kernel's earlier scheme (bfloat16 S - rowmax from an extra max pass) gave up to 2.4x, and rounding the raw scores
# S to bfloat16 makes the output error 5-7x SDPA's at logit scale 6: both fail here.
BF16_RATIO, BF16_MAX = 2.0, 1.0e-2


def _qkv(b, s, heads, d, dtype, logit_scale=3.0, seed=0):
    """q, k, v as strided views of one [B, S, 3, heads, d] tensor (the model's fused-QKV layout); k scaled so
    that the logits have a standard deviation of about `logit_scale`."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, 3, heads, d, generator=g, dtype=torch.float64)
    qkv[:, :, 1] *= logit_scale
    return qkv.to(dtype).requires_grad_()


def _run(qkv, cotangent, fn):
    qkv.grad = None
    out = fn(*qkv.unbind(2))
    out.backward(cotangent)
    return out.detach().double(), qkv.grad.double()


def _errors(qkv, cotangent, fn):
    """Relative errors of the output and of the q, k, v gradients against float64 attention on the same inputs."""
    exact = qkv.detach().double().requires_grad_()
    ref_out, ref_grad = _run(exact, cotangent.double(), A.sdpa_attention)
    out, grad = _run(qkv, cotangent, fn)
    return [rel_err(out, ref_out)] + [rel_err(grad[:, :, i], ref_grad[:, :, i]) for i in range(3)]


SHAPES = [(2, 100, 3, 32), (1, 333, 4, 64), (3, 17, 2, 16)]


def _small_tiles(monkeypatch, pairs: int, s: int, s_kv: int) -> None:
    """Tiles of pairs // 2 + 1 (sample, head) pairs (float32 scores): two tiles, the second one shorter."""
    monkeypatch.setattr(A, "TILE_BYTES", (pairs // 2 + 1) * s * s_kv * 4)
    monkeypatch.setattr(A, "TILE_BYTES_ONE_PAIR_PER_THREAD", 0)  # whatever this machine's thread count
    tile = A._tile(pairs, s, torch.float32, s_kv)
    assert 1 <= tile < pairs and pairs % tile, tile  # several tiles and a remainder


@pytest.mark.parametrize("small_tiles", [False, True], ids=["default_tiles", "small_tiles"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tiled_attention_float32_matches_float64(shape, small_tiles, monkeypatch):
    """Output and all three input gradients; small tiles split the (sample, head) pairs into several tiles and a
    remainder."""
    if small_tiles:
        _small_tiles(monkeypatch, shape[0] * shape[2], shape[1], shape[1])
    qkv = _qkv(*shape, torch.float32)
    cot = torch.randn(*shape, dtype=torch.float32)
    for err in _errors(qkv, cot, lambda q, k, v: A.attention(q, k, v, "tiled")):
        assert err < FP32_TOL


@pytest.mark.parametrize("logit_scale", [1.0, 6.0])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_tiled_attention_bfloat16_is_as_accurate_as_sdpa(shape, logit_scale):
    qkv = _qkv(*shape, torch.bfloat16, logit_scale)
    cot = torch.randn(*shape).to(torch.bfloat16)
    ours = _errors(qkv, cot, lambda q, k, v: A.attention(q, k, v, "tiled"))
    sdpa = _errors(qkv, cot, A.sdpa_attention)
    for name, e, ref in zip(["output", "dq", "dk", "dv"], ours, sdpa):
        assert e < BF16_MAX and e < BF16_RATIO * ref, (name, e, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("small_tiles", [False, True], ids=["default_tiles", "small_tiles"])
def test_tiled_attention_with_fewer_queries_than_keys(dtype, small_tiles, monkeypatch):
    """The last block's case: the video tokens' queries (the stream without its first n_text rows) against the
    whole stream's keys and values. Output and gradients against float64, within the same bounds as above."""
    n_text, shape = 37, (2, 160, 3, 32)
    if small_tiles:
        _small_tiles(monkeypatch, shape[0] * shape[2], shape[1] - n_text, shape[1])
    qkv = _qkv(*shape, dtype)
    cot = torch.randn(shape[0], shape[1] - n_text, *shape[2:]).to(dtype)

    def video_queries(fn):
        return lambda q, k, v: fn(q[:, n_text:], k, v)

    ours = _errors_rows(qkv, cot, video_queries(lambda q, k, v: A.attention(q, k, v, "tiled")), n_text)
    if dtype == torch.float32:
        assert max(ours) < FP32_TOL
    else:
        sdpa = _errors_rows(qkv, cot, video_queries(A.sdpa_attention), n_text)
        for name, e, ref in zip(["output", "dq", "dk", "dv"], ours, sdpa):
            assert e < BF16_MAX and e < BF16_RATIO * ref, (name, e, ref)


def _errors_rows(qkv, cotangent, fn, n_text):
    """`_errors` for queries from row n_text on (their gradient rows; the text rows' q gradient is zero)."""
    exact = qkv.detach().double().requires_grad_()
    ref_out, ref_grad = _run(exact, cotangent.double(), lambda q, k, v: A.sdpa_attention(q[:, n_text:], k, v))
    out, grad = _run(qkv, cotangent, fn)
    assert not grad[:, :n_text, 0].any()
    return [rel_err(out, ref_out)] + [rel_err(grad[:, :, i], ref_grad[:, :, i]) for i in range(3)]


def test_tiled_attention_gradcheck(monkeypatch):
    monkeypatch.setattr(A, "TILE_BYTES_ONE_PAIR_PER_THREAD", 0)
    # tiles are sized in float32 scores (196 bytes a pair here): 2 tiles (4 + 2), one tile
    for shape, tile in [((2, 7, 3, 4), 7 * 7 * 8 * 2), ((1, 5, 2, 8), 1 << 20)]:
        qkv = _qkv(*shape, torch.float64, logit_scale=1.0)
        monkeypatch.setattr(A, "TILE_BYTES", tile)
        assert torch.autograd.gradcheck(lambda x: A.attention(*x.unbind(2), kernel="tiled"), (qkv,))


def test_tiled_attention_without_autograd_matches(monkeypatch):
    """Under no_grad only one tile of probabilities lives at a time; the output is the same."""
    monkeypatch.setattr(A, "TILE_BYTES", 40_000)
    monkeypatch.setattr(A, "TILE_BYTES_ONE_PAIR_PER_THREAD", 0)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = _qkv(2, 100, 3, 32, dtype)
        with_grad = A.attention(*qkv.unbind(2), kernel="tiled")
        with torch.no_grad():
            without = A.attention(*qkv.unbind(2), kernel="tiled")
        torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_route():
    bf = torch.empty(1, 1088, 8, 64, dtype=torch.bfloat16)
    assert A.use_tiled(bf, "auto")
    assert not A.use_tiled(bf, "sdpa")
    assert A.use_tiled(bf.float(), "auto")
    assert not A.use_tiled(bf.half(), "auto") and A.use_tiled(bf.half(), "tiled")
    for dtype in (torch.bfloat16, torch.float32):
        long = torch.empty(1, A.TILED_MAX_TOKENS[dtype] + 1, 2, 64, dtype=dtype)
        assert not A.use_tiled(long, "auto") and A.use_tiled(long[:, :-1], "auto")
        # fewer queries than keys (the last block): the key count bounds the route
        q = long[:, :-100]
        assert not A.use_tiled(q, "auto", True, long.shape[1]) and A.use_tiled(q, "auto", True, long.shape[1] - 1)
    # and the kept probabilities are queries x keys: 200 heads x 512 x 1,024 bfloat16 = 200 MiB fit the cap, 1,024^2
    # would not
    q = torch.empty(1, 512, 200, 64, dtype=torch.bfloat16)
    assert A.TILED_MAX_SAVED_BYTES == 256 << 20
    assert A.use_tiled(q, "auto", True, 1024) and not A.use_tiled(q, "auto", True, 2048)
    assert not A.use_tiled(torch.empty(1, 1024, 200, 64, dtype=torch.bfloat16), "auto", True, 1024)
    # float32, many short sequences: the tiled kernel with two threads or more, SDPA on one thread
    short = torch.empty(32, A.TILED_MIN_TOKENS_ONE_THREAD[torch.float32] - 1, 4, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert A.use_tiled(short, "auto")
        torch.set_num_threads(1)
        assert not A.use_tiled(short, "auto") and A.use_tiled(short.bfloat16(), "auto")
        assert A.use_tiled(torch.empty(1, A.TILED_MIN_TOKENS_ONE_THREAD[torch.float32], 4, 32), "auto")
    finally:
        torch.set_num_threads(threads)
    big = torch.empty(64, 1088, 8, 64, dtype=torch.bfloat16)  # 1.2 GB of probabilities to keep
    assert not A.use_tiled(big, "auto") and A.use_tiled(big, "auto", needs_grad=False)
    # without autograd float32 takes SDPA beyond the short sequences (its flash forward is faster there)
    cut = A.TILED_MAX_TOKENS_NO_GRAD[torch.float32]
    try:
        torch.set_num_threads(2)
        assert A.use_tiled(bf.float(), "auto") and not A.use_tiled(bf.float(), "auto", needs_grad=False)
        assert A.use_tiled(torch.empty(8, cut, 4, 32), "auto", needs_grad=False)
        assert not A.use_tiled(torch.empty(8, cut + 1, 4, 32), "auto", needs_grad=False)
        assert A.use_tiled(torch.empty(8, cut + 1, 4, 32), "auto")
    finally:
        torch.set_num_threads(threads)
    # never on another device (flash is faster on GPUs): a meta tensor stands in for one here
    assert not A.use_tiled(bf.to("meta"), "auto") and A.use_tiled(bf.to("meta"), "tiled")
    if torch.cuda.is_available():
        assert not A.use_tiled(bf.cuda(), "auto")
    with pytest.raises(ValueError, match="attention kernel"):
        A.use_tiled(bf, "flash")
    with pytest.raises(ConfigError, match="model.cpu_attention"):
        validate_model(ModelConfig(cpu_attention="flash"))


def test_the_model_on_the_tiled_kernel_matches_diffusers(tmp_path, monkeypatch):
    """float32, the whole model (RoPE, expert AdaLN, text + video tokens) with every attention on the tiled
    kernel, against diffusers (SDPA): the parity tolerance of test_dit_parity."""
    ref = make_reference("5b")
    ref.save_pretrained(tmp_path)
    ours = CogVideoXTransformer.from_diffusers(tmp_path, cpu_attention="tiled")
    x, text, t, probe = make_inputs("5b", (3, 8, 12))
    expected = reference_forward_backward(ref, "5b", x, text, t, probe)
    calls = []
    real = A._TiledAttention.apply
    monkeypatch.setattr(A._TiledAttention, "apply", lambda *a: calls.append(1) or real(*a))
    got = forward_backward(ours, x, text, t, probe)
    assert len(calls) == ours.config.num_layers
    for a, b in zip(got, expected):
        assert rel_err(a, b) < FP32_TOL


def test_bfloat16_model_is_as_accurate_on_either_kernel(tmp_path, monkeypatch):
    """bfloat16 models, auto (the tiled kernel at this size) and cpu_attention=sdpa, against the float32 model:
    the output, input and all-parameter gradient errors of the tiled one within 1.25x of SDPA's (observed: 0.73%
    vs 0.73% output, 0.86% vs 0.85% parameter gradients)."""
    make_reference("5b").save_pretrained(tmp_path)
    inputs = make_inputs("5b", (3, 8, 12))
    reference = CogVideoXTransformer.from_diffusers(tmp_path)
    expected = forward_backward(reference, *inputs)
    x, text, t, probe = (u.to(torch.bfloat16) if u.dtype == torch.float32 and u.dim() > 1 else u for u in inputs)

    def grads(m):
        return torch.cat([p.grad.double().flatten() for p in m.parameters()])

    calls = []
    real = A._TiledAttention.apply
    monkeypatch.setattr(A._TiledAttention, "apply", lambda *a: calls.append(1) or real(*a))
    errors, tiled_calls = {}, {}
    for kernel in ("auto", "sdpa"):
        m = CogVideoXTransformer.from_diffusers(tmp_path, dtype=torch.bfloat16, cpu_attention=kernel,
                                                cpu_half_compute="native")
        calls.clear()
        got = forward_backward(m, x, text, t, probe)
        tiled_calls[kernel] = len(calls)
        errors[kernel] = [rel_err(a, b) for a, b in zip(got, expected)] + [rel_err(grads(m), grads(reference))]
    assert tiled_calls == {"auto": m.config.num_layers, "sdpa": 0}  # the two runs took different kernels
    for tiled, sdpa in zip(errors["auto"], errors["sdpa"]):
        assert tiled < 1.25 * sdpa, errors


def test_a_tile_holds_one_pair_per_thread_within_its_cap():
    """At 1,088 tokens one pair's float32 scores (4.7 MB) exceed TILE_BYTES: with 2+ threads a tile still holds one
    pair per thread (each bmm runs them side by side), up to TILE_BYTES_ONE_PAIR_PER_THREAD of scores."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert A._tile(8, 1088, torch.float32) == 1
        torch.set_num_threads(2)
        assert A._tile(8, 1088, torch.float32) == 2 and A._tile(1, 1088, torch.float32) == 1
        assert A._tile(8, 2048, torch.float32) == 1  # 16.8 MB a pair: over the cap
        assert A._tile(8, 256, torch.float32) == 8  # small pairs: TILE_BYTES decides, as before
    finally:
        torch.set_num_threads(threads)
