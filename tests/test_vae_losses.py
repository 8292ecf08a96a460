"""VAE training pieces: LPIPS weight loading (lpips-package layout), GAN/adaptive-weight losses, discriminator, data."""

import pytest
import torch

from cogvx_ds.models.vae.discriminator import PatchDiscriminator3D
from cogvx_ds.models.vae.losses import GeneratorLossWeights, generator_step_terms, hinge_d_loss
from cogvx_ds.models.vae.lpips import LPIPS, TAP_CHANNELS, lpips_on_frames, vgg16_features
from cogvx_ds.train.vae_data import MovingShapesStream, moving_shapes


def write_random_lpips(dir_path, seed: int = 0):
    """Random weights in the layouts lpips uses: vgg.pth heads + torchvision vgg16 checkpoint (with classifier)."""
    torch.manual_seed(seed)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    backbone = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too: ignored
    torch.save(heads, dir_path / "vgg.pth")
    torch.save(backbone, dir_path / "vgg16-397923af.pth")
    return heads, backbone


def test_lpips_loads_package_layouts(tmp_path):
    heads, backbone = write_random_lpips(tmp_path)
    lp = LPIPS.from_path(tmp_path)
    assert torch.equal(lp.lin2.model[1].weight, heads["lin2.model.1.weight"])
    assert torch.equal(lp.features[28].weight, backbone["features.28.weight"])
    # A full lpips.LPIPS state dict (net.slice{k}.{idx}) gives the same network.
    slice_of = lambda i: 1 + sum(i > t for t in (3, 8, 15, 22))  # noqa: E731
    full = dict(heads)
    for k, v in backbone.items():
        if k.startswith("features."):
            idx = int(k.split(".")[1])
            full[f"net.slice{slice_of(idx)}.{k[len('features.'):]}"] = v
    torch.save(full, tmp_path / "full.pth")
    lp2 = LPIPS.from_path(tmp_path / "full.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lp2(x, y), d)
    torch.testing.assert_close(lp(y, x), d)  # symmetric
    assert lp(x, x).abs().max() < 1e-6
    assert not any(p.requires_grad for p in lp.parameters())


def test_lpips_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg.pth"):
        LPIPS.from_path(tmp_path)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "vgg.pth")
    torch.save({"features.0.weight": torch.rand(64, 3, 3, 3)}, tmp_path / "vgg16.pth")
    with pytest.raises(ValueError, match="missing"):
        LPIPS.from_path(tmp_path)


def test_lpips_on_video_frames_differentiable(tmp_path):
    write_random_lpips(tmp_path)
    lp = LPIPS.from_path(tmp_path)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    d = lpips_on_frames(lp, x, y, frames=2, generator=torch.Generator().manual_seed(0))
    d.backward()
    assert d.item() > 0 and y.grad.abs().sum() > 0


