"""VAE training losses: reconstruction (L1/L2), LPIPS, KL, hinge GAN with a start step and an adaptive weight.

The adaptive GAN weight balances the gradient norms of the reconstruction (+perceptual) loss and of the
generator loss. Taming-transformers measures them at the decoder's last weight with torch.autograd.grad; under
DeepSpeed ZeRO-2 that call fires the engine's gradient-reduction hooks (they hook every gradient computed for a
parameter), so we measure them at the decoder output instead: both losses are evaluated on a detached copy of
the reconstruction, their gradients w.r.t. that copy give the weight, and the VAE is then backpropagated with
the combined output gradient (`surrogate`), which yields exactly the gradients of nll + w * g_loss + kl.
The weight measured there is smaller than taming's at the last layer (about 19x for a tiny VAE at
initialisation), so a `disc_weight` taken from taming or SAT is not calibrated for it.

KL: the reconstruction loss is a mean over video elements, so the KL (summed over a sample's latent) is divided by
the video elements of a sample (`kl_per_video_element`): `kl_weight` then weighs KL against reconstruction as in
taming and CogVideoX's SAT VAE (which sum both per sample), and their values (1e-6) carry over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lpips import LPIPS, lpips_on_frames


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def kl_per_video_element(kl_per_sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The batch mean of each sample's KL (summed over its latent), per element of its video x[i]. The KL summed
    alone beside a mean reconstruction loss was (elements per clip) times heavier than taming's: 5e7x at
    49x480x720, where kl_weight=1e-6 made it outweigh reconstruction 200-fold."""
    return kl_per_sample.mean() / x[0].numel()


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str, chroma_weight: float = 1.0) -> torch.Tensor:
    """L1 or L2 over [B, 3, ...]. chroma_weight != 1 splits the error into its luma part (the channel mean) and
    its chroma part (the rest) and weights the latter: an autoencoder learns colour long after brightness when
    most pixels are grey, and this brings colour forward. At 1 it is the plain loss (for L2, exactly the sum of
    the two parts)."""
    err = recon - x
    if chroma_weight != 1.0:
        luma = err.mean(dim=1, keepdim=True)
        chroma = err - luma
        if kind == "l1":
            return luma.abs().mean() + chroma_weight * chroma.abs().mean()
        if kind == "l2":
            return luma.pow(2).mean() + chroma_weight * chroma.pow(2).mean()
    if kind == "l1":
        return err.abs().mean()
    if kind == "l2":
        return err.pow(2).mean()
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


@dataclass
class GeneratorLossWeights:
    recon: str = "l1"
    lpips_weight: float = 1.0
    lpips_frames: int | None = 2
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 0
    max_adaptive_weight: float = 1e4
    chroma_weight: float = 1.0


def generator_step_terms(x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, disc, lpips: LPIPS | None,
                         w: GeneratorLossWeights, step: int, generator: torch.Generator | None = None):
    """Returns (surrogate to backpropagate into the VAE, metrics dict of float values).

    `disc` must be frozen (requires_grad False) by the caller: its parameters belong to another optimizer.
    """
    out = recon.detach().requires_grad_(True)
    rec = reconstruction_loss(x, out, w.recon, w.chroma_weight)
    perc = lpips_on_frames(lpips, x, out, w.lpips_frames, generator) if lpips is not None and w.lpips_weight else None
    nll = rec + (w.lpips_weight * perc if perc is not None else 0.0)
    (grad_nll,) = torch.autograd.grad(nll, out)
    metrics = {"rec_loss": rec.item(), "lpips": perc.item() if perc is not None else 0.0, "kl": kl.item()}
    grad = grad_nll
    gan_on = disc is not None and step >= w.disc_start and w.disc_weight > 0
    if gan_on:
        g_loss = -disc(out).mean()
        (grad_g,) = torch.autograd.grad(g_loss, out)
        d_weight = (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0.0, w.max_adaptive_weight) * w.disc_weight
        grad = grad_nll + d_weight * grad_g
        metrics.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        total = nll.detach() + d_weight * g_loss.detach()
    else:
        metrics.update(g_loss=0.0, d_weight=0.0)
        total = nll.detach()
    metrics["loss"] = (total + w.kl_weight * kl.detach()).item()
    surrogate = (recon * grad.detach()).sum() + w.kl_weight * kl
    return surrogate, metrics
