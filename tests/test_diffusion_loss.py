"""v-MSE loss (== CogVideoX's weighted x0 loss), masks, and timestep-bucket aggregation."""

import pytest
import torch

from cogvx_ds.diffusion import NoiseSchedule, bucket_loss_sums, bucket_losses, bucket_names, v_mse_loss


def test_v_mse_equals_original_weighted_x0_loss():
    s = NoiseSchedule.cogvideox()
    g = torch.Generator().manual_seed(0)
    shape = (8, 4, 3, 6, 6)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    v_pred = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 300, 600, 900, 998, 999])
    x_t = s.add_noise(x0, eps, t)

    # The original objective: x0 from the model's v, MSE against x0, weighted by 1 / (1 - abar_t).
    x0_pred = s.x0_from_v(x_t, v_pred, t)
    weight = 1.0 / (1.0 - s.alphas_cumprod[t])
    original = weight * (x0_pred - x0).square().flatten(1).mean(1)

    ours = v_mse_loss(v_pred, s.v_target(x0, eps, t))
    torch.testing.assert_close(ours.double(), original, rtol=1e-6, atol=0)  # ours accumulates in float32


def test_mask_selects_elements_per_sample():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.zeros(3, 5, 1)
    mask[0, :2] = 1
    mask[1, :] = 1
    loss = v_mse_loss(pred, target, mask)  # [B, L, 1] broadcast over channels
    assert loss.shape == (3,)
    torch.testing.assert_close(loss[0], (pred[0, :2] - target[0, :2]).square().mean())
    torch.testing.assert_close(loss[1], v_mse_loss(pred, target)[1])
    assert loss[2].item() == 0.0  # nothing selected: no NaN


def test_bf16_inputs_give_float32_loss_and_shape_errors():
    pred = torch.ones(2, 7, dtype=torch.bfloat16)
    assert v_mse_loss(pred, torch.zeros_like(pred)).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        v_mse_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_bucket_aggregation():
    loss = torch.tensor([1.0, 3.0, 10.0, 5.0])
    t = torch.tensor([0, 99, 100, 999])
    sums, counts = bucket_loss_sums(loss, t, 1000, 10)
    assert counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert sums[0].item() == 4.0
    names = bucket_names(1000, 10)
    assert names[0] == "loss_t000_099" and names[-1] == "loss_t900_999"
    assert bucket_losses(sums, counts) == {"loss_t000_099": 2.0, "loss_t100_199": 10.0, "loss_t900_999": 5.0}
    # Uneven widths: every t lands in the bucket its name says.
    names = bucket_names(1000, 7)
    for t_value in range(1000):
        _, c = bucket_loss_sums(torch.zeros(1), torch.tensor([t_value]), 1000, 7)
        lo, hi = names[int(c.argmax())][len("loss_t") :].split("_")
        assert int(lo) <= t_value <= int(hi)
