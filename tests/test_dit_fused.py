"""The DiT's hand-written autograd pieces and performance switches: parameter gradients equal diffusers', the
fused Functions pass gradcheck, and `compile_blocks` / `cpu_half_compute` change speed, not results."""

from functools import partial

import pytest
import torch
from dit_helpers import SIZES, make_inputs, make_reference, reference_forward_backward

from cogvx_ds.checkpoint.layout import diffusers_keys
from cogvx_ds.config import ConfigError, ModelConfig, validate_model
from cogvx_ds.models import CogVideoXTransformer
from cogvx_ds.models.dit import fused
from cogvx_ds.models.dit.fused import ada_layer_norm, apply_rope_stream, compute_dtype, gated_residual, rope_tables


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _forward_backward(model, x, text, t, probe):
    model.zero_grad(set_to_none=True)
    x, text = x.clone().requires_grad_(True), text.clone().requires_grad_(True)
    out = model(x, text, t)
    (out.float() * probe).sum().backward()
    return out.detach(), x.grad, text.grad


@pytest.mark.parametrize("kind", ["2b", "5b"])
def test_every_parameter_gradient_matches_diffusers(kind, tmp_path):
    ref = make_reference(kind)
    ref.save_pretrained(tmp_path)
    ours = CogVideoXTransformer.from_diffusers(tmp_path)
    x, text, t, probe = make_inputs(kind, SIZES[0])
    ref.zero_grad(set_to_none=True)
    reference_forward_backward(ref, kind, x, text, t, probe)
    _forward_backward(ours, x, text, t, probe)
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        keys = diffusers_keys(name)
        want = torch.cat([ref_grads[k].grad for k in keys]) if len(keys) > 1 else ref_grads[keys[0]].grad
        # floor 1 (as tests/test_dit_distributed.py): the key LayerNorm bias has an exactly-zero true gradient
        # (softmax ignores a shift of all keys), so both sides hold rounding noise
        err = ((p.grad.double() - want.double()).norm() / max(want.double().norm().item(), 1.0)).item()
        assert err < 1e-5, (name, err)


def test_fused_functions_pass_gradcheck():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    b, s, d, n_text = 2, 7, 6, 3
    x, w, bias = r(b, s, d), r(d), r(d)
    mods = [r(b, d) for _ in range(4)]
    check = partial(torch.autograd.gradcheck, fast_mode=True)
    assert check(lambda *a: ada_layer_norm(a[0], n_text, a[1], a[2], 1e-5, *a[3:]), (x, w, bias, *mods))
    assert check(lambda *a: ada_layer_norm(a[0], n_text, None, None, 1e-5, *a[1:]), (x, *mods))
    a, gates = r(b, s, d), [r(b, d) for _ in range(2)]
    assert check(lambda *z: gated_residual(z[0], z[1], n_text, *z[2:]), (x, a, *gates))
    angles = torch.rand(s - n_text, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    table = rope_tables(cos, sin, n_text).double()
    q = r(b, s, 2, d)
    assert check(lambda z: apply_rope_stream(z, table), (q,))
    with torch.no_grad():  # text rows untouched; video rows rotate pairs (2i, 2i+1) as in diffusers
        out = apply_rope_stream(q, table)
        assert torch.equal(out[:, :n_text], q[:, :n_text])
        pairs = q[:, n_text:].unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        want = q[:, n_text:] * cos[:, None] + rotated * sin[:, None]
        torch.testing.assert_close(out[:, n_text:], want)


def _reference_ada_layer_norm(x, n_text, weight, bias, eps, text_scale, text_shift, video_scale, video_shift):
    """The expert AdaLN in plain autograd ops (float64 in the test): an independent reference for the Function."""
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return torch.cat([y[:, :n_text] * (1 + text_scale[:, None]) + text_shift[:, None],
                      y[:, n_text:] * (1 + video_scale[:, None]) + video_shift[:, None]], 1)


@pytest.mark.parametrize("route", ["batched", "per_sample"])
def test_ada_layer_norm_backward_routes_match_float64(route, monkeypatch):
    """Both backward routes (batched for small samples, per-sample native for large ones), in float64 (gradcheck),
    float32 and bfloat16, against plain autograd in float64; with weight and bias or without, and with a segment
    empty (a sequence-parallel rank holding no text tokens, or no video tokens)."""
    monkeypatch.setattr(fused, "BATCHED_NORM_BACKWARD_MAX_NUMEL", 1 << 30 if route == "batched" else 0)
    g = torch.Generator().manual_seed(1)
    b, s, d = 3, 9, 16
    for n_text in (4, 0, s):
        for affine in (True, False):
            x = torch.randn(b, s, d, generator=g, dtype=torch.float64) * 3 + 1
            params = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(2)] if affine else [None, None]
            mods = [torch.randn(b, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(4)]
            leaves = [t for t in (x, *params, *mods) if t is not None]

            def call(fn, *ts, n_text=n_text, affine=affine):
                it = iter(ts)
                xx, w, bb = next(it), next(it) if affine else None, next(it) if affine else None
                return fn(xx, n_text, w, bb, 1e-5, *it)

            inputs = [t.clone().requires_grad_(True) for t in leaves]
            assert torch.autograd.gradcheck(lambda *ts: call(ada_layer_norm, *ts), inputs, fast_mode=True)
            probe = torch.randn(b, s, d, generator=g, dtype=torch.float64)
            want = torch.autograd.grad((call(_reference_ada_layer_norm, *inputs) * probe).sum(), inputs)
            # Measured worst relative errors: float32 1.3e-7 (both routes); bfloat16 (8-bit mantissas in the inputs
            # too) 0.45% batched (it computes in float32), 0.8% per-sample (native bfloat16 kernels).
            for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1.5e-2)):
                low = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
                got = torch.autograd.grad((call(ada_layer_norm, *low).double() * probe).sum(), low)
                for i, (a, w) in enumerate(zip(got, want)):
                    assert a.dtype == dtype
                    assert _rel(a, w) < tol, (route, n_text, affine, dtype, i, _rel(a, w))


