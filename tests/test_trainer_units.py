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
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.init_from: .* has no config.json"):
        init_source(str(tmp_path / "empty"))
    (run / "final_model").mkdir()
    (run / "final_model" / "config.json").write_text("{}")
    assert init_source(str(run)) == ("diffusers", run / "final_model")
    (tmp_path / "x.pt").touch()
    assert init_source(str(tmp_path / "x.pt")) == ("sat", tmp_path / "x.pt")
