"""VAE trainer: DeepSpeed ZeRO-2 engines for the VAE and the 3D discriminator, exact resume, diffusers export.

One optimizer step = generator update (reconstruction + LPIPS + KL + adaptive hinge-GAN after `disc_start`),
then, after `disc_start`, one discriminator update on real clips vs the same step's reconstructions.

Exact resume: DeepSpeed checkpoints hold both models and both optimizers; trainer_state.json holds the step, the
data position and the torch RNG state. Every step also reseeds torch from (seed, step), so posterior samples and
LPIPS frame picks do not depend on how the run was split into sessions.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogvx_ds.models.vae import CogVideoXVAE, CogVideoXVAEConfig
from cogvx_ds.models.vae.discriminator import PatchDiscriminator3D
from cogvx_ds.models.vae.losses import GeneratorLossWeights, generator_step_terms, hinge_d_loss, kl_per_video_element
from cogvx_ds.models.vae.lpips import LPIPS
from cogvx_ds.train.vae_data import MovingShapesStream, VideoFileStream
from cogvx_ds.utils import atomic_write_text, fsync_tree, local_gpu, single_process_env

log = logging.getLogger("cogvx_ds.train_vae")
REPO = Path(__file__).resolve().parents[2]

TINY_VAE = dict(block_out_channels=[16, 32, 32, 32], latent_channels=8, layers_per_block=1, norm_num_groups=8,
                sample_height=32, sample_width=32, scaling_factor=1.0)


@dataclass
class VAETrainConfig:
    run_dir: str = "runs/vae"
    init_from: str | None = None  # diffusers-format VAE dir to fine-tune; None = random init of `model`
    model: dict = field(default_factory=lambda: dict(TINY_VAE))  # CogVideoXVAEConfig fields
    # data: your videos (`data`) or synthetic moving shapes; frames 8j+1, height/width multiples of the VAE's
    # spatial ratio
    data: str | None = None  # videos to train on (folder, .jsonl/.csv manifest, videos.txt); None = moving shapes
    data_cache_mb: float = 1024.0  # decoded videos of `data` kept in memory per process (LRU); 0 = decode each draw
    frames: int = 9
    height: int = 32
    width: int = 32
    batch_size: int = 2
    seed: int = 0
    # optimisation
    steps: int = 100
    lr: float = 1e-3
    disc_lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.9)
    ds_config: str | None = None  # a DeepSpeed JSON file; None: DEFAULT_DS_CONFIG (ZeRO-2; also ds_configs/vae_zero2_cpu.json)
    # losses
    recon: str = "l1"  # l1 | l2
    chroma_weight: float = 1.0  # weight of the colour part of the reconstruction error (losses.reconstruction_loss)
    lpips_path: str | None = None  # dir with lpips vgg.pth + torchvision vgg16*.pth, or a full LPIPS state dict
    lpips_weight: float = 1.0
    lpips_frames: int | None = 2  # LPIPS on this many random frames per clip (None: all)
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50
    disc_channels: int = 32
    disc_layers: int = 3
    sample_posterior: bool = True
    # logging / checkpoints
    log_every: int = 1
    video_every: int = 50
    ckpt_every: int = 50
    export: bool = True

    def validate(self) -> None:
        if self.frames % 8 != 1:
            # 4k+1 frames encode to k+1 latents, but the decoder (like the reference) only gives 4k+1 frames back
            # for an odd latent count; an even one decodes to 4(k+1) frames. So train on 8j+1 frames.
            raise ValueError(f"frames must be 8j+1 (9, 17, 25, 33, ...) so reconstructions match the input, got {self.frames}")
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"data: {self.data} does not exist (a folder, .jsonl/.csv manifest or videos.txt)")
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got {self.recon!r}")
        for name in ("steps", "batch_size", "log_every", "video_every", "ckpt_every", "chroma_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.data_cache_mb < 0:
            raise ValueError(f"data_cache_mb must be >= 0 (0 = no cache), got {self.data_cache_mb}")
        load_ds_config(self)  # a missing or malformed file fails here, before any process group starts

    def loss_weights(self) -> GeneratorLossWeights:
        return GeneratorLossWeights(self.recon, self.lpips_weight, self.lpips_frames, self.kl_weight,
                                    self.disc_weight, self.disc_start, chroma_weight=self.chroma_weight)

    def hashed(self) -> dict:
        """What defines the training trajectory (not logging/steps): what `hash` covers."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("run_dir", "steps", "log_every", "video_every", "ckpt_every", "export", "data_cache_mb")}
        if keep["ds_config"] is None:  # the built-in config, hashed under the name its file had before
            keep["ds_config"] = "ds_configs/vae_zero2_cpu.json"
        return keep

    def hash(self) -> str:
        """Hash of `hashed`, to refuse resuming another run."""
        return hashlib.sha256(json.dumps(self.hashed(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ distributed
def init_distributed() -> None:
    """Single process without a launcher: fill in the env a launcher would set, then gloo (CPU) or NCCL."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from cogvx_ds.parallel.state import _env_from_slurm, skip_deepspeed_cpu_shm_kernel

    single_process_env()
    _env_from_slurm()  # several srun tasks without torchrun
    if torch.cuda.is_available():
        torch.cuda.set_device(local_gpu())  # before NCCL: one GPU per process
    else:
        skip_deepspeed_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


# The default DeepSpeed config, built in so that an installed package (no source tree) has it; the same as
# ds_configs/vae_zero2_cpu.json. ZeRO-2: the VAE and discriminator are small, every rank holds them whole.
DEFAULT_DS_CONFIG = {
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def load_ds_config(cfg: VAETrainConfig) -> dict:
    """The DeepSpeed config: `cfg.ds_config` (a path as given, or relative to the source tree) or the built-in
    DEFAULT_DS_CONFIG; the micro-batch is `batch_size`."""
    if cfg.ds_config is None:
        ds = json.loads(json.dumps(DEFAULT_DS_CONFIG))
    else:
        from cogvx_ds.train.ds_config import read_json_object

        path = Path(cfg.ds_config)
        path = path if path.is_absolute() or path.exists() else REPO / path
        try:
            ds = read_json_object(path, "ds_config")
        except FileNotFoundError:
            raise ValueError(f"ds_config: {cfg.ds_config} does not exist (a DeepSpeed JSON file; leave it unset for "
                             f"the built-in ZeRO-2 config)") from None
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    return ds


def adopt_old_tensorboard(run_dir: Path) -> None:
    """A run begun before the rename logged TensorBoard events to tb/: move them to tensorboard/, so that a resumed
    run keeps one folder (the resume's purge reaches them, and TensorBoard shows one run)."""
    old = run_dir / "tb"
    if old.is_dir() and not (run_dir / "tensorboard").exists():
        old.rename(run_dir / "tensorboard")


# ------------------------------------------------------------------------------------------------ trainer
class VAETrainer:
    def __init__(self, cfg: VAETrainConfig):
        import deepspeed
        import torch.distributed as dist

        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every restart

        vae = CogVideoXVAE.from_diffusers(cfg.init_from) if cfg.init_from else CogVideoXVAE(
            CogVideoXVAEConfig.from_dict(cfg.model, source="config field `model`"))
        vae.set_chunking(None, None)  # short training clips: one chunk, whole-clip GroupNorm statistics
        disc = PatchDiscriminator3D(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers)
        ds = load_ds_config(cfg)
        self.vae, _, _, _ = deepspeed.initialize(
            model=vae, optimizer=torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=cfg.betas), config=ds)
        self.disc, _, _, _ = deepspeed.initialize(
            model=disc, optimizer=torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=cfg.betas), config=ds)
        self.device = self.vae.device  # the engine's: this rank's GPU, or the CPU
        self.lpips = self._load_lpips()
        if self.lpips is not None:
            self.lpips.to(self.device)
        self.stream = self._stream(cfg.seed, rank=self.rank, world=self.world)
        self.step = 0
        self.writer = None

    def _stream(self, seed: int, rank: int = 0, world: int = 1) -> MovingShapesStream | VideoFileStream:
        c = self.cfg
        if c.data is None:
            return MovingShapesStream(c.batch_size, c.frames, c.height, c.width, seed, rank=rank, world=world)
        return VideoFileStream(c.data, c.batch_size, c.frames, c.height, c.width, seed, rank=rank, world=world,
                               cache_mb=c.data_cache_mb)

    def _load_lpips(self) -> LPIPS | None:
        if not self.cfg.lpips_path or not self.cfg.lpips_weight:
            if self.cfg.lpips_weight:
                log.warning("lpips_path not set: training without the LPIPS perceptual loss")
            return None
        return LPIPS.from_path(self.cfg.lpips_path)

    # -------------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg = self.cfg
        # per rank too: each rank's own posterior noise and LPIPS frames (same seed, same draws on every rank)
        torch.manual_seed((cfg.seed * 1_000_003 + self.step) * 1_009 + self.rank)
        x = self.stream.next_batch().to(self.device)  # clips are made on the host
        recon, posterior = self.vae(x, sample_posterior=cfg.sample_posterior)
        kl = kl_per_video_element(posterior.kl(), x)
        disc = self.disc.module
        disc.requires_grad_(False)  # the generator loss must not leave gradients in the other optimizer
        surrogate, metrics = generator_step_terms(x, recon, kl, disc, self.lpips, cfg.loss_weights(), self.step)
        disc.requires_grad_(True)
        self.vae.backward(surrogate)
        self.vae.step()
        metrics["d_loss"] = 0.0
        if self.step >= cfg.disc_start and cfg.disc_weight > 0:
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            self.disc.backward(d_loss)
            self.disc.step()
            metrics["d_loss"] = d_loss.item()
        metrics["skipped_files"] = len(getattr(self.stream, "skipped", ()))
        self.step += 1
        self._last_batch = (x, recon.detach())
        return metrics

    def train(self) -> None:
        cfg = self.cfg
        self.resume()
        metrics_file = self.run_dir / "metrics.jsonl"
        self._truncate_metrics(metrics_file)
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            adopt_old_tensorboard(self.run_dir)
            (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
            # named as the DiT trainer's; a resume drops the events logged after its checkpoint (a killed run
            # logged past it), as metrics.jsonl is truncated, so TensorBoard shows one curve
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc="train_vae", disable=self.rank != 0, dynamic_ncols=True,
                   mininterval=2.0)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            m = self.train_step()
            m.update(step=self.step, samples_per_s=cfg.batch_size * self.world / (time.perf_counter() - t0))
            bar.update(1)
            bar.set_postfix(rec=f"{m['rec_loss']:.4f}", d=f"{m['d_loss']:.3f}", refresh=False)
            if self.rank == 0 and self.step % cfg.log_every == 0:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                for k, v in m.items():
                    if k != "step":
                        self.writer.add_scalar(f"vae/{k}", v, self.step)
            if self.rank == 0 and (self.step % cfg.video_every == 0 or self.step == cfg.steps):
                self._log_video()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if self.writer:
            self.writer.close()
        if cfg.export and self.rank == 0:
            self.export(self.run_dir / "export")

    # -------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        import torch.distributed as dist

        tag = f"step_{self.step:07d}"
        self.vae.save_checkpoint(str(self.ckpt_dir / tag), tag="vae", save_latest=False)
        self.disc.save_checkpoint(str(self.ckpt_dir / tag), tag="disc", save_latest=False)
        state = dict(step=self.step, data_position=self.stream.position, config_hash=self.cfg.hash(),
                     torch_rng=_encode_tensor(torch.get_rng_state()), world_size=self.world)
        fsync_tree(self.ckpt_dir / tag)  # what this rank wrote is on the disk before `latest` names it
        dist.barrier()  # and no rank still walks the folder while rank 0 adds to it
        if self.rank == 0:
            atomic_write_text(self.ckpt_dir / tag / "trainer_state.json", json.dumps(state, indent=2))
        dist.barrier()
        if self.rank == 0:  # `latest` only once every rank has finished writing
            atomic_write_text(self.ckpt_dir / "latest", tag)

    def _config_changes(self) -> str:
        """What differs from the run dir's config.json (the last start's config), for the resume error: the same
        YAML can give another config after an upgrade (a model: section once replaced the default model)."""
        try:
            before = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, ValueError):
            return ""
        now = json.loads(json.dumps(self.cfg.hashed(), default=str))  # only what the hash covers
        if before.get("ds_config") is None:
            before["ds_config"] = "ds_configs/vae_zero2_cpu.json"
        changed = [f"model.{k}: {before.get('model', {}).get(k)!r} -> {v!r}" for k, v in now["model"].items()
                   if isinstance(before.get("model"), dict) and before["model"].get(k) != v]
        changed += [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if k != "model" and before.get(k) != v]
        return f"; changed since the last start: {', '.join(changed)}" if changed else ""

    def resume(self) -> bool:
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            return False
        tag = latest.read_text().strip()
        state = json.loads((self.ckpt_dir / tag / "trainer_state.json").read_text())
        if state["config_hash"] != self.cfg.hash():
            raise ValueError(f"{self.ckpt_dir / tag}/trainer_state.json: written by a run with another config "
                             f"(hash {state['config_hash']} != {self.cfg.hash()}{self._config_changes()}); use a new "
                             f"run_dir")
        if state["world_size"] != self.world:
            raise ValueError(f"{self.ckpt_dir / tag}: saved with world size {state['world_size']}, now {self.world}")
        for engine, sub in ((self.vae, "vae"), (self.disc, "disc")):
            path, _ = engine.load_checkpoint(str(self.ckpt_dir / tag), tag=sub)
            if path is None:
                raise FileNotFoundError(f"{self.ckpt_dir / tag / sub}: DeepSpeed checkpoint missing or unreadable")
        self.step, self.stream.position = state["step"], state["data_position"]
        torch.set_rng_state(_decode_tensor(state["torch_rng"]))
        log.info("resumed from %s at step %d", tag, self.step)
        return True

    def _truncate_metrics(self, path: Path) -> None:
        """Drop lines logged after the checkpoint we resumed from (a killed run may have logged past it)."""
        if self.rank != 0 or not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))

    # -------------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def export(self, path: Path, batches: int = 4) -> None:
        """Write a diffusers-format VAE; scaling_factor = 1 / std of posterior means on a few training clips."""
        vae: CogVideoXVAE = self.vae.module
        stream = self._stream(self.cfg.seed + 1)
        means = torch.cat([vae.encode(stream.next_batch().to(self.device))[0].flatten() for _ in range(batches)])
        vae.config.scaling_factor = float(1.0 / means.std().clamp_min(1e-6))
        vae.save_diffusers(path)
        log.info("exported diffusers VAE to %s (scaling_factor %.4f)", path, vae.config.scaling_factor)

    def _log_video(self) -> None:
        x, recon = self._last_batch
        frames = torch.cat([x[0], recon[0].clamp(-1, 1)], dim=2)  # input above reconstruction: [3, T, 2H, W]
        frames = ((frames.float() + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
        self.writer.file_writer.add_summary(_gif_summary("vae/input_vs_recon", frames), self.step)


def _gif_summary(tag: str, frames):
    """TensorBoard image summary holding an animated GIF (what add_video writes, without needing moviepy)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=125, loop=0)
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _encode_tensor(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