def test_compiled_blocks_match_eager(tmp_path):
    pytest.importorskip("torch._inductor")
    make_reference("5b").save_pretrained(tmp_path)
    eager = CogVideoXTransformer.from_diffusers(tmp_path)
    compiled = CogVideoXTransformer.from_diffusers(tmp_path, compile_blocks=True)
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]
    x, text, t, probe = make_inputs("5b", SIZES[0])
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # nothing cached from other tests of this process: the blocks compile here
    counters.clear()
    for _ in range(2):  # the second call runs the cached compiled graph
        a, b = _forward_backward(eager, x, text, t, probe), _forward_backward(compiled, x, text, t, probe)
    # dynamo captured graphs (the blocks; the last one is its own graph: it returns the video tokens only)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    for u, v in zip(a, b):
        assert _rel(v, u) < 1e-5
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert _rel(q.grad, p.grad) < 1e-4, n


def test_cpu_half_compute_fallback_matches_native_bf16(tmp_path, monkeypatch):
    """bf16 storage with float32 compute: the attention sublayer really runs in float32 (its inputs are seen
    there), and the results are as close to the float32 model as native bf16's (both are dominated by the bf16
    storage of weights and activations: 0.73% vs 0.74% output error observed)."""
    from cogvx_ds.models.dit import layers

    make_reference("5b").save_pretrained(tmp_path)
    f32 = CogVideoXTransformer.from_diffusers(tmp_path)
    fallback = CogVideoXTransformer.from_diffusers(tmp_path, dtype=torch.bfloat16, cpu_half_compute="fp32")
    native = CogVideoXTransformer.from_diffusers(tmp_path, dtype=torch.bfloat16, cpu_half_compute="native")
    x, text, t, probe = make_inputs("5b", SIZES[0])
    want = _forward_backward(f32, x, text, t, probe)
    seen = []
    real = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, k, v, kernel: seen.append(q.dtype) or real(q, k, v, kernel))
    got = _forward_backward(fallback, x.bfloat16(), text.bfloat16(), t, probe)
    nat = _forward_backward(native, x.bfloat16(), text.bfloat16(), t, probe)
    layers_ = fallback.config.num_layers
    assert seen == [torch.float32] * layers_ + [torch.bfloat16] * layers_
    for w, g, n in zip(want, got, nat):
        assert g.dtype == torch.bfloat16
        assert _rel(g, w) < max(2 * _rel(n, w), 2e-2)  # as close to fp32 as native bf16 is (or closer)
    for p in fallback.parameters():
        assert p.dtype == p.grad.dtype == torch.bfloat16


