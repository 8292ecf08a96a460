"""Trainer pieces that need no process group: which checkpoints a save prunes, what train.init_from names."""

from cogvx_ds.train.trainer import prunable_checkpoints


def _folders(root, *names):
    for n in names:
        (root / n).mkdir(parents=True)


def test_pruning_keeps_the_checkpoint_just_written_and_later_folders(tmp_path):
    _folders(tmp_path, "step00000002", "step00000004", "step00000006", "step00000010")  # 10: a killed save's
    (tmp_path / "latest").write_text("step00000006")
    # keep_last=1 after writing step 6 (a resume that went back to 4): sorting by name deleted step 6 itself
    assert prunable_checkpoints(tmp_path, 6, 1) == ["step00000002", "step00000004"]
    assert prunable_checkpoints(tmp_path, 6, 2) == ["step00000002"]
    assert prunable_checkpoints(tmp_path, 6, 3) == []


def test_pruning_orders_by_step_number_not_by_name(tmp_path):
    _folders(tmp_path, "step999", "step1000", "step1001", "stepwise")  # names whose order differs from the steps'
    (tmp_path / "step0500").write_text("a file, not a checkpoint")
    assert prunable_checkpoints(tmp_path, 1001, 2) == ["step999"]


def test_init_from_is_checked_and_named(tmp_path):
    import pytest

    from cogvx_ds.train.trainer import init_source

    with pytest.raises(FileNotFoundError, match="train.init_from: .* does not exist"):
        init_source(str(tmp_path / "nowhere"))
    run = tmp_path / "run"  # a stage stopped before final_model/: its DeepSpeed checkpoints are no SAT file
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    (run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run / "checkpoints" / "step00000002" / "trainer_state.json").write_text("{}")
    for path in (run, run / "checkpoints"):
        with pytest.raises(ValueError, match="without final_model/.*cogvx_ds.export"):
            init_source(str(path))
    with pytest.raises(ValueError, match=f"--run-dir {run} --checkpoint step00000002 "):  # one checkpoint folder
        init_source(str(run / "checkpoints" / "step00000002"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.init_from: .* has no config.json"):
        init_source(str(tmp_path / "empty"))
    (run / "final_model").mkdir()
    (run / "final_model" / "config.json").write_text("{}")
    assert init_source(str(run)) == ("diffusers", run / "final_model")
    (tmp_path / "x.pt").touch()
    assert init_source(str(tmp_path / "x.pt")) == ("sat", tmp_path / "x.pt")


def test_a_ds_config_value_the_yaml_decides_is_not_silently_replaced(tmp_path):
    import json

    import pytest

    from cogvx_ds.config import load_config
    from cogvx_ds.train.ds_config import build_ds_config

    ds = tmp_path / "ds.json"

    def build(doc, *overrides):
        ds.write_text(json.dumps(doc))
        return build_ds_config(load_config("tiny", [f"train.ds_config={ds}", "train.zero_stage=2", *overrides]))

    zero = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="gradient_clipping = 0.5 but train.grad_clip = 1.0"):
        build({**zero, "gradient_clipping": 0.5})
    with pytest.raises(ValueError, match="'optimizer' section would be ignored"):
        build({**zero, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}})
    with pytest.raises(ValueError, match="bf16.enabled = true but train.precision = fp32"):
        build({**zero, "bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 8 but train.micro_batch_size = 2"):
        build({**zero, "train_micro_batch_size_per_gpu": 8})
    # train_batch_size (samples per optimizer step) is checked when the world size is known; "auto" (configs written
    # for other trainers) is left to the run, for it and the keys above
    ds.write_text(json.dumps({**zero, "train_batch_size": 64}))
    cfg = load_config("tiny", [f"train.ds_config={ds}", "train.zero_stage=2", "parallel.sequence_parallel=2",
                               "train.gradient_accumulation_steps=2"])
    with pytest.raises(ValueError, match=r"train_batch_size = 64 but .* = 2 x 2 x 2 = 8 samples"):
        build_ds_config(cfg, world_size=4)  # DP 2 x SP 2
    assert "train_batch_size" not in build_ds_config(cfg)  # world unknown: not checked, and DeepSpeed derives it
    ds.write_text(json.dumps({**zero, "train_batch_size": 8}))
    assert "train_batch_size" not in build_ds_config(cfg, world_size=4)
    auto_doc = {**zero, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
    auto = build(auto_doc)
    assert auto["train_micro_batch_size_per_gpu"] == 2 and auto["gradient_clipping"] == 1.0
    assert auto["bf16"]["enabled"] is False  # train.precision = fp32
    ds.write_text(json.dumps(auto_doc))
    assert "train_batch_size" not in build_ds_config(cfg, world_size=4)  # "auto" with the world size known
    ds.write_text(json.dumps({**zero, "train_batch_size": "8"}))
    with pytest.raises(ValueError, match="train_batch_size = '8' but .* = 8 samples"):  # a string is not the number
        build_ds_config(cfg, world_size=4)
    # "auto" where this trainer fills nothing in fails here, not in every rank after launch
    with pytest.raises(ValueError, match='zero_optimization.reduce_bucket_size = "auto" is filled in only for'):
        build({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    with pytest.raises(ValueError, match="sets ZeRO stage auto"):
        build({"zero_optimization": {"stage": "auto"}})
    # the file's own precision settings survive (they were replaced by ours wholesale)
    got = build({**zero, "fp16": {"hysteresis": 4, "initial_scale_power": 12}, "gradient_clipping": 1.0},
                "train.precision=fp16")
    assert got["fp16"] == {"initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 4, "enabled": True}


def test_print_config_checks_the_ds_config_before_any_launch(tmp_path, capsys, monkeypatch):
    """launch/_train_common.sh runs --print-config before starting processes: a missing ds_config, or one whose
    ZeRO stage disagrees with train.zero_stage, used to pass it and fail in every rank after launch."""
    from pathlib import Path

    from cogvx_ds.train import __main__ as train_cli

    zero2 = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"
    assert train_cli.main(["--config", "tiny", f"train.ds_config={tmp_path / 'nope.json'}", "--print-config"]) == 2
    assert "train.ds_config" in capsys.readouterr().err
    assert train_cli.main(["--config", "tiny", f"train.ds_config={zero2}", "--print-config"]) == 2
    assert "sets ZeRO stage 2 but train.zero_stage = 3" in capsys.readouterr().err
    assert train_cli.main(["--config", "tiny", f"train.ds_config={zero2}", "train.zero_stage=2", "--print-config"]) == 0
    # the launch's world size reaches the train_batch_size check (micro 2 x accumulation 1 x DP 4 = 8 samples)
    batch = tmp_path / "batch.json"
    batch.write_text('{"zero_optimization": {"stage": 3}, "train_batch_size": 16}')
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_cli.main(["--config", "tiny", f"train.ds_config={batch}", "--print-config"]) == 2
    assert "train_batch_size = 16 but" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_cli.main(["--config", "tiny", f"train.ds_config={batch}", "--print-config"]) == 2
    batch.write_text('{"zero_optimization": {"stage": 3}, "train_batch_size": 8}')
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_cli.main(["--config", "tiny", f"train.ds_config={batch}", "--print-config"]) == 0


def test_a_ds_config_without_a_zero_section_gets_the_yamls_stage(tmp_path):
    import json

    from cogvx_ds.config import load_config
    from cogvx_ds.train.ds_config import build_ds_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"wall_clock_breakdown": False}))  # a KeyError traceback before
    got = build_ds_config(load_config("tiny", [f"train.ds_config={ds}"]))
    assert got["zero_optimization"] == {"stage": 3} and got["wall_clock_breakdown"] is False


def test_atomic_writes_and_checkpoints_are_flushed_to_disk(tmp_path, monkeypatch):
    """A rename is not ordered against a machine crash: atomic_write flushes the data before renaming and the
    folder after, and fsync_tree (what every rank runs on its checkpoint before `latest` names it) flushes every
    file and folder of the checkpoint."""
    import os

    from cogvx_ds import utils

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    target = tmp_path / "ckpt" / "latest"
    utils.atomic_write_text(target, "step00000002")
    assert target.read_text() == "step00000002"
    tmp_name, folder = synced
    assert os.path.basename(tmp_name).startswith(".latest.tmp-") and folder == str(tmp_path / "ckpt")
    synced.clear()
    (tmp_path / "ckpt" / "step2" / "zero").mkdir(parents=True)
    (tmp_path / "ckpt" / "step2" / "zero" / "a.pt").write_bytes(b"x")
    (tmp_path / "ckpt" / "step2" / "b.pt").write_bytes(b"y")
    utils.fsync_tree(tmp_path / "ckpt" / "step2")
    step = tmp_path / "ckpt" / "step2"
    assert sorted(synced) == sorted(map(str, [step, step / "b.pt", step / "zero", step / "zero" / "a.pt"]))


def test_fsync_tree_skips_a_file_renamed_away_while_it_walks(tmp_path, monkeypatch):
    """Rank 0 writes trainer_state.json through a temp file beside what other ranks walk: a temp file that is
    listed, then renamed before it is opened, is skipped (it crashed that rank with FileNotFoundError)."""
    import os

    from cogvx_ds import utils

    (tmp_path / ".trainer_state.json.tmp-host-1").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"x")
    (tmp_path / "zz").mkdir()
    (tmp_path / "zz" / "optim.pt").write_bytes(b"y")
    real = utils.fsync_path
    synced = []

    def renamed_meanwhile(path):
        if ".tmp-" in str(path):
            raise FileNotFoundError(path)
        real(path)
        synced.append(os.path.relpath(path, tmp_path))

    monkeypatch.setattr(utils, "fsync_path", renamed_meanwhile)
    utils.fsync_tree(tmp_path)  # no error, and the walk goes on past the vanished file
    assert sorted(synced) == [".", "model.pt", "zz", os.path.join("zz", "optim.pt")]
