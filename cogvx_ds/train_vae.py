"""Train the 3D causal VAE (reconstruction + LPIPS + 3D hinge GAN + KL) with DeepSpeed ZeRO-2.

Runs as a single process without a launcher (CPU: gloo), or under torchrun / deepspeed / srun.
Settings come from defaults < --config YAML < key=value overrides (dotted for the model: model.latent_channels=16).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import sys
import textwrap
from pathlib import Path

import yaml

from cogvx_ds.models.vae import CogVideoXVAEConfig
from cogvx_ds.train.vae_trainer import VAETrainConfig, VAETrainer
from cogvx_ds.utils import out_dir_problem

FIELD_HELP = {
    "run_dir": "output folder: metrics.jsonl, tensorboard/, checkpoints/, export/",
    "init_from": "a diffusers-format VAE folder to fine-tune (e.g. CogVideoX's vae/); None: random init of `model`",
    "model": "CogVideoXVAEConfig fields (dotted: model.latent_channels=16), merged over the tiny default shown; "
             "the DiT's in_channels must equal latent_channels (16 for the released 2B/5B and model/demo, 4 for "
             "model/tiny)",
    "data": "videos to train on: a folder, a .jsonl/.csv manifest or a videos.txt list; None: synthetic moving "
            "shapes",
    "data_cache_mb": "decoded videos of `data` kept in memory per process (least recently used dropped); 0: decode "
                     "each draw",
    "frames": "frames per training clip, 8j+1 (9, 17, ..., 49)",
    "height": "clip height in pixels, a multiple of the VAE's spatial ratio (8 for CogVideoX's)",
    "width": "clip width in pixels, likewise",
    "batch_size": "clips per process per step (DeepSpeed's micro-batch)",
    "seed": "seed of the initialisation and the data stream",
    "steps": "total optimizer steps (a resumed run continues to it)",
    "lr": "AdamW learning rate of the VAE",
    "disc_lr": "AdamW learning rate of the 3D discriminator",
    "betas": "AdamW betas of both",
    "ds_config": "a DeepSpeed JSON file; None: the built-in ZeRO-2 config (ds_configs/vae_zero2_cpu.json)",
    "recon": "reconstruction loss: l1 or l2",
    "chroma_weight": "weight of the colour part of the reconstruction error",
    "lpips_path": "local LPIPS weights (lpips' vgg.pth beside torchvision's vgg16-397923af.pth, or one LPIPS state "
                  "dict); None: LPIPS off",
    "lpips_weight": "weight of the LPIPS term",
    "lpips_frames": "LPIPS on this many random frames per clip (None: all)",
    "kl_weight": "weight of the KL term",
    "disc_weight": "weight of the adaptive hinge-GAN term (0: no GAN)",
    "disc_start": "step from which the GAN term and the discriminator's updates run",
    "disc_channels": "the 3D discriminator's base width",
    "disc_layers": "the 3D discriminator's downsampling layers",
    "sample_posterior": "decode a sample of the posterior (true) or its mean (false) in training",
    "log_every": "steps between metrics.jsonl / TensorBoard records",
    "video_every": "steps between reconstruction videos in TensorBoard",
    "ckpt_every": "steps between checkpoints (the last step always saves one)",
    "export": "write run_dir/export (diffusers format, scaling_factor measured on training clips) at the end",
}


def _fields_help() -> str:
    lines = ["config fields (YAML keys or key=value overrides), with defaults:"]
    for f in dataclasses.fields(VAETrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}")
        lines += textwrap.wrap(FIELD_HELP[f.name], 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_value(text: str):
    """YAML scalars (1e-3, true, null, [16, 32]) and Python literals."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return ast.literal_eval(text)


