"""The CPU linear kernel (cogvx_ds.models.dit.linear): oneDNN's float32 matmul with our own autograd gives F.linear's
values and gradients to float32 rounding (checked against float64), is really the kernel the model runs, survives
torch.compile, and `model.cpu_linear=aten` gives the same model to float32 rounding."""

import pytest
import torch
import torch.nn.functional as F
from dit_helpers import SIZES, make_inputs, make_reference

from cogvx_ds.config import ConfigError, ModelConfig, validate_model
from cogvx_ds.models import CogVideoXTransformer
from cogvx_ds.models.dit import linear as linear_mod
from cogvx_ds.models.dit.linear import linear, onednn_available, use_onednn

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch/CPU has no oneDNN float32 linear")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [80, 12], ids=["widening", "narrowing"])  # 12: fc2-like, oneDNN wgrad
@pytest.mark.parametrize("shape", [(37, 48), (2, 19, 48), (1, 48)])  # one row: the AdaLN GEMVs at batch 1
def test_values_and_gradients_match_float64(shape, bias, out_features):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out_features, 48, generator=g) / 7
    b = torch.randn(out_features, generator=g) if bias else None
    probe = torch.randn(*shape[:-1], out_features, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    leaves64 = [t.double().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    assert use_onednn(*leaves[:2], leaves[2] if bias else None)
    out = linear(*leaves)
    ref = F.linear(*leaves64)
    (out * probe).sum().backward()
    (ref * probe.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-6  # float32 rounding over a 48-term sum
    for got, want in zip(leaves, leaves64):
        assert got.grad.shape == want.grad.shape
        assert _rel(got.grad, want.grad) < 1e-6


@needs_onednn
def test_only_the_needed_gradients_and_strided_inputs(monkeypatch):
    """A frozen input or weight costs no matmul in backward: only the gradients autograd asks for are computed."""
    calls = []
    for name in ("_dgrad", "_wgrad"):
        real = getattr(linear_mod, name)
        monkeypatch.setattr(linear_mod, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 96, generator=g)[:, ::2]  # a strided input view, no gradient wanted
    w = torch.randn(24, 48, generator=g).requires_grad_(True)
    out = linear(x, w)
    out.square().sum().backward()
    assert w.grad is not None
    want = torch.func.grad(lambda w_: F.linear(x.double(), w_).square().sum())(w.detach().double())
    assert _rel(w.grad, want) < 1e-6
    frozen = torch.randn(24, 48, generator=g)
    xg = torch.randn(40, 48, generator=g, requires_grad=True)
    linear(xg, frozen).sum().backward()
    assert _rel(xg.grad, F.linear(torch.ones(40, 24, dtype=torch.float64), frozen.double().t())) < 1e-6
    if onednn_available():  # the oneDNN path's own backward ran: the weight gradient, then the input gradient
        assert calls == ["_wgrad", "_dgrad"]


def test_kernel_choice():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert not use_onednn(x, w, None, "aten")
    assert not use_onednn(x.double(), w.double(), None)  # float32 only
    assert not use_onednn(x.bfloat16(), w.bfloat16(), None)
    assert not use_onednn(torch.randn(0, 8), w, None)  # an SP rank without tokens of a modality
    assert use_onednn(x, w, None, "onednn") == onednn_available()
    with pytest.raises(ValueError, match="linear kernel"):
        linear(x, w, None, "mkl")
    torch.testing.assert_close(linear(torch.randn(0, 8), w), torch.empty(0, 4))
    with pytest.raises(ConfigError, match="model.cpu_linear"):
        validate_model(ModelConfig(cpu_linear="mkl"))


@needs_onednn
@pytest.mark.parametrize("out_features", [32, 4])  # widening, and narrowing 4x (fc2: its weight gradient on oneDNN)
def test_compiled_linear_matches_eager(out_features):
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(out_features, 16, generator=g, requires_grad=True)
    x = torch.randn(2, 10, 16, generator=g, requires_grad=True)

    def f(x, w):
        return F.gelu(linear(x, w)).sum()

    eager = torch.autograd.grad(f(x, w), (x, w))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w), (x, w))
    for c, e in zip(compiled, eager):
        assert _rel(c, e) < 1e-6


@needs_onednn
def test_model_runs_its_linears_on_onednn_and_matches_aten(tmp_path, monkeypatch):
    make_reference("5b").save_pretrained(tmp_path)
    fast = CogVideoXTransformer.from_diffusers(tmp_path)  # cpu_linear auto
    aten = CogVideoXTransformer.from_diffusers(tmp_path, cpu_linear="aten")
    calls = []
    real = linear_mod._onednn
    monkeypatch.setattr(linear_mod, "_onednn", lambda *a: calls.append(a[1].shape) or real(*a))
    x, text, t, probe = make_inputs("5b", SIZES[0])
    results = []
    for model in (fast, aten):
        before = len(calls)
        model.zero_grad(set_to_none=True)
        out = model(x, text, t)
        (out * probe).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls) - before))
    (out_fast, grads_fast, n_fast), (out_aten, grads_aten, n_aten) = results
    layers = fast.config.num_layers
    # forward: every linear (per block: qkv, proj, fc1, fc2 and two AdaLN modulations; the patch conv, text
    # projection, two time-embedding linears, the final AdaLN and proj_out); backward: one input gradient each except
    # the patch conv, text projection and first time-embedding linear, whose inputs need none; and the weight gradient
    # of the layers that narrow 4x or more (fc2, here also the text projection)
    from cogvx_ds.models.dit.fused import Linear, PatchConv
    from cogvx_ds.models.dit.layers import ColumnLinear, RowLinear

    ours = [m for m in fast.modules() if isinstance(m, (ColumnLinear, RowLinear, Linear, PatchConv))]
    assert len(ours) == 6 * layers + 6
    narrowing = sum(m.weight[0].numel() >= 4 * m.weight.shape[0] for m in ours)
    assert narrowing >= layers
    assert n_fast == 2 * len(ours) - 3 + narrowing and n_aten == 0
    assert _rel(out_fast, out_aten) < 1e-5
    for name, grad in grads_aten.items():
        assert _rel(grads_fast[name], grad) < 1e-5, name


@needs_onednn
def test_flop_counter_counts_the_onednn_linear_like_f_linear():
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for fn in (linear, F.linear):
        x = torch.randn(2, 10, 16, requires_grad=True)
        w = torch.randn(32, 16, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            fn(x, w, torch.zeros(32)).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 20 * 16 * 32  # forward, input gradient, weight gradient