def test_surrogate_gives_the_gradient_of_the_full_loss():
    """generator_step_terms backpropagates nll + w*g_loss + kl_w*kl exactly, with the adaptive weight w computed here
    independently: ||d nll / d recon|| / (||d g_loss / d recon|| + 1e-4) x disc_weight, at the decoder output."""
    torch.manual_seed(0)
    decoder = torch.nn.Conv3d(4, 3, 1)
    disc = PatchDiscriminator3D(3, 8, 2).requires_grad_(False)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    z = torch.randn(2, 4, 5, 16, 16)
    weights = GeneratorLossWeights(recon="l2", lpips_weight=0.0, kl_weight=0.1, disc_weight=0.7, disc_start=0)
    kl = decoder.weight.pow(2).sum()  # any differentiable stand-in
    recon = decoder(z)
    surrogate, m = generator_step_terms(x, recon, kl, disc, None, weights, step=5)
    grads = torch.autograd.grad(surrogate, list(decoder.parameters()))
    leaf = decoder(z).detach().requires_grad_(True)
    (g_nll,) = torch.autograd.grad((x - leaf).pow(2).mean(), leaf)
    (g_gan,) = torch.autograd.grad(-disc(leaf).mean(), leaf)
    w = min((g_nll.norm() / (g_gan.norm() + 1e-4)).item(), 1e4) * 0.7
    assert m["d_weight"] == pytest.approx(w, rel=1e-5) and w > 0
    recon = decoder(z)
    direct = (x - recon).pow(2).mean() + w * -disc(recon).mean() + 0.1 * decoder.weight.pow(2).sum()
    expected = torch.autograd.grad(direct, list(decoder.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert m["loss"] == pytest.approx(direct.item(), rel=1e-5)
    # Before disc_start the GAN term is off.
    _, m0 = generator_step_terms(x, decoder(z), kl, disc, None, GeneratorLossWeights(disc_start=10), step=5)
    assert m0["d_weight"] == 0.0 and m0["g_loss"] == 0.0


def test_hinge_loss_and_discriminator_shapes():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    disc = PatchDiscriminator3D(3, 16, 3, time_downsample=2)
    logits = disc(torch.rand(2, 3, 9, 32, 32))
    assert logits.shape == (2, 1, 3, 4, 4)  # patches over frames and pixels


def test_moving_shapes_deterministic_and_moving():
    a, b = moving_shapes(9, 32, 40, seed=3), moving_shapes(9, 32, 40, seed=3)
    assert a.shape == (3, 9, 32, 40) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert (a[:, 0] - a[:, -1]).abs().sum() > 0  # shapes move
    assert not torch.equal(a, moving_shapes(9, 32, 40, seed=4))


def test_stream_position_and_ranks():
    s = MovingShapesStream(2, 5, 16, 16, seed=1)
    first, second = s.next_batch(), s.next_batch()
    assert s.position == 4
    resumed = MovingShapesStream(2, 5, 16, 16, seed=1, position=2)
    assert torch.equal(resumed.next_batch(), second)
    r0 = MovingShapesStream(1, 5, 16, 16, seed=1, rank=0, world=2)
    r1 = MovingShapesStream(1, 5, 16, 16, seed=1, rank=1, world=2)
    assert torch.equal(torch.cat([r0.next_batch(), r1.next_batch()]), first) and r0.position == 2


def test_chroma_weighted_reconstruction_loss():
    from cogvx_ds.models.vae.losses import reconstruction_loss

    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(2, 3, 5, 4, 4, generator=g, dtype=torch.float64), torch.rand(2, 3, 5, 4, 4, generator=g,
                                                                                  dtype=torch.float64)
    plain = (r - x).pow(2).mean()
    # L2 splits exactly into luma (channel mean) + chroma parts, so weight 1 through the split is the plain loss.
    err = r - x
    luma = err.mean(1, keepdim=True)
    assert torch.allclose(luma.pow(2).mean() + (err - luma).pow(2).mean(), plain, rtol=1e-12)
    grey = x + 0.3  # the same error in every channel: no chroma, so the weight changes nothing
    assert torch.allclose(reconstruction_loss(x, grey, "l2", 5.0), reconstruction_loss(x, grey, "l2"), rtol=1e-12)
    tint = x + torch.tensor([0.2, -0.1, -0.1], dtype=torch.float64).view(1, 3, 1, 1, 1)  # zero channel mean
    assert torch.allclose(reconstruction_loss(x, tint, "l2", 5.0), 5 * reconstruction_loss(x, tint, "l2"), rtol=1e-12)
    assert torch.allclose(reconstruction_loss(x, tint, "l1", 5.0), 5 * reconstruction_loss(x, tint, "l1"), rtol=1e-12)


def test_kl_weight_weighs_kl_against_reconstruction_as_in_taming():
    """taming / SAT sum the reconstruction and the KL per sample (then average over the batch); ours averages the
    reconstruction over elements, so the KL is divided by a sample's video elements: the same loss up to one
    factor, hence the same meaning for kl_weight (the KL summed alone was 27,648x heavier at 9x32x32)."""
    from cogvx_ds.models.vae.autoencoder import DiagonalGaussian
    from cogvx_ds.models.vae.losses import kl_per_video_element

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 32, 32, generator=g)
    recon = x + 0.1 * torch.randn(x.shape, generator=g)
    posterior = DiagonalGaussian(torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g))
    w = 1e-6
    taming = (recon - x).abs().sum() / 2 + w * posterior.kl().sum() / 2
    ours = (recon - x).abs().mean() + w * kl_per_video_element(posterior.kl(), x)
    torch.testing.assert_close(ours * x[0].numel(), taming, rtol=1e-5, atol=0)
