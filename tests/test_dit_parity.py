"""Parity of our expert transformer with diffusers' CogVideoXTransformer3DModel on the same random weights."""

import pytest
import torch
from dit_helpers import (
    CONFIGS,
    SIZES,
    forward_backward,
    make_inputs,
    make_reference,
    reference_forward_backward,
    rel_err,
)

from cogvx_ds.models import CogVideoXTransformer

TOL = 1e-5  # float32; observed errors are ~1e-7 (differences are summation order and float64 position tables)


@pytest.mark.parametrize("kind", ["2b", "5b"])
def test_forward_and_input_gradient_match_diffusers(kind, tmp_path):
    ref = make_reference(kind)
    ref.save_pretrained(tmp_path)
    ours = CogVideoXTransformer.from_diffusers(tmp_path)
    assert ours.config.use_rotary_positional_embeddings == CONFIGS[kind]["use_rotary_positional_embeddings"]
    for size in SIZES:
        x, text, t, probe = make_inputs(kind, size)
        ref_out, ref_gx, ref_gt = reference_forward_backward(ref, kind, x, text, t, probe)
        out, gx, gt = forward_backward(ours, x, text, t, probe)
        assert out.shape == ref_out.shape == x.shape
        assert rel_err(out, ref_out) < TOL, (size, rel_err(out, ref_out))
        assert rel_err(gx, ref_gx) < TOL, (size, rel_err(gx, ref_gx))
        assert rel_err(gt, ref_gt) < TOL, (size, rel_err(gt, ref_gt))


def test_parity_is_not_vacuous(tmp_path):
    """The comparison above must be able to fail: one perturbed weight moves the output far beyond TOL."""
    ref = make_reference("5b")
    ref.save_pretrained(tmp_path)
    ours = CogVideoXTransformer.from_diffusers(tmp_path)
    x, text, t, probe = make_inputs("5b", SIZES[0])
    ref_out = reference_forward_backward(ref, "5b", x, text, t, probe)[0]
    with torch.no_grad():
        ours.blocks[1].attn.norm_k.weight.add_(0.1)
    out = forward_backward(ours, x, text, t, probe)[0]
    assert rel_err(out, ref_out) > 10 * TOL


def test_activation_checkpointing_gives_identical_gradients(tmp_path):
    make_reference("5b").save_pretrained(tmp_path)
    plain = CogVideoXTransformer.from_diffusers(tmp_path)
    ckpt = CogVideoXTransformer.from_diffusers(tmp_path, activation_checkpointing=True)
    x, text, t, probe = make_inputs("5b", SIZES[1])
    a, b = forward_backward(plain, x, text, t, probe), forward_backward(ckpt, x, text, t, probe)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