def test_cpu_half_compute_choice_and_validation():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert compute_dtype("fp32", torch.bfloat16, cpu) == torch.float32
    assert compute_dtype("native", torch.bfloat16, cpu) is None
    assert compute_dtype("fp32", torch.float32, cpu) is None
    assert compute_dtype("fp32", torch.bfloat16, gpu) is None  # never on GPUs
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert compute_dtype("auto", torch.bfloat16, cpu) == (None if native else torch.float32)
    with pytest.raises(ConfigError, match="model.cpu_half_compute"):
        validate_model(ModelConfig(cpu_half_compute="fast"))


def test_gelu_tanh_matches_float64_and_routes():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 96, generator=g) * 4).requires_grad_(True)  # tails far into both saturated ends
    probe = torch.randn(64, 96, generator=g)
    x64 = x.detach().double().requires_grad_(True)
    want = torch.nn.functional.gelu(x64, approximate="tanh")
    (want * probe.double()).sum().backward()
    got = fused.gelu_tanh(x)
    assert got.grad_fn is not None and "GeluTanh" in type(got.grad_fn).__name__  # the sigmoid form really runs
    (got * probe).sum().backward()
    # float32 rounding: measured 1.4e-7 (value) and 1.5e-6 (gradient) worst error relative to |value| + 1
    assert ((got.double() - want).abs() / (want.abs() + 1)).max() < 1e-6
    assert ((x.grad.double() - x64.grad).abs() / (x64.grad.abs() + 1)).max() < 1e-5
    assert torch.isfinite(fused.gelu_tanh(torch.tensor([-1e30, -100.0, 100.0, 1e30]))).all()
    half = torch.randn(8, generator=g).bfloat16()  # other dtypes: aten's kernel
    assert torch.equal(fused.gelu_tanh(half), torch.nn.functional.gelu(half, approximate="tanh"))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rope", [True, False])
def test_head_norm_rope_passes_gradcheck_and_matches_the_plain_composition(affine, rope):
    g = torch.Generator().manual_seed(4)
    b, s, h, d, n_text = 2, 7, 3, 8, 3
    qkv = torch.randn(b, s, 3, h, d, generator=g, dtype=torch.float64)
    x = qkv[:, :, 0].requires_grad_(True)  # a strided view, as the model passes it
    w, bias = (torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True) if affine else None
               for _ in range(2))
    angles = torch.rand(s - n_text, d // 2, generator=g, dtype=torch.float64) * 6
    table = rope_tables(angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1), n_text).double()
    table = table if rope else None
    leaves = [t for t in (x, w, bias) if t is not None]

    def fused_fn(*ts):
        return fused.head_norm_rope(ts[0], *(ts[1:] if affine else (None, None)), 1e-6, table)

    def plain(*ts):
        y = torch.nn.functional.layer_norm(ts[0], (d,), *(ts[1:] if affine else (None, None)), 1e-6)
        return y if table is None else apply_rope_stream(y, table)

    assert torch.autograd.gradcheck(fused_fn, leaves, fast_mode=True)
    out = fused_fn(*leaves)
    assert out.grad_fn is not None and "HeadNormRope" in type(out.grad_fn).__name__
    assert out.transpose(1, 2).is_contiguous()  # head-major memory: the attention kernel's layout
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * probe).sum(), leaves)
    want = torch.autograd.grad((plain(*leaves) * probe).sum(), leaves)
    torch.testing.assert_close(out, plain(*leaves), rtol=1e-12, atol=1e-12)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # float32, and the gradient arriving in head-major memory (from the attention kernel) or token-major (SP)
    x32 = qkv[:, :, 0].float().requires_grad_(True)
    for cot in (probe.float(), probe.float().transpose(1, 2).contiguous().transpose(1, 2)):
        y = fused.head_norm_rope(x32, *((w.detach().float(), bias.detach().float()) if affine else (None, None)),
                                 1e-6, table)
        (gx,) = torch.autograd.grad((y * cot).sum(), x32)
        torch.testing.assert_close(gx.double(), want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,half_compute", [(torch.float32, "native"), (torch.bfloat16, "native"),
                                                (torch.bfloat16, "fp32")], ids=["fp32", "bf16", "bf16_fp32_compute"])
