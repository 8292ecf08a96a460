"""Configuration: dataclasses, YAML loading with includes, dotted `key=value` overrides, validation.

A run is described by one `Config`. YAML files may name other YAML files under `include:` (paths relative to
the including file, or names of packaged configs such as `model/tiny`); later files and then CLI overrides win.
`validate()` checks every cross-field rule and raises `ConfigError` naming the field; it needs no process group,
so launchers call it before torch.distributed starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field, the value and the rule."""


@dataclass
class ModelConfig:
    """The expert transformer; field names follow diffusers' CogVideoXTransformer3DModel config."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    hidden_size: int | None = None  # optional; when set it must equal heads x head_dim
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    attention_bias: bool = True
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    rope_theta: float = 10000.0
    activation_checkpointing: bool = False
    # Keep only fc1's output and rebuild the GELU output (fc2's input) from it in backward: 4 x width x tokens
    # fewer saved values per block (20% of a block's activations with flash attention), for one element-wise pass
    # more (about 1% of a CPU step, less on GPUs). Gradients are bit-identical. No effect under
    # activation_checkpointing (nothing is kept there) or torch.compile.
    recompute_gelu: bool = False
    # bf16/fp16 models on the CPU: "auto" runs the matmul-type ops (linear layers, attention, patch conv) in
    # float32 from the half-precision weights when oneDNN has no native kernels for that dtype on this CPU
    # (AVX2-only machines, where bf16 matmuls, attention and convs run 10-40x slower than fp32); "fp32" always, "native" never.
    # Never applies to GPU tensors. Parameters, gradients and the residual stream stay in the half dtype.
    cpu_half_compute: str = "auto"
    # float32 linear layers on x86 CPUs: "auto"/"onednn" run them on oneDNN (faster there than aten's MKL sgemm,
    # benchmarks/dit_step.py --linear-kernels), "aten" on F.linear. Same maths up to float32 rounding; no
    # effect on GPUs, half-precision matmuls or other CPUs.
    cpu_linear: str = "auto"
    # attention on CPUs: "auto" runs bfloat16 attention of up to 3,072 tokens and float32 attention of up to 1,536
    # tokens (from 512 on one thread; without autograd up to 128) on a tiled-math kernel (bfloat16 1.4-3.7x faster
    # than SDPA's CPU flash kernel there, float32 1.04-1.3x; it keeps the attention probabilities for backward, at
    # most 256 MiB per layer) and the rest on torch SDPA; "sdpa" always SDPA; "tiled" always the tiled kernel.
    # Same maths up to rounding; no effect on GPUs (cogvx_ds.models.dit.attention).
    cpu_attention: str = "auto"
    # torch.compile each transformer block (inductor; on CPUs it needs a C++ compiler). Numerically checked
    # against eager in tests; pays off only in steady state (the first steps compile, for minutes on small CPUs).
    compile_blocks: bool = False
    init_std: float = 0.02
    seed: int = 0

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    sequence_parallel: int = 1  # Ulysses degree
    backend: str = "auto"  # auto: nccl when CUDA is available, else gloo
    timeout_minutes: int = 30


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    snr_shift_scale: float = 3.0
    rescale_zero_terminal_snr: bool = True
    prediction_type: str = "v_prediction"
    explicit_uniform_sampling: bool = True
    caption_dropout: float = 0.1


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # paths / globs of latent shard .tar files or index.json
    height: int = 480  # pixel size the latents were encoded at
    width: int = 720
    num_frames: int = 49  # pixel frames, 4k+1
    vae_spatial_compression: int = 8
    image_ratio: float | None = None  # fraction of batches that are images; None: as they come in the shuffle
    latent_scale: float = 1.15258426  # VAE scaling factor applied to the latents (2B: 1.15258426, 5B: 0.7)
    prefetch: int = 4  # global batches a background thread reads ahead of the step
    seed: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    stage: str = "lq_pretrain"
    init_from: str | None = None
    resume_with_new_data: bool = False  # resume although the data plan changed (new/removed shards, seed, batch)
    allow_unsafe_pickle: bool = False  # an init_from SAT .pt that holds more than tensors (runs its code: trust it)
    max_steps: int = 1000
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 3
    ds_config: str | None = None
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 1  # metrics.jsonl and TensorBoard: every N-th step's values (sample_order.jsonl: every step)
    max_consecutive_nonfinite: int = 5
    ema_decay: float | None = None
    seed: int = 42
    # [first, last] 1-based optimizer steps to trace with torch.profiler (cogvx_ds/train/profiling.py); null: off
    profile_steps: list[int] | None = None
    profile_ranks: list[int] | None = field(default_factory=lambda: [0])  # ranks that write a trace; null: all
    # the accelerator's dense peak in the training dtype (e.g. 989 for H100/H200 bf16): metrics then log mfu
    peak_tflops: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with type checks that name the field


def _check_type(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported type {tp}")


# Keys that earlier versions accepted and never used: a saved config.yaml (a run dir's, for export or a resume)
# still loads, with a warning.
_RETIRED = {"data.": {"num_workers": "the loader reads with one prefetch thread per rank (data.prefetch)"}}


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) & set(_RETIRED.get(prefix, {}))):  # keys of configs written by earlier versions
        warnings.warn(f"config key '{prefix}{key}' is ignored: {_RETIRED[prefix][key]}", stacklevel=2)
        data = {k: v for k, v in data.items() if k != key}
    unknown = sorted(set(data) - names)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(names))}"
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_include(name: str, relative_to: Path) -> Path:
    candidates = [relative_to / name, PACKAGED_CONFIGS / name, PACKAGED_CONFIGS / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"include '{name}' (from {relative_to}) not found; looked at: {', '.join(map(str, candidates))}")


def load_yaml_dict(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config with its `include:` list resolved (includes first, this file's keys on top)."""
    path = Path(path)
    if not path.is_file():
        packaged = PACKAGED_CONFIGS / f"{path}.yaml" if path.suffix != ".yaml" else PACKAGED_CONFIGS / path
        if packaged.is_file():
            path = packaged
        else:
            raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"include cycle: {' -> '.join(map(str, _seen + (path.resolve(),)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, load_yaml_dict(_resolve_include(inc, path.parent), _seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.num_layers=4` -> (['model', 'num_layers'], 4); the value is parsed as YAML (so 1e-4, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{p}' is not a section")
        node[parts[-1]] = value
    return data


