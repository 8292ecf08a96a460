"""DDIM and DPM-Solver++(2M) samplers: diffusers' CogVideoX schedulers as oracle, closed forms, guidance, timesteps."""

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpm_cogvideox

from cogvx_ds.diffusion import (
    NoiseSchedule,
    ddim_sample,
    dpmpp_2m_sample,
    guidance_scale_at,
    guided_velocity,
    noise_from_seeds,
    sample,
    samplers,
    trailing_timesteps,
)

SCHEDULE = NoiseSchedule.cogvideox()


def _oracle(cls, n):
    sched = cls(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    sched.set_timesteps(n)
    return sched


def fixed_model(x, t):
    """A deterministic, nonlinear stand-in for a trained network."""
    tb = (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * (1 - tb) + 0.3 * torch.sin(3 * x + tb)


def gaussian_model(mu, std):
    """The exact v for data ~ N(mu, std^2 I); std = 0 is a single data point."""

    def model_fn(x, t):
        alpha, sigma = SCHEDULE.coefficients(t, x)
        x0 = mu + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x - alpha * mu)
        return (alpha * x - x0) / sigma

    return model_fn


def _x_T(dtype=torch.float64, shape=(2, 3, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("n", [25, 50])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])  # measured: 2e-15, 0
def test_ddim_trajectory_equals_diffusers(n, dtype, atol):
    x = _x_T(dtype)
    ours = []
    ddim_sample(fixed_model, x, SCHEDULE, n, callback=lambda i, t, xi: ours.append(xi))
    sched = _oracle(CogVideoXDDIMScheduler, n)
    for i, t in enumerate(sched.timesteps):
        v = fixed_model(x, torch.full((x.shape[0],), int(t)))
        x = sched.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(ours[i], x, rtol=0, atol=atol)


@pytest.mark.parametrize("n", [10, 50])
def test_dpmpp_2m_equals_diffusers_with_the_same_noise(n, monkeypatch):
    x = _x_T()
    seed = 123
    # Our sampler draws one noise per step (all but the last) from the generator, in order; replay those draws.
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(n - 1)] + [torch.zeros_like(x)]
    current = {}
    monkeypatch.setattr(scheduling_dpm_cogvideox, "randn_tensor", lambda *a, **k: current["noise"])

    ours = []
    dpmpp_2m_sample(
        fixed_model,
        x,
        SCHEDULE,
        n,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, xi: ours.append(xi),
    )
    sched = _oracle(CogVideoXDPMScheduler, n)
    old_x0 = None
    for i, t in enumerate(sched.timesteps):
        current["noise"] = noises[i]
        v = fixed_model(x, torch.full((x.shape[0],), int(t)))
        back = sched.timesteps[i - 1] if i > 0 else None
        x, old_x0 = sched.step(v, old_x0, t, back, x, return_dict=False)
        torch.testing.assert_close(ours[i], x, rtol=0, atol=1e-12)  # measured: 7e-15


@pytest.mark.parametrize("n", [10, 50])
def test_dpmpp_2m_ode_equals_diffusers_multistep_solver(n):
    # diffusers' generic DPMSolverMultistepScheduler has no SNR shift and cannot take a zero-SNR end point (its
    # sigma = sqrt((1 - abar) / abar) would be infinite), so compare on its own plain schedule. It keeps sigmas in
    # float32, hence the tolerance (measured: 1.3e-6); first-order steps instead would miss it (measured: 2e-3 at
    # 10 steps, 6e-5 at 50).
    sched = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(n)
    schedule = NoiseSchedule(sched.alphas_cumprod.double())
    x = _x_T()
    ours = []
    dpmpp_2m_sample(fixed_model, x, schedule, n, stochastic=False, callback=lambda i, t, xi: ours.append(xi))
    assert sched.timesteps.tolist() == trailing_timesteps(n)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(fixed_model(x, torch.full((x.shape[0],), int(t))), t, x, return_dict=False)[0]
        torch.testing.assert_close(ours[i], x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 30, 50, 1000])
def test_samplers_visit_exactly_the_trailing_timesteps(n):
    expected = trailing_timesteps(n)
    assert (
        len(expected) == len(set(expected)) == n and expected[0] == 999 and expected == sorted(expected, reverse=True)
    )
    if n in (30, 50):  # diffusers' list for the same spacing
        assert expected == _oracle(CogVideoXDDIMScheduler, n).timesteps.tolist()
    for method in ("ddim", "dpm++", "dpm++ode"):
        seen = []

        def recording_model(x, t, seen=seen):
            assert t.dtype == torch.int64 and t.shape == (x.shape[0],) and len(set(t.tolist())) == 1
            seen.append(int(t[0]))
            return torch.zeros_like(x)

        sample(recording_model, _x_T(torch.float32, (3, 2)), SCHEDULE, n, method=method)
        assert seen == expected


