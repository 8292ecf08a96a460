"""Export to a diffusers CogVideoXPipeline folder, and sampling prompts -> mp4 with our samplers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx_ds.config import Config, DataConfig, ModelConfig, save_config
from cogvx_ds.diffusion import NoiseSchedule
from cogvx_ds.models import CogVideoXTransformer
from cogvx_ds.models.text_encoder import TextEncoder, build_tiny_t5
from cogvx_ds.models.vae import CogVideoXVAE, CogVideoXVAEConfig

# The released 5B's sample size (60 x 90 latents, 49 frames) while the run trains on 32 x 48 pixel clips (a 2 x 3
# token grid): diffusers' pipeline would map that grid onto the sample grid for RoPE (positions 0, 1.875, ...) unless
# the export writes the training size.
MODEL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
             text_embed_dim=32, num_layers=2, sample_width=90, sample_height=60, sample_frames=49,
             max_text_seq_length=16, use_rotary_positional_embeddings=True)
VAE = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
           sample_height=32, sample_width=48)
FRAMES, HEIGHT, WIDTH = 9, 32, 48


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake finished training run: config.yaml + final_model/, plus a tiny VAE and text encoder."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    dit = CogVideoXTransformer.from_config(ModelConfig(**MODEL))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dit.save_diffusers(root / "run" / "final_model")
    save_config(Config(model=ModelConfig(**MODEL), data=DataConfig(height=HEIGHT, width=WIDTH, num_frames=FRAMES)),
                root / "run" / "config.yaml")
    CogVideoXVAE(CogVideoXVAEConfig(**VAE)).save_diffusers(root / "vae")
    build_tiny_t5(root / "t5", d_model=32)
    return root


def test_diffusers_pipeline_loads_export_and_first_step_matches(run_dir, tmp_path):
    from diffusers import CogVideoXPipeline

    out = tmp_path / "pipe"
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run_dir / 'run'}", f"--out={out}",
                           f"--vae={run_dir / 'vae'}", f"--text-encoder={run_dir / 't5'}"], check=True,
                          capture_output=True, text=True)
    assert "max_sequence_length=16" in proc.stdout  # the model reads 16 text tokens, the pipeline's default is 226
    pipe = CogVideoXPipeline.from_pretrained(out)
    prompt, steps, guidance = "a red circle moving left", 4, 3.0
    x_T = torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    seen = {}

    def grab(_pipe, i, _t, kwargs):
        seen.setdefault(i, kwargs["latents"].clone())
        return kwargs

    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, use_dynamic_cfg=False, latents=x_T.clone(),
         height=HEIGHT, width=WIDTH, num_frames=FRAMES, output_type="latent", max_sequence_length=16,
         callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])

    from cogvx_ds.diffusion import sample

    dit = CogVideoXTransformer.from_diffusers(out / "transformer")
    enc = TextEncoder.from_pretrained(out, max_length=16)
    cond, uncond = enc.encode([prompt])[0], enc.empty_embedding()[0]
    ours = {}
    with torch.no_grad():
        sample(lambda x, t: dit(x, cond, t.float()), x_T.clone(), NoiseSchedule.cogvideox(), steps,
               uncond_fn=lambda x, t: dit(x, uncond, t.float()), guidance_scale=guidance,
               callback=lambda i, t, x: ours.setdefault(i, x.clone()))
    err = ((ours[0] - seen[0]).norm() / seen[0].norm()).item()
    assert err < 1e-5, err  # float32; same weights, schedule and guidance: only summation order differs
    moved = ((seen[0] - x_T).norm() / x_T.norm()).item()
    assert moved > 1e-3  # the step did something, so the comparison can fail
    # The pipeline divides latents by the VAE's scaling_factor: export writes the training run's latent scale.
    assert pipe.vae.config.scaling_factor == pytest.approx(Config().data.latent_scale)
    cfg = pipe.transformer.config  # the training clip size, also the pipeline's default
    assert (cfg.sample_height, cfg.sample_width, cfg.sample_frames) == (HEIGHT // 8, WIDTH // 8, FRAMES)


def test_export_refuses_what_diffusers_cannot_reproduce_and_keeps_rope_theta(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    save_config(Config(model=ModelConfig(**MODEL, rope_theta=500.0)), run / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run}", f"--out={tmp_path / 'o'}",
                           f"--vae={run_dir / 'vae'}", f"--text-encoder={run_dir / 't5'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "model.rope_theta = 500.0" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
    dit = CogVideoXTransformer.from_config(ModelConfig(**MODEL, rope_theta=500.0))
    dit.save_diffusers(tmp_path / "m")
    assert CogVideoXTransformer.from_diffusers(tmp_path / "m").config.rope_theta == 500.0


def test_sampling_uses_the_training_runs_latent_scale_and_schedule(run_dir, tmp_path):
    """A run trained with its own data.latent_scale and SNR shift is sampled with them (not the VAE's scaling
    factor and CogVideoX's shift of 3): from the run dir, from final_model/, and from its export, whose VAE
    scaling_factor and scheduler config carry them. A bare transformer folder says nothing (None, None)."""
    import shutil

    from diffusers import CogVideoXPipeline

    from cogvx_ds.config import DataConfig, DiffusionConfig
    from cogvx_ds.sample import training_settings

    run = tmp_path / "run"
    shutil.copytree(run_dir / "run" / "final_model", run / "final_model")
    save_config(Config(model=ModelConfig(**MODEL), data=DataConfig(latent_scale=0.5),
                       diffusion=DiffusionConfig(snr_shift_scale=1.0)), run / "config.yaml")
    want = NoiseSchedule.cogvideox(snr_shift_scale=1.0).alphas_cumprod
    assert not torch.allclose(want, NoiseSchedule.cogvideox().alphas_cumprod)
    for where in (run, run / "final_model"):
        scale, schedule = training_settings(where)
        assert scale == 0.5 and torch.equal(schedule.alphas_cumprod, want)
    assert training_settings(tmp_path / "nothing") == (None, None)
    out = tmp_path / "pipe"
    subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run}", f"--out={out}",
                    f"--vae={run_dir / 'vae'}", f"--text-encoder={run_dir / 't5'}"], check=True, capture_output=True)
    for where in (out, out / "transformer"):  # its transformer/ alone finds the pipeline's scheduler beside it
        scale, schedule = training_settings(where)
        assert scale is None and torch.allclose(schedule.alphas_cumprod, want, rtol=1e-12, atol=0)
    assert CogVideoXPipeline.from_pretrained(out).vae.config.scaling_factor == 0.5
    sched = out / "scheduler" / "scheduler_config.json"
    eps = tmp_path / "eps" / "scheduler"
    eps.mkdir(parents=True)
    (eps / "scheduler_config.json").write_text(sched.read_text().replace('"v_prediction"', '"epsilon"'))
    with pytest.raises(ValueError, match="only v_prediction"):
        training_settings(tmp_path / "eps")
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={out}", "--prompt=a red circle",
                           f"--out={tmp_path / 's'}", f"--frames={FRAMES}", f"--height={HEIGHT}", f"--width={WIDTH}",
                           "--steps=1"], check=True, capture_output=True, text=True)
    assert "latent scale 0.5000, schedule of the training run" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={out}", "--prompt=a", "--latent-scale=0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--latent-scale must be > 0" in bad.stderr


def test_sample_cli_writes_videos(run_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a blue square moving up\n\na green circle\n")
    subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={run_dir / 'run'}",
                    f"--vae={run_dir / 'vae'}", f"--text-encoder={run_dir / 't5'}",
                    f"--prompts-file={tmp_path / 'prompts.txt'}", "--prompt=a yellow triangle", f"--out={tmp_path / 's'}",
                    f"--frames={FRAMES}", f"--height={HEIGHT}", f"--width={WIDTH}", "--steps=2", "--sampler=dpm++",
                    "--guidance=2", "--batch-size=2", "--device=cpu"], check=True, capture_output=True)
    records = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert [r["prompt"] for r in records] == ["a yellow triangle", "a blue square moving up", "a green circle"]
    from data_tools._video_io import read_video

    frames, _fps = read_video(tmp_path / "s" / records[0]["path"])
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)


@pytest.mark.slow
def test_export_from_a_zero3_checkpoint_equals_final_model(run_dir, tmp_path):
    """Consolidating a DeepSpeed ZeRO-3 checkpoint gives exactly the weights of that step: `latest` equals what
    the run exported at its end, and an earlier tag equals a run stopped there (DeepSpeed's consolidation without
    optimizer states read `latest` whatever tag was asked for)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_helpers import make_shards, train_args

    from cogvx_ds.checkpoint.diffusers_io import LazySafetensors

    def same(x, y):
        a, b = LazySafetensors(x), LazySafetensors(y)
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    shards = make_shards(tmp_path / "shards", n_video=8)
    for name, steps in (("two", 2), ("four", 4)):  # a constant LR: the first two steps are the same in both
        subprocess.run([sys.executable, "-m", "cogvx_ds.train",
                        *train_args(tmp_path / name, shards, f"train.max_steps={steps}", "train.lr_schedule=constant")],
                       check=True, capture_output=True)
    for tag in ("latest", "step00000002"):
        subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={tmp_path / 'four'}",
                        f"--out={tmp_path / tag}", f"--vae={run_dir / 'vae'}", f"--text-encoder={run_dir / 't5'}",
                        f"--checkpoint={tag}"], check=True, capture_output=True)
    assert same(tmp_path / "four" / "final_model", tmp_path / "latest" / "transformer")
    assert same(tmp_path / "two" / "final_model", tmp_path / "step00000002" / "transformer")
    assert not same(tmp_path / "two" / "final_model", tmp_path / "four" / "final_model")