def test_recompute_gelu_gives_identical_gradients_and_keeps_less(dtype, half_compute, tmp_path):
    """model.recompute_gelu: the same outputs and gradients bit for bit (the GELU output is rebuilt by the same
    kernel), 4 x width x tokens fewer saved values per block (fc2's input, in the compute dtype: float32 under the
    CPU half-precision fallback), and nothing changes under activation checkpointing (whose own saved-tensor hooks
    must stay the only ones there)."""
    from cogvx_ds.perf_measure import model_constants, saved_tensor_bytes

    make_reference("5b").save_pretrained(tmp_path)
    x, text, t, probe = (u.to(dtype) if u.is_floating_point() and u.dim() > 1 else u
                         for u in make_inputs("5b", SIZES[0]))
    results = {}
    for gelu, ckpt in [(False, False), (True, False), (True, True)]:
        m = CogVideoXTransformer.from_diffusers(tmp_path, dtype=dtype, recompute_gelu=gelu,
                                                activation_checkpointing=ckpt, cpu_half_compute=half_compute)
        assert all(b.mlp.recompute_gelu == (gelu and not ckpt) for b in m.blocks)
        outs = _forward_backward(m, x, text, t, probe)
        grads = [p.grad for p in m.parameters()]
        _, saved = saved_tensor_bytes(partial(m, x, text, t), model_constants(m))
        results[gelu, ckpt] = (outs, grads, saved)
    (o0, g0, s0), (o1, g1, s1) = results[False, False], results[True, False]
    for a, b in zip([*o0, *g0], [*o1, *g1]):
        assert torch.equal(a, b)
    cfg = m.config
    video = x.shape[1] * x.shape[3] * x.shape[4] // 4
    # every block's MLP runs the [text; video] stream but the last's, which runs the video tokens only
    tokens = x.shape[0] * ((cfg.num_layers - 1) * (video + cfg.max_text_seq_length) + video)
    compute = torch.float32 if half_compute == "fp32" else dtype
    assert s0 - s1 == 4 * cfg.inner_dim * tokens * compute.itemsize
    (o2, g2, s2) = results[True, True]  # checkpointing: recomputed blocks, same numbers, block inputs kept only
    for a, b in zip([*o0, *g0], [*o2, *g2]):
        assert torch.equal(a, b)
    assert s2 < s1 / 4
    with pytest.raises(ValueError, match="contiguous"):
        with fused.recompute_in_backward(torch.zeros(4, 4).t(), lambda: None):
            pass


def test_recompute_in_backward_composes_with_outer_saved_tensor_hooks():
    """Tensors other than the target go to the hooks active around the context (a user's save_on_cpu, or the
    saved-bytes measurement), the target does not; gradients are those of the plain graph."""
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 6, requires_grad=True)
    torch.tanh(x).matmul(w).square().sum().backward()
    expected = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    seen, unpacked = [], []

    def pack(t):
        seen.append(tuple(t.shape))
        return t

    def unpack(t):
        unpacked.append(tuple(t.shape))
        return t

    a = torch.tanh(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        with fused.recompute_in_backward(a, lambda: torch.tanh(x.detach())):
            y = a.matmul(w)  # saves a (the target) and w
        loss = y.square().sum()
    loss.backward()
    assert (8, 6) in seen and (4, 8) not in seen  # mm's w went to the outer hooks, its a (the target) did not
    assert (8, 6) in unpacked
    torch.testing.assert_close(x.grad, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(w.grad, expected[1], rtol=0, atol=0)