@pytest.mark.parametrize("n", [1, 7, 50])
def test_single_data_point_is_recovered_exactly(n):
    mu = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = gaussian_model(mu, 0.0)
    for out in (
        ddim_sample(model, _x_T(), SCHEDULE, n),
        dpmpp_2m_sample(model, _x_T(), SCHEDULE, n, stochastic=False),
        dpmpp_2m_sample(model, _x_T(), SCHEDULE, n, generator=torch.Generator().manual_seed(0)),
    ):
        torch.testing.assert_close(out, mu.expand_as(out), rtol=0, atol=1e-12)


def test_gaussian_data_ode_samplers_converge_to_the_flow_endpoint():
    # For data N(mu, I) the probability-flow ODE maps the pure noise z to mu + z (closed form).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    mu = torch.randn(1, 1000, generator=g, dtype=torch.float64)
    model = gaussian_model(mu, 1.0)
    err = {m: [] for m in ("ddim", "dpm++ode")}
    for n in (10, 20, 40, 80):
        for m in err:
            err[m].append((sample(model, z, SCHEDULE, n, method=m) - (mu + z)).abs().max().item())
    for m, e in err.items():
        assert all(a > b for a, b in zip(e, e[1:])), (m, e)  # more steps, smaller error
    assert all(d < c for d, c in zip(err["dpm++ode"], err["ddim"]))  # second order beats first order
    assert err["dpm++ode"][-1] < 0.06 and err["ddim"][-1] < 0.15


def test_stochastic_dpmpp_samples_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 1000, generator=g, dtype=torch.float64)
    z = torch.randn(20, 1000, generator=g, dtype=torch.float64)
    out = dpmpp_2m_sample(gaussian_model(mu, 1.0), z, SCHEDULE, 200, generator=torch.Generator().manual_seed(1))
    residual = out - mu
    assert abs(residual.mean().item()) < 0.03 and abs(residual.std().item() - 1.0) < 0.03


def test_guidance_scale_one_is_the_conditional_prediction():
    calls = {"uncond": 0}

    def uncond(x, t):
        calls["uncond"] += 1
        return torch.cos(x)

    x = _x_T(torch.float32)
    t = torch.full((2,), 500)
    assert torch.equal(guided_velocity(fixed_model, uncond, x, t, 1.0), fixed_model(x, t))
    for method in ("ddim", "dpm++"):
        kw = {"generator": torch.Generator().manual_seed(0)} if method == "dpm++" else {}
        plain = sample(fixed_model, x, SCHEDULE, 10, method=method, **kw)
        kw = {"generator": torch.Generator().manual_seed(0)} if method == "dpm++" else {}
        guided = sample(fixed_model, x, SCHEDULE, 10, method=method, uncond_fn=uncond, guidance_scale=1.0, **kw)
        assert torch.equal(plain, guided)
    assert calls["uncond"] == 0
    # Scale s: v_u + s (v_c - v_u); a missing uncond model is an error, not a silent no-op.
    torch.testing.assert_close(guided_velocity(fixed_model, uncond, x, t, 4.0), cos_mix(x, t, 4.0))
    with pytest.raises(ValueError, match="uncond_fn"):
        ddim_sample(fixed_model, x, SCHEDULE, 5, guidance_scale=6.0)


def cos_mix(x, t, s):
    return torch.cos(x) + s * (fixed_model(x, t) - torch.cos(x))


def test_dynamic_guidance_ramps_from_one_plus_scale_down_to_about_one(monkeypatch):
    n, scale = 50, 6.0
    scales = [guidance_scale_at(i, n, scale, dynamic=True) for i in range(n)]
    assert scales[0] == pytest.approx(1.0 + scale)
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    assert 1.0 <= scales[-1] < 1.0 + 1e-6
    assert guidance_scale_at(3, n, scale, dynamic=False) == scale
    # And the sampler applies exactly that per-step scale.
    used = []

    def recording_guidance(model_fn, uncond_fn, x, t, s):
        used.append(s)
        return guided_velocity(model_fn, uncond_fn, x, t, s)

    monkeypatch.setattr(samplers, "guided_velocity", recording_guidance)
    ddim_sample(
        fixed_model,
        _x_T(),
        SCHEDULE,
        n,
        uncond_fn=lambda x, t: torch.cos(x),
        guidance_scale=scale,
        dynamic_guidance=True,
    )
    assert used == scales


def test_seeds_make_each_sample_independent_of_its_batch():
    a = noise_from_seeds((3, 4), [1, 2, 3])
    b = noise_from_seeds((3, 4), [3])
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = dpmpp_2m_sample(fixed_model, a[:2], SCHEDULE, 5, generator=gens)
    solo = dpmpp_2m_sample(fixed_model, a[1:2], SCHEDULE, 5, generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(out[1:2], solo)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_inference_steps"):
        trailing_timesteps(1001, 1000)
    with pytest.raises(ValueError, match="method"):
        sample(fixed_model, _x_T(), SCHEDULE, 5, method="euler")