def test_sampling_components_load_onto_the_chosen_device(run_dir):
    """--device: transformer, VAE and text encoder all on it ('meta' stands in for a GPU here), the text encoder in
    bfloat16 only on CUDA; asking for CUDA where PyTorch sees none is a clear error, not a traceback."""
    from cogvx_ds.sample import load_components

    dit, vae, encoder = load_components(str(run_dir / "run"), str(run_dir / "vae"), str(run_dir / "t5"),
                                        device="meta")
    assert {p.device.type for m in (dit, vae, encoder.model) for p in m.parameters()} == {"meta"}
    assert encoder.model.dtype == torch.float32
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={run_dir / 'run'}", "--prompt=x",
                               "--device=cuda"], capture_output=True, text=True)
        assert proc.returncode == 2 and "--device cuda: this PyTorch sees no CUDA device" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={run_dir / 'run'}", "--prompt=x",
                           "--device=tpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--device must be cpu, cuda or cuda:N" in proc.stderr


def test_sample_cli_wrong_model_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={tmp_path / 'nowhere'}", "--prompt=x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_export_ema_weights(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    args = [sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run}", f"--vae={run_dir / 'vae'}",
            f"--text-encoder={run_dir / 't5'}", "--ema"]
    proc = subprocess.run([*args, f"--out={tmp_path / 'o1'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "has no final_model_ema/" in proc.stderr
    ema = CogVideoXTransformer.from_diffusers(run / "final_model")
    with torch.no_grad():
        ema.proj_out.weight.mul_(0.5)
    ema.save_diffusers(run / "final_model_ema")
    subprocess.run([*args, f"--out={tmp_path / 'o2'}"], check=True, capture_output=True)
    got = CogVideoXTransformer.from_diffusers(tmp_path / "o2" / "transformer").proj_out.weight
    assert torch.equal(got, ema.proj_out.weight)


def test_sample_rejects_bad_values_before_loading_or_sampling(run_dir, tmp_path):
    def sample(*extra):
        return subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={run_dir / 'run'}",
                               f"--vae={run_dir / 'vae'}", f"--text-encoder={run_dir / 't5'}", "--prompt=a red circle",
                               f"--out={tmp_path / 's'}", "--height=32", "--width=48", "--steps=1", *extra],
                              capture_output=True, text=True)

    (tmp_path / "file").write_text("")
    for extra, message in ((["--frames=0"], "--frames must be >= 1"), (["--fps=0"], "--fps must be > 0"),
                           (["--batch-size=0"], "--batch-size must be >= 1"),
                           ([f"--prompts-file={tmp_path / 'none.txt'}"], "none.txt: no such file"),
                           ([f"--out={tmp_path / 'file'}"], "is a file"),
                           (["--frames=13"], "use 8m+1 frames"), (["--height=30"], "multiples of 16")):
        proc = sample(*extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
    assert not (tmp_path / "s").exists()  # nothing was sampled or written


def test_export_checks_its_inputs_before_writing(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run_dir / 'run'}",
                           f"--out={tmp_path / 'o'}", f"--vae={tmp_path / 'novae'}", f"--text-encoder={run_dir / 't5'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--vae" in proc.stderr and "no config.json" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_a_prompts_video_depends_on_its_seed_only(run_dir, sampler):
    """The stochastic DPM++ drew its step noise from the global RNG: another video on every run, and one that
    changed with the other prompts of its batch. Now per prompt, from its seed, like the start noise."""
    from cogvx_ds.sample import generate, load_components

    dit, vae, encoder = load_components(str(run_dir / "run"), str(run_dir / "vae"), str(run_dir / "t5"))

    def run(prompts, seeds):
        torch.manual_seed(len(prompts))  # the global RNG must not matter
        return generate(dit, vae, encoder, prompts, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=3,
                        sampler=sampler, guidance=3.0, seeds=seeds, progress=False)

    both = run(["a red circle", "a blue square"], [0, 1])
    assert torch.allclose(run(["a blue square"], [1])[0], both[1], atol=1e-4)
    assert torch.equal(run(["a red circle", "a blue square"], [0, 1]), both)
    with pytest.raises(ValueError, match="needs --guidance > 1"):
        generate(dit, vae, encoder, ["x"], frames=FRAMES, height=HEIGHT, width=WIDTH, steps=1, guidance=1.0,
                 dynamic_guidance=True, progress=False)


def test_export_of_a_full_t5_checkpoint_writes_its_encoder_only(run_dir, tmp_path):
    """An encoder-decoder T5 folder (as google/t5-v1_1-xxl is released) is accepted as --text-encoder: the pipeline
    gets T5EncoderModel (recorded as T5ForConditionalGeneration it failed on its first prompt) with the encoder's
    weights only, and the tokenizer folder gets no model weights (it got a second copy of them)."""
    from diffusers import CogVideoXPipeline
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tiny = json.loads((run_dir / "t5" / "config.json").read_text())
    config = T5Config(**{k: tiny[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                              "relative_attention_num_buckets", "feed_forward_proj",
                                              "pad_token_id", "eos_token_id")}, decoder_start_token_id=0)
    full = tmp_path / "t5_full"
    T5ForConditionalGeneration(config).save_pretrained(full)
    AutoTokenizer.from_pretrained(run_dir / "t5").save_pretrained(full)  # tokenizer beside the weights
    # as hub ByT5 checkpoints have it: the tokenizer class recorded in the model's config.json only
    tok_cfg = json.loads((full / "tokenizer_config.json").read_text())
    cls = tok_cfg.pop("tokenizer_class")
    (full / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (full / "config.json").write_text(json.dumps({**json.loads((full / "config.json").read_text()),
                                                  "tokenizer_class": cls}))
    out = tmp_path / "pipe"
    subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run_dir / 'run'}", f"--out={out}",
                    f"--vae={run_dir / 'vae'}", f"--text-encoder={full}"], check=True)
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert not list((out / "tokenizer").glob("*.safetensors")) and not list((out / "tokenizer").glob("*.bin"))
    pipe = CogVideoXPipeline.from_pretrained(out)
    assert not any(n.startswith("decoder.") for n in pipe.text_encoder.state_dict())
    embeds, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False, max_sequence_length=8)
    assert embeds.shape == (1, 8, config.d_model)
    assert type(pipe.tokenizer).__name__ == cls == "ByT5Tokenizer"  # not T5Tokenizer's unknown tokens
    assert pipe.tokenizer("a cat").input_ids == AutoTokenizer.from_pretrained(run_dir / "t5")("a cat").input_ids


