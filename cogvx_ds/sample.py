"""python -m cogvx_ds.sample: prompts -> mp4 videos with a trained (or released) CogVideoX-style model.

The model is a diffusers-format transformer folder, a training run dir (its final_model/), or a diffusers
pipeline folder (transformer/, vae/, text_encoder/, tokenizer/). Sampling is DDIM or DPM-Solver++ for
v-prediction on the zero-terminal-SNR schedule with trailing timesteps, classifier-free guidance against the
empty caption (optionally CogVideoX's dynamic guidance ramp), one seed per prompt, and a chunked VAE decode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_tools._video_io import to_uint8


def _resolve(model: Path, sub: str, given: str | None) -> Path | None:
    if given:
        return Path(given)
    if (model / sub).is_dir():
        return model / sub
    return None


# diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler: their defaults for the keys the schedule depends on
# (the same in both), which a scheduler_config.json that leaves a key out gets in the pipeline
SCHEDULER_CLASSES = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                      "snr_shift_scale": 3.0, "timestep_spacing": "leading", "set_alpha_to_one": True,
                      "steps_offset": 0}
# the steps this sampler takes (cogvx_ds.diffusion.samplers: trailing timesteps ending at a clean sample), which a
# pipeline folder's scheduler must describe for the two to sample alike
SAMPLER_STEPS = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0}


def training_settings(model: str | Path):
    """(latent scale, NoiseSchedule) the model was trained with, or None where the folder does not say.

    A training run dir (or its final_model/) has config.yaml: data.latent_scale and the diffusion schedule. A
    pipeline folder has scheduler/scheduler_config.json, and its VAE's scaling_factor is the latent scale (export
    writes the training one there). Sampling with another scale or schedule than training gives washed-out or
    noisy videos, so neither is left to a default when the model says.
    """
    from cogvx_ds.config import load_config
    from cogvx_ds.diffusion import NoiseSchedule

    root = Path(model)
    for run in (root, root.parent):
        if (run / "config.yaml").is_file() and ((run / "final_model").is_dir() or (run / "checkpoints").is_dir()):
            cfg = load_config(run / "config.yaml")
            return cfg.data.latent_scale, NoiseSchedule.from_config(cfg.diffusion)
    # a pipeline folder, or its transformer/ (given as --model, with the pipeline's scheduler beside it)
    sched = next((p for p in (root / "scheduler" / "scheduler_config.json",
                              root.parent / "scheduler" / "scheduler_config.json") if p.is_file()), None)
    if sched is not None:
        c = json.loads(sched.read_text())
        if c.get("_class_name") not in SCHEDULER_CLASSES:
            raise ValueError(f"{sched}: _class_name {c.get('_class_name')!r}; expected one of {SCHEDULER_CLASSES} "
                             "(the zero-terminal-SNR, SNR-shifted schedule this sampler implements)")
        c = {**SCHEDULER_DEFAULTS, **c}  # a key left out means diffusers' default, as the pipeline reads it
        if c.get("trained_betas") is not None:
            raise ValueError(f"{sched}: trained_betas (an explicit beta list) is not implemented; this sampler builds "
                             f"the schedule from beta_start/beta_end/beta_schedule")
        if c["prediction_type"] != "v_prediction":
            raise ValueError(f"{sched}: prediction_type {c['prediction_type']!r}; only v_prediction is implemented")
        steps = {k: c[k] for k in SAMPLER_STEPS if c[k] != SAMPLER_STEPS[k]}
        if steps:
            raise ValueError(f"{sched}: {steps} (diffusers' defaults where the file leaves them out): this sampler "
                             f"takes {SAMPLER_STEPS}, as CogVideoX's scheduler configs say; the pipeline would step "
                             f"through other timesteps")
        schedule = NoiseSchedule.cogvideox(
            num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"], beta_end=c["beta_end"],
            snr_shift_scale=c["snr_shift_scale"], zero_terminal_snr=c["rescale_betas_zero_snr"],
            beta_schedule=c["beta_schedule"])
        return None, schedule
    return None, None


def load_components(model: str, vae: str | None = None, text_encoder: str | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(transformer in `dtype`, VAE, text encoder), all on `device`; on a GPU the text encoder runs in bfloat16
    (T5-XXL: 9.5 instead of 19 GB), on the CPU as stored."""
    from cogvx_ds.models import CogVideoXTransformer, CogVideoXVAE
    from cogvx_ds.models.text_encoder import TextEncoder

    root = Path(model)
    if (root / "final_model" / "config.json").is_file():
        root = root / "final_model"
    elif (root / "checkpoints").is_dir() and not (root / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: a training run without final_model/ (it did not finish); export a "
                                f"checkpoint (python -m cogvx_ds.export --run-dir {model} --checkpoint latest ...) and "
                                f"sample the export, or let the run finish")
    device = torch.device(device)
    dit = CogVideoXTransformer.from_diffusers(root, dtype=dtype).to(device).eval()
    vae_dir, te_dir = _resolve(root, "vae", vae), _resolve(root, "text_encoder", text_encoder)
    if vae_dir is None or te_dir is None:
        raise FileNotFoundError(f"{model}: pass --vae and --text-encoder (or use a pipeline folder with vae/ and "
                                f"text_encoder/)")
    from cogvx_ds.export import check_components_fit

    # before the weights load, and long before a whole sampling run ends in a VAE that refuses the latents
    check_components_fit(dit.config, vae_dir, te_dir)
    vae_model = CogVideoXVAE.from_diffusers(vae_dir).to(device).eval()
    in_pipeline = te_dir.name == "text_encoder" and (te_dir.parent / "tokenizer").is_dir()
    encoder = TextEncoder.from_pretrained(te_dir.parent if in_pipeline else te_dir,
                                          max_length=dit.config.max_text_seq_length, device=device,
                                          dtype=torch.bfloat16 if device.type == "cuda" else None)
    return dit, vae_model, encoder


