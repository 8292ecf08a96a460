"""The DiT trainer: DeepSpeed ZeRO (3 by default) + Megatron TP + Ulysses SP, in one readable loop.

Per optimizer step every rank: takes its micro-batches of the step's global batch, draws each sample's timestep,
noise and posterior draw from a generator keyed by (seed, step, global sample index) -- so TP/SP peers of a
sample agree and the run is independent of the parallel layout -- computes the v-MSE on its own video tokens,
backpropagates through DeepSpeed, and steps. Checkpoints (DeepSpeed state + trainer_state.json) are written every
`train.save_every` steps and on SIGTERM/SIGUSR1, after which the process exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from cogvx_ds.config import Config, save_config
from cogvx_ds.data.loader import GlobalPlan, RankLoader, load_sample
from cogvx_ds.data.shards import resolve_shards
from cogvx_ds.diffusion import NoiseSchedule, bucket_loss_sums, bucket_losses
from cogvx_ds.diffusion.timesteps import explicit_uniform_interval, sampling_generator
from cogvx_ds.parallel import MegatronMPU, init_distributed, state
from cogvx_ds.train.ds_config import build_ds_config
from cogvx_ds.utils import atomic_write_text, fsync_tree, local_gpu

warnings.filterwarnings("ignore", message=r".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor).*")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint written, requeue me"
STOP_FILE, REQUEUE_FILE = "STOP", "REQUEUE"  # run-dir markers shared with launch/_train_common.sh
LOSS_BUCKETS = 10
# data-plan fingerprint keys added after checkpoints were written without them: such a checkpoint is not checked on
# them (it resumes as before); "mix" is not here (the old mix planned other batches, see _check_data_plan)
LATER_PLAN_KEYS = ("shards_order_sha256",)


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward (fault injection for tests)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def config_hash(cfg: Config) -> str:
    """Hash of what defines the model and its data; a resumed run must match it."""
    d = {"model": dataclasses.asdict(cfg.model), "diffusion": dataclasses.asdict(cfg.diffusion)}
    for speed_only in ("activation_checkpointing", "recompute_gelu", "cpu_half_compute", "cpu_linear",
                       "cpu_attention", "compile_blocks"):  # same maths either way
        d["model"].pop(speed_only)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file under a checkpoint folder (relative path -> bytes), as written; checked before a resume."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def _zero_kind(stage) -> str:
    """ZeRO stages whose DeepSpeed checkpoints load into each other: 0 | 1, 2 (partitioned optimizer) | 3."""
    return {0: "0", 3: "3"}.get(stage, "1-2")


def build_engine(cfg: Config, ds_config: dict, resuming: bool = False, init: tuple[str, Path] | None = None):
    """The DeepSpeed engine around the transformer (weights from train.init_from or a seeded init; see
    `init_weights` for `resuming` and `init`)."""
    import deepspeed

    from cogvx_ds.models import CogVideoXTransformer

    mpu = MegatronMPU()
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    # Under ZeRO-3 the model must be built inside zero.Init with the DP x SP group (built outside and
    # partitioned later, SP silently produced wrong gradients).
    with deepspeed.zero.Init(data_parallel_group=state.dp_sp_group(), mpu=mpu, config_dict_or_path=ds_config,
                             enabled=zero3):
        model = CogVideoXTransformer(cfg.model)
    init_weights(model, cfg, resuming, init)
    if zero3:
        # Gather each expert block's parameters as one unit: ZeRO-3 then hooks the blocks, not every linear and
        # norm inside them (one all-gather per block, and far less Python per step: the demo's HQ stage, SP=2,
        # trains 1.19x faster with the same losses). A block's parameters are 132M for 5B; how many blocks stay
        # gathered at once (8 at the shipped max live parameters / reuse distance): perf_model.zero3_gathered_numel.
        from deepspeed.utils import set_z3_leaf_modules

        from cogvx_ds.models.dit.layers import ExpertBlock

        set_z3_leaf_modules(model, [ExpertBlock])
    t = cfg.train
    # weight decay on matrices only (ZeRO-3 params are empty placeholders: use their full shape)
    decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu, dist_init_required=False)
    return engine, model


def init_source(src: str) -> tuple[str, Path]:
    """What train.init_from names: ("sat", a SAT .pt file or folder) or ("diffusers", the transformer folder of a
    diffusers model, a pipeline, or a finished run dir's final_model/). Errors name the field; called before any
    process group starts."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    if (path / "final_model" / "config.json").is_file():
        return "diffusers", path / "final_model"  # a previous stage's run dir
    run_dir, tag = path, "latest"
    if path.name == "checkpoints":
        run_dir = path.parent
    elif (path / "trainer_state.json").is_file() and path.parent.name == "checkpoints":  # one checkpoint
        run_dir, tag = path.parent.parent, path.name
    if path.is_dir() and ((run_dir / "checkpoints").is_dir() or any(path.glob("*/trainer_state.json"))
                          or (path / "trainer_state.json").is_file()):
        raise ValueError(f"train.init_from: {path} is a training run (DeepSpeed checkpoints) without final_model/: "
                         f"that run did not finish. Export one of its checkpoints (python -m cogvx_ds.export "
                         f"--run-dir {run_dir} --checkpoint {tag} --out <dir> ..., launched like that training) and "
                         f"set train.init_from=<dir>/transformer, or let the run finish")
    if path.suffix == ".pt" or (path.is_dir() and any(path.rglob("mp_rank_00_model_states.pt"))):
        return "sat", path
    from cogvx_ds.checkpoint.diffusers_io import _model_folder

    try:
        return "diffusers", _model_folder(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"train.init_from: {e}") from None


def init_weights(model, cfg: Config, resuming: bool = False, init: tuple[str, Path] | None = None) -> None:
    """Weights from train.init_from, or a seeded init; a resumed run takes the seeded init (its checkpoint then
    overwrites every weight: the previous stage need not be there any more). `init`: train.init_from as
    `init_source` resolved and checked it already (the trainer does before any process group starts)."""
    src = cfg.train.init_from
    if not src or resuming:
        model.init_weights(cfg.model.seed)
        return
    from cogvx_ds.checkpoint.diffusers_io import LazySafetensors
    from cogvx_ds.checkpoint.layout import load_full_state_dict
    from cogvx_ds.checkpoint.sat import check_sat_positions, read_sat_file, sat_to_diffusers

    kind, path = init or init_source(src)
    if kind == "sat":
        raw = read_sat_file(path, cfg.train.allow_unsafe_pickle)
        check_sat_positions(raw, cfg.model, f"train.init_from {path}")
        source = sat_to_diffusers(raw)
        name = f"SAT checkpoint {path}"
    else:
        if init is None:
            _check_same_maths(path, cfg.model)
        source, name = LazySafetensors(path), str(path)
    load_full_state_dict(model, source, source_name=name)


# Fields that change what the weights compute without changing any tensor shape (a shape mismatch is caught by the
# loader): weights trained under other values would load without a word and give other outputs.
_MATHS_FIELDS = ("use_rotary_positional_embeddings", "spatial_interpolation_scale", "temporal_interpolation_scale",
                 "norm_eps", "flip_sin_to_cos", "freq_shift", "rope_theta", "temporal_compression_ratio")


def _check_same_maths(folder: Path, model_cfg) -> None:
    from cogvx_ds.checkpoint.diffusers_io import config_from_diffusers

    path = folder / "config.json"
    theirs = config_from_diffusers(json.loads(path.read_text()), str(path))
    differ = [f for f in _MATHS_FIELDS if getattr(theirs, f) != getattr(model_cfg, f)]
    if differ:
        pairs = ", ".join(f"{f}: {getattr(theirs, f)!r} there, {getattr(model_cfg, f)!r} here" for f in differ)
        raise ValueError(f"train.init_from {folder}: its config.json differs from this run's model config in what the "
                         f"weights compute ({pairs}); use the matching model config (model/2b for CogVideoX-2b, "
                         f"model/5b for -5b) or set these model.* fields")


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        import psutil

        # Markers older than this belong to an earlier job: launch/_train_common.sh exports when its job began (it
        # removes earlier markers itself, and its preemption trap may write STOP while this process starts up);
        # without it, this process's own start.
        try:
            self.started = float(os.environ["COGVX_JOB_START"])
        except (KeyError, ValueError):
            self.started = psutil.Process().create_time()
        # SIGUSR1 during start-up (minutes at scale) stops the run at its first step. SIGTERM keeps its default
        # until the loop starts: a process blocked in a rendezvous or collective could not act on a flag.
        self.stop_signal = None
        self._install_signal_handlers((signal.SIGUSR1,))
        # Input errors fail here, before any process group starts.
        self.shards = resolve_shards(cfg.data.shards)
        self.ds_config = build_ds_config(cfg)
        self.init = None  # train.init_from, resolved (a resume takes every weight from its checkpoint)
        if cfg.train.init_from and not (self.ckpt_dir / "latest").is_file():
            self.init = init_source(cfg.train.init_from)
            if self.init[0] == "diffusers":
                _check_same_maths(self.init[1], cfg.model)
        init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel, cfg.parallel.backend,
                         cfg.parallel.timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        zero = self.ds_config["zero_optimization"]
        if self.is_main and zero["stage"] == 3 and state.dp_sp_size() == 1 and "offload_param" not in zero:
            print("note: ZeRO-3 over a single data x sequence parallel rank partitions nothing and only adds its "
                  "hooks (1.5x slower steps for the demo's small model on a CPU); train.zero_stage=2 "
                  "trains the same", file=sys.stderr, flush=True)
        self.device = torch.device("cuda", local_gpu()) if torch.cuda.is_available() else torch.device("cpu")
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        self.resume_from = self._check_resumable()  # before the engine is built: a mismatch fails in seconds
        # the data plan too: shards that cannot train this model fail before minutes of engine building
        self.global_batch = state.dp_size() * cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
        self.plan = GlobalPlan(self.shards, self.global_batch, cfg.data.seed, cfg.data.image_ratio)
        self._agree_on_shards()
        self._check_data_plan()
        self._check_data_fits_model()
        if self.is_main and self.plan.mix_note():
            print(f"note: {self.plan.mix_note()}", file=sys.stderr, flush=True)
        self.engine, self.model = build_engine(cfg, self.ds_config, resuming=self.resume_from is not None,
                                               init=self.init)
        from cogvx_ds.train.ema import EMA

        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        # fp16 with a dynamic loss scale: DeepSpeed skips a step whose scaled gradients overflow and halves the
        # scale (the first steps of a run do this several times in a row), and stops the run itself once the
        # scale is at min_loss_scale; such skips are not counted towards train.max_consecutive_nonfinite
        self.dynamic_loss_scale = bool(self.engine.fp16_enabled() and self.engine.dynamic_loss_scale())
        self.empty_text = None

    # ---------------------------------------------------------------------------------------------- one step
    def _draws(self, step: int, first_index: int, latent_shape: tuple, b: int):
        """Per-sample (t, noise, posterior eps, caption drop), keyed by (seed, step, global sample index)."""
        T, g_batch = self.schedule.num_train_timesteps, self.global_batch
        ts, noise, eps, drop = [], [], [], []
        for k in range(b):
            j = first_index + k
            gen = sampling_generator(self.cfg.train.seed, step, j)
            # Explicit uniform sampling, stratified per sample of the global batch: DP rank i owns a contiguous
            # block of it, so its t stay in [i*T/N, (i+1)*T/N) and the global batch covers [0, T) evenly.
            lo, hi = explicit_uniform_interval(j, g_batch, T) if self.cfg.diffusion.explicit_uniform_sampling else (0, T)
            ts.append(torch.randint(lo, hi, (1,), generator=gen))
            noise.append(torch.randn(latent_shape, generator=gen))
            eps.append(torch.randn(latent_shape, generator=gen))
            drop.append(torch.rand(1, generator=gen) < self.cfg.diffusion.caption_dropout)
        return torch.cat(ts), torch.stack(noise), torch.stack(eps), torch.cat(drop)

    def _text(self, batch, drop):
        text = batch.get("text")
        if text is None:
            raise ValueError("the shards carry no text embeddings (<key>.text.safetensors); re-encode them with "
                             "data_tools.encode_latents --text-encoder PATH")
        if drop.any():
            if self.empty_text is None:
                self.empty_text = self._load_empty_text(text.shape[1:])
            text = torch.where(drop[:, None, None], self.empty_text.to(text.dtype), text)
        return text

    def _load_empty_text(self, shape):
        from safetensors.torch import load_file

        for folder in sorted({s.parent for s in self.shards}):  # the same file on every rank and every run
            f = folder / "empty_text.safetensors"
            if f.is_file():
                return load_file(str(f))["embedding"].reshape(shape)
        raise FileNotFoundError("diffusion.caption_dropout > 0 needs the empty-caption embedding "
                                "(empty_text.safetensors next to the shards, written by data_tools.encode_latents)")

    def _sp_loss_factor(self) -> float:
        # Each SP rank's loss is its share of the sample loss (local sum / global count). ZeRO-3 averages
        # gradients over all DP x SP ranks, so the share is scaled by SP; ZeRO-1/2 divide by DP only.
        return float(state.sp_size()) if self.ds_config["zero_optimization"]["stage"] == 3 else 1.0

    def _fault_injection(self, step: int, micro: int, tensor, kind: str):
        """Test hooks, rank 0's first micro-batch of 1-based steps: COGVX_FAULT_NAN_STEPS="3,4" makes the loss
        NaN; COGVX_FAULT_NAN_GRAD_STEPS="3" keeps the loss finite and makes the gradient through the output NaN."""
        steps = os.environ.get("COGVX_FAULT_NAN_GRAD_STEPS" if kind == "grad" else "COGVX_FAULT_NAN_STEPS")
        if not (steps and self.rank == 0 and micro == 0 and step + 1 in {int(s) for s in steps.split(",")}):
            return tensor
        return _NaNGradient.apply(tensor) if kind == "grad" else tensor * float("nan")

    def micro_step(self, batch, step: int, micro: int = 0):
        cfg = self.cfg
        mean, logvar = batch["mean"].float(), batch["logvar"].float()  # [b, C, F, H, W]
        b = mean.shape[0]
        t, noise, eps, drop = self._draws(step, batch["first_index"], tuple(mean.shape[1:]), b)
        z = (mean + torch.exp(0.5 * logvar) * eps) * cfg.data.latent_scale
        z, noise = z.permute(0, 2, 1, 3, 4), noise.permute(0, 2, 1, 3, 4)  # [b, F, C, H, W]
        x_t = self.schedule.add_noise(z, noise, t).to(self.device)
        target = self.schedule.v_target(z, noise, t)
        text = self._text(batch, drop).to(self.device)
        out = self.engine(x_t, text, t.float().to(self.device), gather_output=False)
        out = self._fault_injection(step, micro, out, "grad")
        target = self.model.patchify(target)  # [b, all video tokens, C*p*p]
        start, end = self.model.local_token_range(target.shape[1])
        sq = (out.float() - target[:, start:end].to(self.device).float()).square()
        share = sq.sum(dim=(1, 2)) / target[0].numel()  # [b]: this rank's part; sums over SP to the sample mean
        loss = self._fault_injection(step, micro, share.mean() * self._sp_loss_factor(), "loss")
        return loss, share.detach(), t

    # ---------------------------------------------------------------------------------------------- loop
    def _model_flops(self, n_video: int) -> float:
        """Model FLOPs (matmuls, forward + backward; activation recomputation not counted, as MFU has it) of one
        sample with n_video video tokens (cogvx_ds.perf_model)."""
        from cogvx_ds.perf_model import flops_per_sample

        m = self.cfg.model
        return float(flops_per_sample(m, m.max_text_seq_length, n_video)["total"])

    def _throughput(self, flops_per_gpu_s: float) -> dict:
        """tflops_per_gpu, and mfu against train.peak_tflops when given."""
        out = {"tflops_per_gpu": flops_per_gpu_s / 1e12}
        if self.cfg.train.peak_tflops:
            out["mfu"] = out["tflops_per_gpu"] / self.cfg.train.peak_tflops
        return out

    def _report_profile(self, folder: Path | None) -> None:
        if folder is not None:
            from tqdm import tqdm

            tqdm.write(f"rank {self.rank}: profile of {folder.name.replace('_', ' ')} written to {folder} "
                       "(open the .pt.trace.json in https://ui.perfetto.dev)")

    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        start_step, position = self._resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            for marker in (STOP_FILE, REQUEUE_FILE):  # left by the previous (preempted) job of this run
                _remove_if_older(self.run_dir / marker, self.started)  # not one written during this start-up
        dist.barrier()
        from cogvx_ds.train.metrics import MetricsLogger

        logger = MetricsLogger(self.run_dir, enabled=self.is_main, resume_step=start_step)
        loader = RankLoader(self.plan, state.dp_rank(), state.dp_size(), t.micro_batch_size,
                            t.gradient_accumulation_steps, start_position=position, prefetch=cfg.data.prefetch)
        self._install_signal_handlers((signal.SIGTERM, signal.SIGUSR1))
        tp = state.tp_size()
        step = start_step
        from tqdm import tqdm

        from cogvx_ds.train.profiling import StepProfiler

        profiler = StepProfiler(t.profile_steps, t.profile_ranks, self.rank, self.run_dir, self.device)

        bar = tqdm(total=t.max_steps, initial=start_step, desc=f"train {t.stage}", disable=not self.is_main,
                   dynamic_ncols=True, mininterval=2.0)
        try:
            while step < t.max_steps:
                t0 = time.time()
                losses = torch.zeros(self.global_batch)
                timesteps = torch.zeros(self.global_batch)
                tokens, flops = 0, 0.0
                batch, bad_loss = None, None
                profiler.begin(step + 1)
                data_wait = 0.0  # time this rank's step stood waiting for the loader (it should stay near 0)
                for micro in range(t.gradient_accumulation_steps):
                    w0 = time.time()
                    batch = loader.next()
                    data_wait += time.time() - w0
                    loss, share, ts = self.micro_step(batch, step, micro)
                    j = batch["first_index"]
                    losses[j:j + len(share)] = share.cpu()
                    timesteps[j:j + len(share)] = ts.float()
                    if not torch.isfinite(loss).item():
                        bad_loss = (loss, batch)
                    lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler advances in step())
                    # Backward even through a non-finite loss: its gradients are non-finite, and DeepSpeed's check
                    # at the accumulation boundary then drops the whole step on every rank (gradients cleared, no
                    # optimizer, momentum or LR-schedule update). A NaN/inf gradient under a finite loss is
                    # dropped the same way.
                    self.engine.backward(loss)
                    self.engine.step()
                    f, h, w = batch["mean"].shape[2:]
                    n_video = f * (h // self.cfg.model.patch_size) * (w // self.cfg.model.patch_size)
                    tokens += len(share) * n_video
                    flops += len(share) * self._model_flops(n_video)
                if self.engine.was_step_applied():
                    self.nonfinite_in_a_row = 0
                    if bad_loss is not None:
                        raise RuntimeError(f"step {step + 1}: DeepSpeed applied an optimizer step over a non-finite "
                                           "loss; its overflow check is off in this ds_config, weights are corrupt")
                    if self.ema is not None:
                        self.ema.update()
                else:
                    self._skipped(step, bad_loss, batch)
                # loss shares summed over SP (and replicated over TP) -> per-sample losses of the global batch
                losses, timesteps = state.all_reduce_host(losses), state.all_reduce_host(timesteps)
                losses, timesteps = losses / tp, timesteps / (tp * state.sp_size())
                step += 1
                dt = time.time() - t0
                self._report_profile(profiler.end(step))
                sums, counts = bucket_loss_sums(losses, timesteps.long(), self.schedule.num_train_timesteps,
                                                min(LOSS_BUCKETS, self.schedule.num_train_timesteps))
                logged = step % t.log_every == 0 or step == t.max_steps or profiler.profiling(step)
                logger.log(step, None if not logged else {
                    "loss": losses.mean().item(), "lr": lr,
                    "grad_norm": _to_float(self.engine.get_global_grad_norm()),
                    "samples_per_s": self.global_batch / dt, "tokens_per_s": tokens * state.dp_size() / dt,
                    **self._throughput(flops * state.dp_size() / self.world / dt),
                    "nonfinite_skipped": self.nonfinite_total, "bad_shards": len(self.plan.bad_shards),
                    **self._loss_scale(),
                    "data_position": loader.position, "data_wait_s": data_wait,
                    **({"profiled": 1} if profiler.profiling(step) else {}),
                    **bucket_losses(sums, counts, self.schedule.num_train_timesteps), **_memory(),
                }, sample_order={"keys": batch["global_keys"], "kind": "image" if batch["mean"].shape[2] == 1
                                 else "video"})
                bar.update(1)
                bar.set_postfix(loss=f"{losses.mean().item():.4f}", refresh=False)
                stop = self._agreed_stop()
                if step % t.save_every == 0 or stop or step == t.max_steps:
                    self.save(step, loader.position)
                if stop:
                    logger.close()
                    if self.is_main:
                        atomic_write_text(self.run_dir / REQUEUE_FILE, json.dumps({"step": step, "signal": self.stop_signal}))
                        print(f"received {self.stop_signal}: checkpoint at step {step} written; exiting with "
                              f"{REQUEUE_EXIT_CODE} for requeue", flush=True)
                    # no rank exits (a non-zero exit makes srun --kill-on-bad-exit / torchrun kill the others)
                    # before the marker that tells the job script to requeue exists
                    dist.barrier()
                    return REQUEUE_EXIT_CODE
            self.model.save_diffusers(self.run_dir / "final_model")
            if self.ema is not None:
                # keep this after the save above: under ZeRO-3 `swapped_in` replaces the partitions only, and the
                # small persistent parameters are re-partitioned (so that the EMA's reach the gather) by that save
                with self.ema.swapped_in():
                    self.model.save_diffusers(self.run_dir / "final_model_ema")
        finally:
            try:  # a run stopped inside the window keeps what was traced; never mask the error that stopped it
                self._report_profile(profiler.close(step))
            except Exception as e:
                print(f"rank {self.rank}: could not write the profile: {e}", file=sys.stderr, flush=True)
            bar.close()
            loader.close()
        logger.close()
        return 0

    def _loss_scale(self) -> dict:
        """fp16's current dynamic loss scale, for the metrics (ZeRO's optimizers expose it as `loss_scale`)."""
        scale = getattr(self.engine.optimizer, "loss_scale", None) if self.dynamic_loss_scale else None
        return {} if scale is None else {"loss_scale": float(scale)}

    def _skipped(self, step, bad_loss, batch) -> None:
        """DeepSpeed skipped this step (non-finite loss or gradient on some rank; every rank gets here). Count it;
        K in a row abort, naming what went wrong. Under fp16's dynamic loss scale a skip with finite losses on every
        rank is a loss-scale overflow, which the scaler handles (it lowers the scale, and DeepSpeed stops the run
        when the scale cannot go lower): counted in nonfinite_skipped, not in a row."""
        self.nonfinite_total += 1
        any_bad = state.all_reduce_host(torch.tensor([float(bad_loss is not None)]), op=dist.ReduceOp.MAX)
        if self.dynamic_loss_scale and not any_bad.item():
            return
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.train.max_consecutive_nonfinite:
            loss, batch = bad_loss if bad_loss is not None else (None, batch)
            what = (f"rank {self.rank} (local loss {loss.item()})" if loss is not None else
                    f"rank {self.rank} (finite loss; a non-finite loss on another rank)" if any_bad.item() else
                    f"rank {self.rank} (finite losses everywhere, non-finite gradient)")
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite steps in a row (train.max_consecutive_nonfinite); last at "
                f"step {step + 1}, {what}, bucket {batch['meta'][0].get('bucket')}, samples {batch['keys']}")

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save(self, step: int, position: int) -> None:
        tag = f"step{step:08d}"
        latest = self.ckpt_dir / "latest"
        if self.is_main and (self.ckpt_dir / tag).is_dir() and not (latest.is_file() and latest.read_text().strip() == tag):
            # a folder of this step from a run that went further before it was rolled back (pruning keeps those):
            # its files (an EMA, another layout's shards) would be recorded and loaded with the new ones
            shutil.rmtree(self.ckpt_dir / tag)
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False)
        if self.ema is not None:
            self.ema.save(self.ckpt_dir / tag / f"ema_rank{self.rank:05d}.safetensors")
        fsync_tree(self.ckpt_dir / tag)  # what this rank wrote is on the disk before `latest` names it
        dist.barrier()  # every rank has written its part
        if self.is_main:
            files = _file_sizes(self.ckpt_dir / tag)
            trainer_state = {"step": step, "data_position": position, "config_hash": config_hash(self.cfg),
                             **self._layout(), "data_plan": self.plan.fingerprint(), "files": files,
                             "rng": "stateless: draws are keyed by (train.seed, step, global sample index)",
                             **self._target_settings(),
                             "nonfinite_skipped": self.nonfinite_total}
            atomic_write_text(self.ckpt_dir / tag / "trainer_state.json", json.dumps(trainer_state, indent=2))
            atomic_write_text(self.ckpt_dir / "latest", tag)  # only after every rank finished
            for old in prunable_checkpoints(self.ckpt_dir, step, self.cfg.train.keep_last):
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
        dist.barrier()

    def _target_settings(self) -> dict:
        """What the training target depends on beyond the model/diffusion config hash: the draws' seed and the
        factor on the latents. A resume under other values would silently train another objective."""
        return {"train.seed": self.cfg.train.seed, "data.latent_scale": self.cfg.data.latent_scale}

    def _layout(self) -> dict:
        """What a DeepSpeed checkpoint's partitioning depends on: it only loads under the same values."""
        return {"world_size": self.world, "tp": state.tp_size(), "sp": state.sp_size(),
                "zero_stage": self.ds_config["zero_optimization"]["stage"]}

    def _check_resumable(self) -> tuple[str, dict] | None:
        """(tag, trainer state) to resume from (None: a fresh run), after checking that its checkpoint was written by the same
        model/diffusion config and under the same layout (world size, TP, SP, ZeRO stage 0, 1-2 or 3). A mismatch
        is an error naming both sides: DeepSpeed would otherwise fail deep inside its loader, or not at all."""
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        state_file = self.ckpt_dir / tag / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{latest} names checkpoint {tag!r}, but {state_file} is missing: the run dir "
                                    f"is damaged; point {latest} at an intact step* checkpoint or use a new "
                                    f"train.run_dir")
        try:
            st = json.loads(state_file.read_text())
            if not isinstance(st, dict) or "config_hash" not in st or "step" not in st:
                raise ValueError("not a trainer state (no step / config_hash)")
        except ValueError as e:  # JSONDecodeError included: cut by a crash before it reached the disk
            raise ValueError(f"{state_file} is damaged ({e}); point {latest} at an intact step* checkpoint or use a "
                             f"new train.run_dir") from None
        present = _file_sizes(self.ckpt_dir / tag)
        # missing, or shorter than written (a cut copy); never "larger": a file system's cached sizes at save time
        # can only have been too small
        damaged = sorted(n for n, size in st.get("files", {}).items() if present.get(n, -1) < size)
        if damaged:  # DeepSpeed would warn and go on without that rank's optimizer and fp32 master state
            raise FileNotFoundError(f"{self.ckpt_dir / tag}: {len(damaged)} file(s) missing or shorter than "
                                    f"written: {', '.join(damaged[:4])}; restore them, or point {latest} at an "
                                    f"intact step* checkpoint")
        changed = [f"{k} {st[k]} -> {v}" for k, v in self._target_settings().items() if k in st and (
            st[k] != v if isinstance(v, int) else not math.isclose(st[k], v, rel_tol=1e-9))]  # floats: last bits
        if changed:  # (recorded since they are: older checkpoints are not checked)
            raise ValueError(f"{self.ckpt_dir / tag}: {', '.join(changed)} since this checkpoint: a resume would "
                             f"draw other noise or train on another latent scale; set them back, or start a new "
                             f"train.run_dir with train.init_from")
        if st["config_hash"] != config_hash(self.cfg):
            raise ValueError(f"{self.ckpt_dir / tag}: model/diffusion config differs from the checkpoint's; "
                             f"use a new train.run_dir, or train.init_from to start from its weights")
        now = self._layout()
        saved = {k: st[k] for k in now if k in st}
        if "zero_stage" not in saved:  # written before it was recorded: tell it from DeepSpeed's file names
            files = [f.name for f in (self.ckpt_dir / tag).iterdir()]
            saved["zero_stage"] = (3 if any(f.startswith("zero_pp_rank_") and f.endswith("_model_states.pt") for f in files)
                                   else "1 or 2" if any(f.endswith("_optim_states.pt") for f in files) else 0)
        differ = [k for k in now if k in saved and (
            _zero_kind(saved[k]) != _zero_kind(now[k]) if k == "zero_stage" else saved[k] != now[k])]
        if differ:
            was = ", ".join(f"{k}={saved[k]}" for k in differ)
            new = ", ".join(f"{k}={now[k]}" for k in differ)
            raise ValueError(
                f"{self.ckpt_dir / tag} was written with {was}; this run has {new}. A DeepSpeed checkpoint resumes "
                f"only under the layout it was written with (ZeRO stages 1 and 2 are interchangeable). Resume "
                f"with that layout, or export its weights with it (python -m cogvx_ds.export --run-dir "
                f"{self.run_dir} --checkpoint {tag} ..., launched like the training) and start a new "
                f"train.run_dir with train.init_from=<export>/transformer")
        return tag, st

    def _agree_on_shards(self) -> None:
        """A shard one rank could not read (a transient I/O error) is skipped by every rank."""
        everyone = [None] * self.world
        dist.all_gather_object(everyone, self.plan.bad_paths)
        self.plan.drop_shards({p for paths in everyone for p in paths})
        # and every rank listed the same shards (a folder still being filled by encode_latents, or file system
        # caches that differ between nodes, would give ranks different plans: DP slices overlapping, TP/SP peers
        # on different samples)
        plans = [None] * self.world
        dist.all_gather_object(plans, self.plan.fingerprint())
        if any(p != plans[0] for p in plans):
            first = next(r for r, p in enumerate(plans) if p != plans[0])
            raise ValueError(f"data.shards: ranks see different data (rank 0: {plans[0]}; rank {first}: "
                             f"{plans[first]}); wait until the shards are complete (index.json written) and "
                             f"visible on every node")

    def _check_data_fits_model(self) -> None:
        """Text embeddings on every sample, and latent channels / text width that the model takes (they failed at
        the first step: a trainer error, or oneDNN's "could not create a primitive descriptor"); the first epoch is
        planned here too, so a global batch larger than every bucket fails now, not in the loader thread."""
        m = self.cfg.model
        missing = self.plan.samples_without_text()
        if len(missing):
            ref = self.plan.ref(int(missing[0]))
            raise ValueError(f"data.shards: {len(missing)} of {len(self.plan.samples)} samples carry no text "
                             f"embedding (e.g. {ref.shard}: {ref.key!r}); encode them with data_tools.encode_latents "
                             f"--text-encoder PATH (index.json's has_text_embeddings says so per folder)")
        ref = self.plan.ref(int(self.plan.samples[0]))
        sample = load_sample(ref)
        where = f"{ref.shard}: {ref.key!r}"
        if sample["mean"].shape[0] != m.in_channels:
            raise ValueError(f"data.shards: latents have {sample['mean'].shape[0]} channels ({where}) but "
                             f"model.in_channels = {m.in_channels}: encode with the VAE this model was made for")
        if sample["text"].shape[-1] != m.text_embed_dim:
            raise ValueError(f"data.shards: text embeddings are {sample['text'].shape[-1]}-wide ({where}) but "
                             f"model.text_embed_dim = {m.text_embed_dim}: encode with the model's text encoder")
        if sample["text"].shape[0] != m.max_text_seq_length:
            # sampling and the exported pipeline encode prompts to max_text_seq_length tokens: a model trained on
            # another length would see its text where it never saw it (RoPE) or fail (learned/sin-cos positions)
            raise ValueError(f"data.shards: text embeddings are {sample['text'].shape[0]} tokens long ({where}) but "
                             f"model.max_text_seq_length = {m.max_text_seq_length}: set it to the shards' length, or "
                             f"encode with data_tools.encode_latents --text-max-length {m.max_text_seq_length}")
        d = self.cfg.data
        size = tuple(n * d.vae_spatial_compression for n in sample["mean"].shape[-2:])
        if self.is_main and size != (d.height, d.width):
            print(f"note: the shards' first sample is {size[0]}x{size[1]} pixels ({where}), data.height x data.width "
                  f"= {d.height}x{d.width}; export writes data.height/width as the pipeline's sample size (its RoPE "
                  f"grid and default size): set them to the size you train at", file=sys.stderr, flush=True)
        self.plan.epoch(0)

    def _check_data_plan(self) -> None:
        """A resume continues at a data position of the checkpoint's plan: refuse one whose plan differs (shards
        added, removed or unreadable, another seed, image ratio or global batch), naming what changed."""
        if self.resume_from is None:
            return
        tag, st = self.resume_from
        saved, now = st.get("data_plan"), self.plan.fingerprint()
        if saved is None:
            return
        now = {k: v for k, v in now.items() if k in saved or k not in LATER_PLAN_KEYS}
        if saved == now:
            return
        changed = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
        if not self.cfg.train.resume_with_new_data and set(now) - set(saved) == {"mix"} and all(
                saved[k] == now[k] for k in saved):
            raise ValueError(f"{self.ckpt_dir / tag} was written before the image/video mix was fixed (data.image_ratio "
                             f"now holds to the end of each epoch instead of ending it with one kind): the same data "
                             f"gives another sequence of batches. Continue with train.resume_with_new_data=true")
        if not self.cfg.train.resume_with_new_data:
            raise ValueError(f"{self.ckpt_dir / tag}: the data plan changed since this checkpoint ({changed}), so its "
                             f"data position {st['data_position']} would point into another sequence of batches. "
                             f"Restore the data, or pass train.resume_with_new_data=true to continue on the new plan")
        if self.is_main:
            print(f"note: data plan changed ({changed}); continuing on the new plan (train.resume_with_new_data)",
                  file=sys.stderr, flush=True)

    def _resume(self) -> tuple[int, int]:
        if self.resume_from is None:
            return 0, 0
        tag, st = self.resume_from
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:  # DeepSpeed only warns, then trains on without this rank's optimizer / fp32 state
            raise RuntimeError(f"rank {self.rank}: DeepSpeed could not load {self.ckpt_dir / tag} (see its warning "
                               f"above: a file of the checkpoint is missing or unreadable); not resuming on partial "
                               f"state")
        if self.ema is not None:
            ema_file = self.ckpt_dir / tag / f"ema_rank{self.rank:05d}.safetensors"
            if ema_file.is_file():
                self.ema.load(ema_file)
            else:  # written without train.ema_decay (the save records and checks every file it wrote)
                self.ema.reset()
                if self.is_main:
                    print(f"note: {self.ckpt_dir / tag} has no EMA (train.ema_decay was off when it was written); "
                          f"the EMA starts from its weights", file=sys.stderr, flush=True)
        if self.is_main:
            print(f"resumed from {self.ckpt_dir / tag} (step {st['step']}, data position {st['data_position']})",
                  flush=True)
        self.nonfinite_total = st.get("nonfinite_skipped", 0)
        return st["step"], st["data_position"]

    # ---------------------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self, signals) -> None:
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in signals:
            signal.signal(sig, handler)

    def _agreed_stop(self) -> bool:
        if self.is_main and not self.stop_signal and (self.run_dir / STOP_FILE).exists():
            self.stop_signal = f"{STOP_FILE} file"  # written by launch/*.sbatch when slurm signals preemption
        flag = torch.tensor([1.0 if self.stop_signal else 0.0])
        flag = state.all_reduce_host(flag, op=dist.ReduceOp.MAX)  # all ranks stop at the same step
        if flag.item() and not self.stop_signal:
            self.stop_signal = "a peer's signal"
        return bool(flag.item())


def prunable_checkpoints(ckpt_dir: Path, step: int, keep_last: int) -> list[str]:
    """The step* checkpoints to delete after the one of `step` was written: all but the newest keep_last - 1 of
    those *before* it. The one just written is never among them, nor a later-numbered folder (left by a save that
    was killed, or by a run rolled back by pointing `latest` at an older checkpoint; overwritten when the run gets
    there): ordering by name kept that one and deleted the checkpoint just written."""
    older = []
    for p in ckpt_dir.glob("step*"):
        digits = p.name[len("step"):]
        if p.is_dir() and digits.isdigit() and int(digits) < step:
            older.append((int(digits), p.name))
    older.sort()
    return [name for _, name in older[:max(0, len(older) - (keep_last - 1))]]


def _remove_if_older(path: Path, than: float) -> None:
    """Delete `path` if it was last written before time `than` (a marker of an earlier job, not of this one)."""
    try:
        if path.stat().st_mtime < than:
            path.unlink()
    except FileNotFoundError:  # none, or removed meanwhile
        pass


def _to_float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _memory() -> dict:
    if torch.cuda.is_available():
        return {"memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    import psutil

    return {"memory_gb": psutil.Process().memory_info().rss / 2**30}
