"""python -m cogvx_ds.export: a training run -> a diffusers CogVideoXPipeline folder.

Writes transformer/ (ZeRO-3 partitions gathered, TP shards merged), vae/, text_encoder/ + tokenizer/ (copied),
scheduler/ (CogVideoXDDIMScheduler config of the training schedule) and model_index.json, so that
`diffusers.CogVideoXPipeline.from_pretrained(out)` loads it. The transformer comes from the run's final_model/
when it exists and --checkpoint is not given (no processes needed); otherwise from a DeepSpeed checkpoint, which
must be read with the training layout: launch with the same torchrun world size, TP and SP as training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from cogvx_ds.config import DiffusionConfig, load_config
from cogvx_ds.utils import out_dir_problem

PIPELINE_CLASS = "CogVideoXPipeline"


def scheduler_config(d: DiffusionConfig) -> dict:
    return {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.32.0",
            "num_train_timesteps": d.num_train_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
            "beta_schedule": d.beta_schedule, "snr_shift_scale": d.snr_shift_scale,
            "rescale_betas_zero_snr": d.rescale_zero_terminal_snr, "prediction_type": d.prediction_type,
            "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}


DIFFUSERS_ROPE_THETA = 10000.0  # what CogVideoXPipeline's get_3d_rotary_pos_embed uses (it has no setting)


def check_exportable(cfg) -> None:
    """What diffusers' pipeline cannot reproduce: refuse before anything is written."""
    m = cfg.model
    if m.use_rotary_positional_embeddings and m.rope_theta != DIFFUSERS_ROPE_THETA:
        raise ValueError(f"model.rope_theta = {m.rope_theta}: diffusers' CogVideoXPipeline always computes RoPE with "
                         f"theta {DIFFUSERS_ROPE_THETA:g}, so the exported pipeline would not reproduce this model "
                         f"(sample it with python -m cogvx_ds.sample instead)")


DIFFUSERS_TEXT_LENGTH = 226  # CogVideoXPipeline's default max_sequence_length


def set_training_sample_size(transformer_dir: Path, cfg) -> None:
    """Write the training clip size as the transformer's sample size. diffusers' pipeline maps a video's token grid
    onto the sample grid for RoPE (positions scaled by sample / grid) while training used integer positions on
    its own grid: at any size but the sample size the two disagree (cos tables apart by up to 2). It also makes
    the pipeline's default height / width / frames the training ones."""
    path = transformer_dir / "config.json"
    raw = json.loads(path.read_text())
    d = cfg.data
    raw.update(sample_height=d.height // d.vae_spatial_compression, sample_width=d.width // d.vae_spatial_compression,
               sample_frames=d.num_frames)
    path.write_text(json.dumps(raw, indent=2) + "\n")


def _copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def _text_encoder_roots(text_encoder: Path) -> tuple[Path, Path]:
    te_root = text_encoder if not (text_encoder / "text_encoder").is_dir() else text_encoder / "text_encoder"
    tok_root = te_root if (te_root / "tokenizer_config.json").is_file() else text_encoder / "tokenizer"
    return te_root, tok_root


# encoder-decoder checkpoints whose encoder is what the pipeline runs (CogVideoX conditions on the encoder only)
_ENCODER_OF = {"T5ForConditionalGeneration": "T5EncoderModel", "MT5ForConditionalGeneration": "MT5EncoderModel",
               "UMT5ForConditionalGeneration": "UMT5EncoderModel", "T5Model": "T5EncoderModel"}


def _write_text_encoder(src: Path, dst: Path) -> str:
    """The text encoder as the pipeline loads it; returns its transformers class for model_index.json. An
    encoder-only folder is copied; a full encoder-decoder checkpoint (e.g. google/t5-v1_1-xxl) is saved as its
    encoder: recorded as T5ForConditionalGeneration, the pipeline built the whole model and failed on its first
    prompt ("You must specify exactly one of input_ids or inputs_embeds"), and the decoder's weights were copied."""
    arch = (json.loads((src / "config.json").read_text()).get("architectures") or ["T5EncoderModel"])[0]
    if arch not in _ENCODER_OF:
        _copy_tree(src, dst)
        return arch
    import transformers

    encoder = getattr(transformers, _ENCODER_OF[arch]).from_pretrained(src, local_files_only=True, torch_dtype="auto")
    if dst.exists():
        shutil.rmtree(dst)
    encoder.save_pretrained(dst)
    return _ENCODER_OF[arch]


# a model folder's files that are not its tokenizer's
_MODEL_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth", "*.h5",
                "*.msgpack", "*.ckpt", "*.ckpt.*", "*.ot", "*.onnx", "*.gguf", "config.json", "generation_config.json")