def build_config(config_file: str | None, overrides: list[str]) -> VAETrainConfig:
    values: dict = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of config fields at the top level")
        if "model" in loaded:  # over the default model, as model.* overrides are (not a model of only these fields)
            if not isinstance(loaded["model"], dict):
                raise ValueError(f"{config_file}: model: expected a mapping of CogVideoXVAEConfig fields, got "
                                 f"{loaded['model']!r}")
            loaded["model"] = {**VAETrainConfig().model, **loaded["model"]}
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        if key.startswith("model."):
            values.setdefault("model", dict(VAETrainConfig().model))[key[6:]] = parse_value(text)
        else:
            values[key] = parse_value(text)
    names = {f.name for f in dataclasses.fields(VAETrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = config_file or "overrides"
        model_fields = set(VAETrainConfig().model) | {f.name for f in dataclasses.fields(CogVideoXVAEConfig)}
        hint = [f"model.{k}" for k in unknown if k in model_fields]
        raise ValueError(f"{where}: unknown VAE training config field(s) {unknown}; valid: {sorted(names)}"
                         + (f" (the VAE's own fields are model.*: {', '.join(hint)})" if hint else ""))

    model_names = {f.name for f in dataclasses.fields(CogVideoXVAEConfig)}
    bad_model = sorted(set(values.get("model") or {}) - model_names)
    if bad_model:  # would otherwise train, and land in the exported config.json
        raise ValueError(f"{config_file or 'overrides'}: unknown VAE model field(s) {['model.' + k for k in bad_model]}; "
                         f"valid: {sorted(model_names)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    where = config_file or "overrides"
    types = {f.name: str(f.type) for f in dataclasses.fields(VAETrainConfig)}
    for key, value in values.items():
        values[key] = _as_declared(key, value, types[key], where)
    if isinstance(values.get("model"), dict):
        model_types = {f.name: str(f.type) for f in dataclasses.fields(CogVideoXVAEConfig)}
        values["model"] = {k: _as_declared(f"model.{k}", v, model_types[k], where) for k, v in values["model"].items()}
    return VAETrainConfig(**values)


def _as_declared(key: str, value, declared: str, where: str):
    """A number field given as text (YAML reads 2e-3 and 1e-6 as strings: its floats need a dot) as that number,
    also inside tuple fields (betas=[5e-1, 9e-1]); None or null for an optional field; text that is no number is an
    error naming the field."""
    kinds = [k.strip() for k in declared.split("|")]
    if isinstance(value, str) and value in ("None", "null") and "None" in kinds:
        return None
    kind = kinds[0]
    if kind.startswith("tuple[") and isinstance(value, (list, tuple)):
        inner = kind[len("tuple["):-1].split(",")[0].strip()
        return type(value)(_as_declared(key, v, inner, where) for v in value)
    if not isinstance(value, str) or kind not in ("float", "int"):
        return value
    try:
        return float(value) if kind == "float" else int(value)
    except ValueError:
        raise ValueError(f"{where}: {key} must be {'a number' if kind == 'float' else 'a whole number'}, got "
                         f"{value!r}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cogvx_ds.train_vae", description=__doc__, epilog=_fields_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("--run-dir", help="output dir: metrics.jsonl, tensorboard/, checkpoints/, export/ (same as run_dir=)")
    p.add_argument("--steps", type=int, help="total optimizer steps (same as steps=)")
    p.add_argument("--lpips-path", help="local LPIPS weights (same as lpips_path=); without it LPIPS is off")
    p.add_argument("--export-only", action="store_true",
                   help="load the latest checkpoint of run_dir and write run_dir/export in diffusers format")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. recon=l2 disc_start=50")
    args = p.parse_intermixed_args(argv)  # options may come after key=value overrides
    from cogvx_ds.utils import tune_malloc

    tune_malloc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    for flag, key in ((args.run_dir, "run_dir"), (args.steps, "steps"), (args.lpips_path, "lpips_path")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = build_config(args.config, overrides)
        cfg.validate()
    except (ValueError, OSError) as e:
        p.error(str(e))
    problem = out_dir_problem(cfg.run_dir, "run_dir")
    if cfg.lpips_path and cfg.lpips_weight and not Path(cfg.lpips_path).exists():
        problem = (f"lpips_path {cfg.lpips_path}: does not exist (a folder with lpips' vgg.pth and torchvision's "
                   f"vgg16 weights, or an LPIPS state dict)")
    if problem:
        p.error(problem)
    trainer = VAETrainer(cfg)
    if args.export_only:
        if not trainer.resume():
            sys.exit(f"{cfg.run_dir}/checkpoints/latest: no checkpoint to export")
        if trainer.rank == 0:  # every rank holds the whole VAE; one writes it
            trainer.export(Path(cfg.run_dir) / "export")
        import torch.distributed as dist

        dist.barrier()
    else:
        trainer.train()
    import torch.distributed as dist

    dist.destroy_process_group()  # NCCL warns at exit (and some versions hang in teardown) when it is left open


if __name__ == "__main__":
    main()