STEP_NOISE_SEED = 0x5EED_0F_57E95  # offsets a prompt's seed for the stochastic sampler's step noise


@torch.no_grad()
def generate(dit, vae, encoder, prompts: list[str], *, frames: int, height: int, width: int, steps: int = 50,
             sampler: str = "ddim", guidance: float = 6.0, dynamic_guidance: bool = False,
             seeds: list[int] | None = None, latent_scale: float | None = None, schedule=None,
             progress: bool = True) -> torch.Tensor:
    """Videos [B, 3, frames, height, width] in [-1, 1] for the prompts."""
    if dynamic_guidance and guidance == 1.0:
        raise ValueError("--dynamic-guidance ramps the guidance scale from 1 + guidance: it needs --guidance > 1 "
                         "(1 turns classifier-free guidance off)")
    from tqdm import tqdm

    from cogvx_ds.diffusion import NoiseSchedule, noise_from_seeds, sample

    cfg = dit.config
    check_size(dit, vae, frames, height, width)
    lat_frames = (frames - 1) // cfg.temporal_compression_ratio + 1
    schedule = schedule or NoiseSchedule.cogvideox()
    scale = latent_scale if latent_scale is not None else vae.scaling_factor
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    dtype = dit.proj_out.weight.dtype
    cond, _ = encoder.encode(prompts)
    uncond = encoder.empty_embedding()[0].expand_as(cond) if guidance != 1.0 else None
    shape = (lat_frames, cfg.in_channels, height // vae.config.spatial_ratio, width // vae.config.spatial_ratio)
    x_T = noise_from_seeds(shape, seeds, device=dit.proj_out.weight.device)  # drawn on the host: same on any device
    bar = tqdm(total=steps, desc="denoising", disable=not progress)

    def model_fn(x, t):
        return dit(x, cond.to(dtype), t.float()).float()

    def uncond_fn(x, t):
        return dit(x, uncond.to(dtype), t.float()).float()

    # the stochastic sampler's per-step noise: one generator per prompt too, from its seed (a stream of its own, not
    # x_T's), so a video depends on its seed only, not on the run or on the other prompts in its batch
    step_noise = [torch.Generator().manual_seed(STEP_NOISE_SEED + int(s)) for s in seeds]
    z = sample(model_fn, x_T.float(), schedule, steps, method=sampler,
               uncond_fn=uncond_fn if uncond is not None else None, guidance_scale=guidance,
               dynamic_guidance=dynamic_guidance, callback=lambda *_: bar.update(1),
               **({"generator": step_noise} if sampler == "dpm++" else {}))
    bar.close()
    z = (z / scale).permute(0, 2, 1, 3, 4)  # [B, C, F, H, W], unscaled latents for the VAE
    return vae.decode(z.to(vae.dtype)).float().clamp(-1, 1)


def check_size(dit, vae, frames: int, height: int, width: int) -> None:
    """ValueError unless the VAE and the transformer can make a video of this size."""
    cfg = dit.config
    side = vae.config.spatial_ratio * cfg.patch_size  # one transformer patch, in pixels
    if frames < 1 or height < side or width < side or (frames - 1) % cfg.temporal_compression_ratio \
            or height % side or width % side:
        raise ValueError(f"--frames must be {cfg.temporal_compression_ratio}k+1 and --height / --width positive "
                         f"multiples of {side} (VAE {vae.config.spatial_ratio}x times patch {cfg.patch_size}), got "
                         f"{frames}x{height}x{width}")
    lat_frames = (frames - 1) // cfg.temporal_compression_ratio + 1
    if lat_frames > 1 and lat_frames % 2 == 0:
        # The causal VAE decoder upsamples time only for odd latent counts (1 + 2m): k+1 even would decode to
        # 4(k+1) frames, not the 4k+1 asked for. CogVideoX itself samples 49 frames = 13 latent frames.
        raise ValueError(f"--frames {frames} gives {lat_frames} latent frames; use 8m+1 frames (9, 17, 25, ..., 49)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cogvx_ds.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="transformer folder, training run dir, or pipeline folder")
    ap.add_argument("--vae", help="diffusers-format VAE folder (default: <model>/vae)")
    ap.add_argument("--text-encoder", help="text encoder folder (default: <model>/text_encoder)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", help="a text file with one prompt per line")
    ap.add_argument("--out", default="samples", help="output folder for the mp4 files and samples.json (default: samples)")
    ap.add_argument("--frames", type=int, default=49,
                    help="pixel frames, 8m+1 for CogVideoX's VAE: 9, 17, ..., 49 (default: 49); 1 = an image")
    ap.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16 (default: 480)")
    ap.add_argument("--width", type=int, default=720, help="pixels, a multiple of 16 (default: 720)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "dpm++", "dpm++ode"],
                    help="ddim (default), dpm++ (CogVideoX's DPM-Solver++ with per-step noise, seeded per prompt) or "
                         "dpm++ode (its deterministic form)")
    ap.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale, 1 = off (default: 6)")
    ap.add_argument("--dynamic-guidance", action="store_true", help="CogVideoX's cosine ramp of the guidance scale")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts sampled at once (default: 4)")
    ap.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4s (default: 8)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if this PyTorch sees a GPU)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="transformer dtype (default: bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--latent-scale", type=float, help="factor the latents were multiplied by in training (default: "
                                                       "data.latent_scale of the run, else the VAE's scaling_factor)")
    args = ap.parse_args(argv)
    from cogvx_ds.utils import tune_malloc

    tune_malloc()

    for name in ("frames", "height", "width", "steps", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.fps > 0:
        ap.error(f"--fps must be > 0, got {args.fps}")
    if args.dynamic_guidance and args.guidance == 1.0:
        ap.error("--dynamic-guidance needs --guidance > 1 (1 turns classifier-free guidance off)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file; give a folder for the mp4s")
    prompts = list(args.prompt)
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            ap.error(f"--prompts-file {args.prompts_file}: no such file (one prompt per line)")
        prompts += [p.strip() for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
    if not prompts:
        ap.error("give --prompt or --prompts-file")
    if args.latent_scale is not None and not args.latent_scale > 0:
        ap.error(f"--latent-scale must be > 0 (the factor training multiplied the latents by), got {args.latent_scale}")
    from data_tools._video_io import write_mp4

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this PyTorch sees no CUDA device")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    try:
        dit, vae, encoder = load_components(args.model, args.vae, args.text_encoder, dtype, device)
        check_size(dit, vae, args.frames, args.height, args.width)  # before minutes of sampling, not after
        latent_scale, schedule = training_settings(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.latent_scale is not None:
        latent_scale = args.latent_scale
    latent_scale = latent_scale if latent_scale is not None else vae.scaling_factor
    print(f"latent scale {latent_scale:.4f}, schedule "
          f"{'of the training run' if schedule is not None else 'CogVideoX default (the model folder names none)'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        videos = generate(dit, vae, encoder, batch, frames=args.frames, height=args.height, width=args.width,
                          steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                          dynamic_guidance=args.dynamic_guidance, seeds=seeds, latent_scale=latent_scale,
                          schedule=schedule)
        for i, (prompt, video) in enumerate(zip(batch, videos)):
            path = out / f"{start + i:04d}.mp4"
            write_mp4(path, to_uint8(video), fps=args.fps)
            records.append({"path": path.name, "prompt": prompt, "seed": seeds[i]})
            print(f"{path}: {prompt}")
    (out / "samples.json").write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