def _write_tokenizer(src: Path, dst: Path, model_config: Path) -> None:
    """The tokenizer's files, copied as they are (spiece.model, tokenizer.json, tokenizer_config.json, ...), without
    the model's: a tokenizer beside the weights used to copy the weights too, ~19 GB more per export for T5-XXL."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not any(f.match(pattern) for pattern in _MODEL_FILES):
            shutil.copy2(f, dst / f.name)
    # a tokenizer class recorded only in the model's config.json (as ByT5 checkpoints do) goes with the tokenizer:
    # without it the pipeline would load a T5Tokenizer and encode every prompt as unknown tokens
    tok_config = dst / "tokenizer_config.json"
    if tok_config.is_file() and model_config.is_file():
        tok = json.loads(tok_config.read_text())
        cls = json.loads(model_config.read_text()).get("tokenizer_class")
        if not tok.get("tokenizer_class") and cls:
            tok_config.write_text(json.dumps({**tok, "tokenizer_class": cls}, indent=2))


def check_pipeline_inputs(vae: Path, text_encoder: Path) -> None:
    """FileNotFoundError naming the argument, before anything is written."""
    if not (vae / "config.json").is_file():
        raise FileNotFoundError(f"--vae {vae}: not a diffusers VAE folder (no config.json)")
    te_root, tok_root = _text_encoder_roots(text_encoder)
    if not (te_root / "config.json").is_file():
        raise FileNotFoundError(f"--text-encoder {text_encoder}: no config.json (a transformers model folder, or "
                                f"one with text_encoder/ and tokenizer/)")
    if not (tok_root / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"--text-encoder {text_encoder}: no tokenizer_config.json (next to the model or in "
                                f"tokenizer/)")


def check_components_fit(m, vae: Path, text_encoder: Path) -> None:
    """The VAE and text encoder folders are ones the transformer (ModelConfig `m`) can work with: latent channels,
    temporal compression and text width, from their config.json files; ValueError naming the argument. A mismatch
    otherwise shows only after sampling (the VAE refuses the latents) or as oneDNN's "could not create a primitive
    descriptor" at the first step (a wider text encoder)."""
    v = json.loads((vae / "config.json").read_text())
    channels, ratio = v.get("latent_channels", 16), v.get("temporal_compression_ratio", 4)
    if channels != m.in_channels or channels != m.out_channels:
        raise ValueError(f"--vae {vae}: latent_channels = {channels}, but the transformer takes "
                         f"{m.in_channels} in and {m.out_channels} out: use the VAE its latents were encoded with")
    if int(ratio) != m.temporal_compression_ratio:
        raise ValueError(f"--vae {vae}: temporal_compression_ratio = {ratio}, but the transformer was made for "
                         f"{m.temporal_compression_ratio}")
    te_root, _ = _text_encoder_roots(text_encoder)
    t = json.loads((te_root / "config.json").read_text())
    width = t.get("d_model", t.get("hidden_size"))
    if width is not None and width != m.text_embed_dim:
        raise ValueError(f"--text-encoder {text_encoder}: its embeddings are {width}-wide, but the transformer takes "
                         f"text_embed_dim = {m.text_embed_dim}: use the text encoder it was trained with")


def write_pipeline_parts(out: Path, diffusion: DiffusionConfig, vae: Path, text_encoder: Path,
                         latent_scale: float | None = None) -> None:
    """Everything but the transformer: VAE, text encoder + tokenizer, scheduler, model_index.json.

    ``latent_scale``: the factor the transformer's training latents were multiplied by (data.latent_scale). It
    becomes the exported VAE's scaling_factor, which is what diffusers' pipeline divides the latents by.
    """
    from cogvx_ds.models.vae import CogVideoXVAE

    check_pipeline_inputs(vae, text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    vae_model = CogVideoXVAE.from_diffusers(vae, dtype=None)  # written back in the dtype it came in
    if latent_scale is not None:
        vae_model.config.scaling_factor = float(latent_scale)
    vae_model.save_diffusers(out / "vae")
    te_root, tok_root = _text_encoder_roots(text_encoder)
    te_class = _write_text_encoder(te_root, out / "text_encoder")
    _write_tokenizer(tok_root, out / "tokenizer", te_root / "config.json")
    tok_class = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text()).get("tokenizer_class",
                                                                                          "T5Tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(diffusion), indent=2))
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": "0.32.0",
             "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", te_class],
             "tokenizer": ["transformers", tok_class], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def checkpoint_tag(run_dir: Path, tag: str) -> str:
    """`tag` ('latest' resolved) if run_dir/checkpoints/<tag> exists, else a ValueError naming the tags there."""
    ckpt = run_dir / "checkpoints"
    if tag == "latest":
        if not (ckpt / "latest").is_file():
            raise ValueError(f"--checkpoint latest: {ckpt}/latest does not exist (no checkpoint saved yet)")
        tag = (ckpt / "latest").read_text().strip()
    if not (ckpt / tag).is_dir():
        tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir()) if ckpt.is_dir() else []
        raise ValueError(f"--checkpoint: {ckpt / tag} does not exist; checkpoints there: {', '.join(tags) or 'none'}")
    return tag


