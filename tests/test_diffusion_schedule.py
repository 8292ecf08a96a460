"""Schedule and v-prediction algebra, checked against closed forms and diffusers' schedulers (test oracle only)."""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler

from cogvx_ds.diffusion import NoiseSchedule, make_alphas_cumprod, rescale_zero_terminal_snr, shift_snr


def _cogvideox_oracle(cls):
    return cls(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )


@pytest.mark.parametrize("oracle", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_alphas_cumprod_match_diffusers_cogvideox(oracle):
    ours = NoiseSchedule.cogvideox().alphas_cumprod
    theirs = _cogvideox_oracle(oracle).alphas_cumprod
    assert ours.dtype == torch.float64 and theirs.dtype == torch.float64
    assert (ours - theirs).abs().max().item() <= 1e-12


def test_unshifted_schedule_matches_ddim_scheduler_in_float32():
    # DDIMScheduler has no SNR shift and builds its betas in float32, so compare at float32 precision.
    theirs = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    ).alphas_cumprod.double()
    ours = make_alphas_cumprod(snr_shift_scale=1.0, zero_terminal_snr=True)
    assert (ours - theirs).abs().max().item() < 1e-6


def test_closed_form_properties():
    plain = make_alphas_cumprod(snr_shift_scale=1.0, zero_terminal_snr=False)
    # Independent float64 reference for the scaled-linear part.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(plain.numpy(), np.cumprod(1.0 - betas), rtol=1e-13)

    shifted = shift_snr(plain, 3.0)
    snr = plain / (1 - plain)
    np.testing.assert_allclose((shifted / (1 - shifted)).numpy(), (snr / 3.0).numpy(), rtol=1e-10)

    zsnr = rescale_zero_terminal_snr(shifted)
    assert zsnr[-1].item() == 0.0  # pure noise at the last step
    assert zsnr[0].item() == pytest.approx(shifted[0].item(), rel=1e-14)  # first step kept
    assert bool((zsnr[1:] < zsnr[:-1]).all())  # strictly decreasing

    s = NoiseSchedule.cogvideox()
    assert s.num_train_timesteps == 1000
    assert s.snr()[-1].item() == 0.0
    torch.testing.assert_close(s.alphas**2 + s.sigmas**2, torch.ones(1000, dtype=torch.float64), rtol=0, atol=1e-15)


def test_v_algebra_round_trip_and_matches_diffusers():
    s = NoiseSchedule.cogvideox()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = s.add_noise(x0, eps, t)
    v = s.v_target(x0, eps, t)
    torch.testing.assert_close(s.x0_from_v(x_t, v, t), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.eps_from_v(x_t, v, t), eps, rtol=0, atol=1e-12)

    oracle = _cogvideox_oracle(CogVideoXDDIMScheduler)
    torch.testing.assert_close(x_t, oracle.add_noise(x0, eps, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(v, oracle.get_velocity(x0, eps, t), rtol=0, atol=1e-12)


def test_coefficients_follow_input_dtype_and_reject_bad_batch():
    s = NoiseSchedule.cogvideox()
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    alpha, sigma = s.coefficients(torch.tensor([0, 999]), x)
    assert alpha.dtype == torch.bfloat16 and alpha.shape == (2, 1)
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="snr_shift_scale"):
        make_alphas_cumprod(snr_shift_scale=0.0)
    with pytest.raises(ValueError, match="float64"):
        NoiseSchedule(torch.ones(10, dtype=torch.float32))


def test_from_config_and_linear_betas():
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        snr_shift_scale=3.0,
        rescale_zero_terminal_snr=True,
        prediction_type="v_prediction",
    )
    assert torch.equal(NoiseSchedule.from_config(cfg).alphas_cumprod, NoiseSchedule.cogvideox().alphas_cumprod)
    # "linear" betas against diffusers' DDIMScheduler (float32 betas there).
    ours = make_alphas_cumprod(beta_schedule="linear", snr_shift_scale=1.0, zero_terminal_snr=False)
    theirs = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear").alphas_cumprod.double()
    assert (ours - theirs).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config(SimpleNamespace(**{**vars(cfg), "prediction_type": "epsilon"}))
    with pytest.raises(ValueError, match="beta_schedule"):
        make_alphas_cumprod(beta_schedule="cosine")
