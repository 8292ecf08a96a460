"""Config loading, overrides and validation: every rule fails with a message naming the field."""

import dataclasses

import pytest

from cogvx_ds.config import Config, ConfigError, load_config, save_config, validate, video_tokens


def _cfg(*overrides):
    return load_config("tiny", list(overrides))


def test_packaged_configs_load_and_validate():
    for name in ("tiny", "model/tiny", "model/2b", "model/5b"):
        validate(load_config(name))
    big = load_config("model/5b")
    assert big.model.num_layers == 42 and big.model.inner_dim == 3072
    two = load_config("model/2b")
    assert two.model.inner_dim == 1920
    # each family's released latent scale (its VAE's scaling_factor) and SNR shift, also under a stage config
    assert (two.data.latent_scale, two.diffusion.snr_shift_scale) == (1.15258426, 3.0)
    assert (big.data.latent_scale, big.diffusion.snr_shift_scale) == (0.7, 1.0)
    from cogvx_ds.config import _deep_merge, from_dict, load_yaml_dict

    staged = from_dict(_deep_merge(load_yaml_dict("model/5b"), load_yaml_dict("stages/hq_finetune")))
    assert (staged.data.latent_scale, staged.diffusion.snr_shift_scale) == (0.7, 1.0)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = _cfg("model.num_layers=3", "train.lr=3e-4", "parallel.tensor_parallel=2", "data.shards=[a.tar, b.tar]",
               "train.ema_decay=null")
    assert cfg.model.num_layers == 3 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.shards == ["a.tar", "b.tar"] and cfg.train.ema_decay is None
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_include_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("include: [model/tiny]\ntrain:\n  lr: 0.5\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\ntrain:\n  max_steps: 7\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.train.lr, cfg.train.max_steps, cfg.model.num_layers) == (0.5, 7, 2)


@pytest.mark.parametrize("override,needle", [
    ("model.num_layerz=3", "unknown config key 'model.num_layerz' (did you mean 'model.num_layers'?)"),
    ("model.num_layers=three", "model.num_layers: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("model.use_rotary_positional_embeddings=1", "expected true/false"),
    ("nosection", "must look like section.key=value"),
])
def test_bad_keys_and_types(override, needle):
    with pytest.raises(ConfigError) as e:
        _cfg(override)
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


RULES = [
    (["parallel.tensor_parallel=3"], None, "model.num_attention_heads = 4: must be divisible by parallel.tensor_parallel"),
    (["parallel.sequence_parallel=8"], None, "model.num_attention_heads = 4: must be divisible"),
    (["model.hidden_size=100"], None, "model.hidden_size = 100: must equal model.num_attention_heads x"),
    (["data.num_frames=8"], None, "data.num_frames = 8: pixel frames must be 4k+1"),
    (["data.height=72"], None, "data.height = 72: must be a positive multiple of 16"),
    (["data.width=40"], None, "data.width = 40: must be a positive multiple of 16"),
    (["parallel.tensor_parallel=2"], 3, "must divide the world size (3 processes)"),
    (["parallel.sequence_parallel=4", "data.num_frames=1", "data.height=16", "data.width=48"], None,
     "parallel.sequence_parallel = 4: must not exceed the video token count (3"),
    (["model.attention_head_dim=24", "model.hidden_size=null"], None, "model.attention_head_dim = 24: must be divisible by 16"),
    (["diffusion.beta_start=0.5"], None, "diffusion.beta_start/beta_end"),
    (["diffusion.prediction_type=sample"], None, "diffusion.prediction_type = 'sample'"),
    (["diffusion.caption_dropout=1.5"], None, "diffusion.caption_dropout = 1.5"),
    (["train.precision=fp8"], None, "train.precision = 'fp8'"),
    (["train.zero_stage=4"], None, "train.zero_stage = 4"),
    (["train.lr=0"], None, "train.lr = 0.0: must be positive"),
    (["train.micro_batch_size=0"], None, "train.micro_batch_size = 0: must be positive"),
    (["train.ema_decay=1.0"], None, "train.ema_decay = 1.0"),
    (["model.out_channels=8"], None, "model.out_channels = 8: must equal model.in_channels"),
    (["parallel.backend=mpi"], None, "parallel.backend = 'mpi'"),
    (["train.peak_tflops=0"], None, "train.peak_tflops = 0.0: must be positive"),
    (["train.profile_steps=[3,2]"], None, "train.profile_steps = [3, 2]: must be [first, last]"),
    (["train.profile_steps=[5]"], None, "train.profile_steps = [5]"),
    (["train.max_steps=10", "train.profile_steps=[5,11]"], None, "<= train.max_steps (10)"),
    (["train.profile_ranks=[4]"], 4, "train.profile_ranks = [4]: ranks must be below the world size (4"),
    (["train.profile_ranks=[]"], None, "train.profile_ranks = []: must be a non-empty list"),
]


@pytest.mark.parametrize("overrides,world,needle", RULES, ids=[r[2][:40] for r in RULES])
def test_each_rule_names_its_field(overrides, world, needle):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world)
    assert needle in str(e.value)


def test_valid_parallel_layouts_pass():
    validate(_cfg("parallel.tensor_parallel=2", "parallel.sequence_parallel=2"), world_size=8)
    cfg = Config()
    assert video_tokens(cfg.model, 49, 480, 720) == 13 * 30 * 45 == 17550
    validate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sequence_parallel=2)), world_size=16)


def test_cli_prints_the_resolved_config_before_data_exists_and_refuses_bad_values(capsys):
    import yaml

    from cogvx_ds.train.__main__ import main

    assert main(["--config", "model/tiny", "model.cpu_linear=aten", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["cpu_linear"] == "aten" and printed["data"]["shards"] == []
    assert main(["--config", "model/tiny"]) == 2  # training itself needs shards
    assert "data.shards" in capsys.readouterr().err
    assert main(["--config", "model/tiny", "model.cpu_linear=mkl", "--print-config"]) == 2
    assert "model.cpu_linear = 'mkl'" in capsys.readouterr().err


@pytest.mark.parametrize("override,field", [("train.grad_clip=-1", "train.grad_clip"),
                                            ("train.weight_decay=-0.1", "train.weight_decay"),
                                            ("parallel.timeout_minutes=0", "parallel.timeout_minutes")])
def test_numbers_that_would_silently_mean_something_else_are_refused(override, field):
    """A negative grad_clip meant no clipping, a negative weight decay grew the weights, a zero timeout failed
    every collective."""
    with pytest.raises(ConfigError, match=field):
        validate(load_config("tiny", [override]))