def test_a_partial_scheduler_config_reads_as_diffusers_reads_it(tmp_path):
    """A hand-written scheduler_config.json that leaves keys out gets diffusers' defaults for them (no zero-SNR
    rescale, SNR shift 3), as CogVideoXPipeline reads it; another scheduler class is refused."""
    from diffusers import CogVideoXDDIMScheduler

    from cogvx_ds.sample import training_settings

    folder = tmp_path / "pipe" / "scheduler"
    folder.mkdir(parents=True)
    config = {"_class_name": "CogVideoXDDIMScheduler", "prediction_type": "v_prediction", "snr_shift_scale": 1.0,
              "timestep_spacing": "trailing"}
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    _, schedule = training_settings(tmp_path / "pipe")
    want = CogVideoXDDIMScheduler.from_config(config).alphas_cumprod.double()
    assert want[-1] > 0  # no zero-terminal-SNR rescale by default
    torch.testing.assert_close(schedule.alphas_cumprod.double(), want, rtol=1e-6, atol=1e-9)
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match="_class_name 'DDIMScheduler'"):
        training_settings(tmp_path / "pipe")
    for key, value in (("timestep_spacing", "leading"), ("set_alpha_to_one", False), ("steps_offset", 1)):
        (folder / "scheduler_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):  # the pipeline would step through other timesteps
            training_settings(tmp_path / "pipe")
    no_spacing = {k: v for k, v in config.items() if k != "timestep_spacing"}  # diffusers' default: leading
    (folder / "scheduler_config.json").write_text(json.dumps(no_spacing))
    with pytest.raises(ValueError, match="'timestep_spacing': 'leading'"):
        training_settings(tmp_path / "pipe")
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "trained_betas": [0.001] * 1000}))
    with pytest.raises(ValueError, match="trained_betas"):
        training_settings(tmp_path / "pipe")
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "CogVideoXDPMScheduler"}))
    with pytest.raises(ValueError, match="prediction_type 'epsilon'"):  # diffusers' default
        training_settings(tmp_path / "pipe")