def export_transformer_from_checkpoint(run_dir: Path, out: Path, tag: str) -> None:
    """Load a DeepSpeed checkpoint with the training layout and write the gathered transformer (all ranks)."""
    import os

    import torch.distributed as dist

    from cogvx_ds.train.trainer import build_ds_config, build_engine
    from cogvx_ds.utils import single_process_env

    cfg = load_config(run_dir / "config.yaml", ["train.init_from=null"])
    single_process_env()
    from cogvx_ds.parallel import init_distributed

    init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel, cfg.parallel.backend)
    engine, model = build_engine(cfg, build_ds_config(cfg))
    ckpt = run_dir / "checkpoints"
    tag = checkpoint_tag(run_dir, tag)
    # With the optimizer states: without them DeepSpeed's ZeRO-3 loader consolidates the fp32 weights from
    # `latest` whatever the tag (and is not TP-aware: "Expected 1 of '*_optim_states.pt' ... found 2")
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / tag} (see its warning above)")
    model.save_diffusers(out / "transformer")
    if dist.get_rank() == 0:
        print(f"exported {ckpt / tag} (world {os.environ.get('WORLD_SIZE')}) to {out / 'transformer'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cogvx_ds.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a training run dir (config.yaml, final_model/, checkpoints/)")
    ap.add_argument("--out", required=True, help="output pipeline folder")
    ap.add_argument("--vae", required=True, help="diffusers-format VAE folder the latents were encoded with")
    ap.add_argument("--text-encoder", required=True, help="text encoder folder (with its tokenizer)")
    ap.add_argument("--checkpoint", help="'latest' or a tag like step00001000: export that DeepSpeed checkpoint "
                                         "instead of final_model/ (launch with the training layout)")
    ap.add_argument("--ema", action="store_true",
                    help="export the EMA weights (final_model_ema/, written when train.ema_decay is set)")
    # the deepspeed launcher appends --local_rank=N (and sets LOCAL_RANK, which is what is read)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    run, out = Path(args.run_dir), Path(args.out)
    if not (run / "config.yaml").is_file():
        ap.error(f"{run} is not a training run dir (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    try:
        check_exportable(cfg)
        check_pipeline_inputs(Path(args.vae), Path(args.text_encoder))
        check_components_fit(cfg.model, Path(args.vae), Path(args.text_encoder))
        if args.checkpoint:
            checkpoint_tag(run, args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    problem = out_dir_problem(out, "--out")
    if problem:
        ap.error(problem)
    if args.ema and args.checkpoint:
        ap.error("--ema exports final_model_ema/; a --checkpoint holds the EMA as per-rank shards: export after the "
                 "run finishes")
    if args.checkpoint:
        export_transformer_from_checkpoint(run, out, args.checkpoint)
        import torch.distributed as dist

        from cogvx_ds.parallel import destroy_distributed

        rank = dist.get_rank()
        destroy_distributed()
        if rank != 0:
            return 0
    else:
        final = run / ("final_model_ema" if args.ema else "final_model")
        if not (final / "config.json").is_file():
            ap.error(f"{run} has no final_model_ema/ (the run had no train.ema_decay, or has not finished)" if args.ema
                     else f"{run} has no final_model/ yet; pass --checkpoint latest to export its last checkpoint")
        _copy_tree(final, out / "transformer")
    set_training_sample_size(out / "transformer", cfg)
    write_pipeline_parts(out, cfg.diffusion, Path(args.vae), Path(args.text_encoder), cfg.data.latent_scale)
    print(f"wrote {out} ({PIPELINE_CLASS}: transformer, vae, text_encoder, tokenizer, scheduler)")
    if cfg.model.max_text_seq_length != DIFFUSERS_TEXT_LENGTH:
        print(f"note: this model reads {cfg.model.max_text_seq_length} text tokens; the pipeline encodes "
              f"{DIFFUSERS_TEXT_LENGTH} unless called with max_sequence_length={cfg.model.max_text_seq_length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
