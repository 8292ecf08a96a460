"""The DeepSpeed config of a DiT training run: `train.ds_config` (a JSON file: ZeRO and communication settings)
with what the run's YAML decides (batch sizes, clipping, precision) filled in. No torch import: the CLI's
`--print-config` (the launchers' check before any process starts) checks it too."""

from __future__ import annotations

import json
from pathlib import Path

from cogvx_ds.config import Config

# keys of a user's ds_config that the YAML decides: (YAML field, its value from the config)
_FROM_YAML = {
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", lambda t: t.micro_batch_size),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", lambda t: t.gradient_accumulation_steps),
    "gradient_clipping": ("train.grad_clip", lambda t: t.grad_clip),
}


def read_json_object(path: Path, field: str) -> dict:
    """A DeepSpeed config file (the config field `field` names it) holding a JSON object, or ValueError naming
    the field and the file (FileNotFoundError where there is none)."""
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{field}: {path} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise ValueError(f"{field}: {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


def _read(path: Path) -> dict:
    ds = read_json_object(path, "train.ds_config")
    for section in ("zero_optimization", "bf16", "fp16"):
        if section in ds and not isinstance(ds[section], dict):
            raise ValueError(f"train.ds_config: {path}: {section} must be a JSON object, got {ds[section]!r}")
    return ds


def _auto_keys(d: dict, prefix: str = ""):
    """Dotted names of the values "auto" in a DeepSpeed config."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _auto_keys(v, f"{prefix}{k}.")
        elif v == "auto":
            yield prefix + k


def _check_user_config(ds: dict, cfg: Config, path: Path, world_size: int | None) -> None:
    """A value the user's file sets that the run would silently replace is an error naming both. "auto" (the
    convention of configs written for other trainers) is accepted where the YAML decides the value, except the ZeRO
    stage, and refused anywhere else (DeepSpeed would fail on it in every rank after launch). train_batch_size is
    checked when the world size is known: samples per optimizer step, micro-batch x accumulation x DP ranks."""
    t = cfg.train
    stage = ds.get("zero_optimization", {}).get("stage", t.zero_stage)
    if stage != t.zero_stage:
        raise ValueError(f"train.ds_config {path} sets ZeRO stage {stage} but train.zero_stage = {t.zero_stage}; "
                         f"make them agree")
    for key, (field, value) in _FROM_YAML.items():
        if key in ds and ds[key] != "auto" and ds[key] != value(t):
            raise ValueError(f"train.ds_config {path} sets {key} = {ds[key]!r} but {field} = {value(t)} decides it; "
                             f"remove it from the file or set {field}")
    given = ds.get("train_batch_size", "auto")
    if given != "auto" and world_size:
        dp = world_size // (cfg.parallel.tensor_parallel * cfg.parallel.sequence_parallel)
        samples = t.micro_batch_size * t.gradient_accumulation_steps * dp
        if given != samples:
            raise ValueError(f"train.ds_config {path} sets train_batch_size = {given!r} but the run's global batch "
                             f"is train.micro_batch_size x train.gradient_accumulation_steps x data-parallel ranks = "
                             f"{t.micro_batch_size} x {t.gradient_accumulation_steps} x {dp} = {samples} samples "
                             f"(DeepSpeed's own log counts the sequence-parallel ranks too); remove it from the file "
                             f"or change those")
    decided = {*_FROM_YAML, "train_batch_size", "bf16.enabled", "fp16.enabled"}
    for key in _auto_keys(ds):
        if key not in decided:
            raise ValueError(f"train.ds_config {path}: {key} = \"auto\" is filled in only for the batch sizes, "
                             f"gradient clipping and bf16/fp16.enabled (the YAML decides those); give {key} a value "
                             f"or remove it")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"train.ds_config {path}: its {key!r} section would be ignored (the trainer builds AdamW "
                             f"and the LR schedule from train.lr, train.betas, train.weight_decay, "
                             f"train.warmup_steps and train.lr_schedule); remove it")
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled")
        if enabled not in (None, "auto") and enabled != (t.precision == key):
            raise ValueError(f"train.ds_config {path} sets {key}.enabled = {str(enabled).lower()} but "
                             f"train.precision = {t.precision} decides it; remove it from the file")


def build_ds_config(cfg: Config, world_size: int | None = None) -> dict:
    """`world_size` (processes of the run), when known, also checks the file's train_batch_size."""
    t = cfg.train
    if t.ds_config:
        path = Path(t.ds_config)
        ds = _read(path)
        _check_user_config(ds, cfg, path, world_size)
    else:
        ds = {"zero_optimization": {"stage": t.zero_stage}}
    # the file's other precision settings (loss-scale window, hysteresis, ...) are kept; enabled follows the YAML
    bf16, fp16 = ds.get("bf16", {}), ds.get("fp16", {})
    ds.update({
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip,
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer (also under offload)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        # check_grad_overflow: a NaN/inf gradient skips the step in bf16 too (fp16 always checks; fp32 is checked
        # through the gradient norm). The trainer relies on this to skip bad steps (tests/test_train.py).
        "bf16": {**bf16, "enabled": t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"initial_scale_power": 16, "loss_scale_window": 500, **fp16, "enabled": t.precision == "fp16"},
    })
    ds.pop("train_batch_size", None)  # DeepSpeed derives it; its "data parallel" size here is DP x SP
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", t.zero_stage)
    if zero["stage"] == 3 and cfg.parallel.sequence_parallel > 1 and zero.get("reduce_scatter", True) is False:
        # ZeRO-3 then averages a gradient over DP only or over DP x SP depending on the parameter's size (the
        # all-reduce path vs the reduce-scatter fallback for parameters above reduce_bucket_size): no one loss
        # scale is right for all of them (ours assumes DP x SP, see Trainer._sp_loss_factor)
        raise ValueError(f"train.ds_config: zero_optimization.reduce_scatter = false with ZeRO-3 and "
                         f"parallel.sequence_parallel = {cfg.parallel.sequence_parallel} would scale some gradients "
                         f"by SP; remove it (the default, true, is what the trainer's loss scaling assumes)")
    return ds