def test_export_and_sample_refuse_components_that_do_not_fit_the_transformer(run_dir, tmp_path):
    """A VAE with other latent channels (or temporal compression) or a text encoder of another width: export
    exited 0 and wrote a pipeline that could not decode, and sampling ran every step before the VAE refused the
    latents (or failed at step 1 with oneDNN's "could not create a primitive descriptor"). Both now say which
    argument does not fit, before loading weights or writing anything."""
    vae8 = tmp_path / "vae8"
    shutil.copytree(run_dir / "vae", vae8)
    config = json.loads((vae8 / "config.json").read_text())
    (vae8 / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    wide = tmp_path / "t5wide"
    shutil.copytree(run_dir / "t5", wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "d_model": 2 * config["d_model"]}))
    for vae, t5, message in ((vae8, run_dir / "t5", "latent_channels = 8"), (run_dir / "vae", wide, "-wide")):
        proc = subprocess.run([sys.executable, "-m", "cogvx_ds.export", f"--run-dir={run_dir / 'run'}",
                               f"--out={tmp_path / 'o'}", f"--vae={vae}", f"--text-encoder={t5}"],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()
        proc = subprocess.run([sys.executable, "-m", "cogvx_ds.sample", f"--model={run_dir / 'run'}", f"--vae={vae}",
                               f"--text-encoder={t5}", "--prompt=a red circle", f"--out={tmp_path / 's'}",
                               "--height=32", "--width=48", "--steps=1"], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "s").exists()