def from_dict(data: dict) -> Config:
    return _from_dict(Config, data, "")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml_dict(path) if path else {}
    return from_dict(apply_overrides(data, overrides or []))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# validation


def _require(cond: bool, field_name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name} = {value!r}: {rule}")


def validate_model(m: ModelConfig, tp: int = 1, sp: int = 1) -> None:
    for name in ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
                 "time_embed_dim", "text_embed_dim", "patch_size", "temporal_compression_ratio"):
        _require(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "must be positive")
    if m.hidden_size is not None:
        _require(m.hidden_size == m.inner_dim, "model.hidden_size", m.hidden_size,
                 f"must equal model.num_attention_heads x model.attention_head_dim "
                 f"= {m.num_attention_heads} x {m.attention_head_dim} = {m.inner_dim}")
    _require(m.num_attention_heads % (tp * sp) == 0, "model.num_attention_heads", m.num_attention_heads,
             f"must be divisible by parallel.tensor_parallel x parallel.sequence_parallel = {tp} x {sp} = {tp * sp}")
    if m.use_rotary_positional_embeddings:
        _require(m.attention_head_dim % 16 == 0, "model.attention_head_dim", m.attention_head_dim,
                 "must be divisible by 16 for 3D RoPE (t/h/w get 2/8, 3/8, 3/8 of the head, each an even size)")
    else:
        _require(m.inner_dim % 16 == 0, "model.num_attention_heads x model.attention_head_dim", m.inner_dim,
                 "must be divisible by 16 for the 3D sin-cos position embedding")
    _require(m.cpu_half_compute in ("auto", "fp32", "native"), "model.cpu_half_compute", m.cpu_half_compute,
             "must be auto, fp32 or native")
    _require(m.cpu_linear in ("auto", "onednn", "aten"), "model.cpu_linear", m.cpu_linear,
             "must be auto, onednn or aten")
    _require(m.cpu_attention in ("auto", "tiled", "sdpa"), "model.cpu_attention", m.cpu_attention,
             "must be auto, tiled or sdpa")
    _require(m.in_channels == m.out_channels, "model.out_channels", m.out_channels,
             f"must equal model.in_channels ({m.in_channels}): the model predicts v in latent space")


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check every cross-field rule; call before any process group starts. Returns cfg for chaining."""
    p, m, d, dd, t = cfg.parallel, cfg.model, cfg.diffusion, cfg.data, cfg.train
    _require(p.tensor_parallel >= 1, "parallel.tensor_parallel", p.tensor_parallel, "must be >= 1")
    _require(p.sequence_parallel >= 1, "parallel.sequence_parallel", p.sequence_parallel, "must be >= 1")
    _require(p.backend in ("auto", "nccl", "gloo"), "parallel.backend", p.backend, "must be auto, nccl or gloo")
    _require(p.timeout_minutes > 0, "parallel.timeout_minutes", p.timeout_minutes, "must be positive")
    if world_size is not None:
        mp = p.tensor_parallel * p.sequence_parallel
        _require(world_size % mp == 0, "parallel.tensor_parallel x parallel.sequence_parallel", mp,
                 f"must divide the world size ({world_size} processes)")
    validate_model(m, p.tensor_parallel, p.sequence_parallel)

    _require(d.num_train_timesteps > 0, "diffusion.num_train_timesteps", d.num_train_timesteps, "must be positive")
    _require(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start/beta_end", (d.beta_start, d.beta_end),
             "need 0 < beta_start < beta_end < 1")
    _require(d.snr_shift_scale > 0, "diffusion.snr_shift_scale", d.snr_shift_scale, "must be positive")
    _require(d.prediction_type == "v_prediction", "diffusion.prediction_type", d.prediction_type,
             "must be v_prediction (an epsilon model cannot predict x0 at the zero-SNR end of the schedule)")
    _require(d.beta_schedule in ("scaled_linear", "linear"), "diffusion.beta_schedule", d.beta_schedule,
             "must be scaled_linear or linear")
    _require(0 <= d.caption_dropout < 1, "diffusion.caption_dropout", d.caption_dropout, "must be in [0, 1)")

    k = m.temporal_compression_ratio
    _require(dd.num_frames >= 1 and (dd.num_frames - 1) % k == 0, "data.num_frames", dd.num_frames,
             f"pixel frames must be {k}k+1 (1, {k + 1}, {2 * k + 1}, ...) for the causal VAE")
    for name in ("height", "width"):
        px = getattr(dd, name)
        mult = dd.vae_spatial_compression * m.patch_size
        _require(px > 0 and px % mult == 0, f"data.{name}", px,
                 f"must be a positive multiple of {mult} (VAE x{dd.vae_spatial_compression}, then "
                 f"model.patch_size {m.patch_size}), so the latent {name} divides by the patch size")
    tokens = video_tokens(m, dd.num_frames, dd.height, dd.width, dd.vae_spatial_compression)
    _require(tokens >= p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
             f"must not exceed the video token count ({tokens} for {dd.num_frames}x{dd.height}x{dd.width}): "
             f"every rank holds at least one")
    if dd.image_ratio is not None:
        _require(0 <= dd.image_ratio <= 1, "data.image_ratio", dd.image_ratio, "must be in [0, 1] (or null)")
    _require(dd.latent_scale > 0, "data.latent_scale", dd.latent_scale, "must be positive")

    _require(t.precision in ("bf16", "fp16", "fp32"), "train.precision", t.precision, "must be bf16, fp16 or fp32")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", t.zero_stage, "must be 0, 1, 2 or 3")
    _require(t.lr_schedule in ("cosine", "constant"), "train.lr_schedule", t.lr_schedule,
             "must be cosine or constant")
    for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "save_every", "keep_last",
                 "log_every", "max_consecutive_nonfinite"):
        _require(getattr(t, name) > 0, f"train.{name}", getattr(t, name), "must be positive")
    _require(t.lr > 0, "train.lr", t.lr, "must be positive")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0: no clipping)")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas,
             "must be two numbers in [0, 1)")
    if t.ema_decay is not None:
        _require(0 < t.ema_decay < 1, "train.ema_decay", t.ema_decay, "must be in (0, 1)")
    if t.peak_tflops is not None:
        _require(t.peak_tflops > 0, "train.peak_tflops", t.peak_tflops, "must be positive (TFLOP/s per GPU), or null")
    if t.profile_steps is not None:
        _require(len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1] <= t.max_steps,
                 "train.profile_steps", t.profile_steps,
                 f"must be [first, last] optimizer steps with 1 <= first <= last <= train.max_steps ({t.max_steps})")
    if t.profile_ranks is not None:
        _require(len(t.profile_ranks) > 0 and all(r >= 0 for r in t.profile_ranks), "train.profile_ranks",
                 t.profile_ranks, "must be a non-empty list of global ranks (or null for every rank)")
        if world_size is not None:
            _require(all(r < world_size for r in t.profile_ranks), "train.profile_ranks", t.profile_ranks,
                     f"ranks must be below the world size ({world_size} processes)")
    return cfg


def video_tokens(m: ModelConfig, num_frames: int, height: int, width: int, spatial_compression: int = 8) -> int:
    """Number of video tokens for a clip of `num_frames` pixel frames at height x width pixels."""
    latent_frames = (num_frames - 1) // m.temporal_compression_ratio + 1
    h = height // spatial_compression // m.patch_size
    w = width // spatial_compression // m.patch_size
    return latent_frames * h * w
