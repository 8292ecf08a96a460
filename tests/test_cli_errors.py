"""Bad output paths and counts give one-line errors before any work starts, in every CLI that writes."""

import pytest

from cogvx_ds import export, train_vae
from cogvx_ds.train import __main__ as train_cli
from cogvx_ds.utils import out_dir_problem
from data_tools import decode_latents, encode_latents, make_synthetic


def test_out_dir_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    assert out_dir_problem(tmp_path / "file", "--out") == f"--out: {tmp_path / 'file'} is a file, not a folder"
    assert out_dir_problem(tmp_path / "file" / "sub", "--out") == f"--out: {tmp_path / 'file'} is a file, not a folder"
    assert out_dir_problem(tmp_path / "new" / "deeper", "--out") is None
    assert not (tmp_path / "new").exists()  # a check creates nothing: a refused command leaves nothing behind


@pytest.mark.parametrize("tool", ["make_synthetic", "encode_latents", "decode_latents", "train", "train_vae"])
def test_an_output_folder_that_is_a_file_is_refused_up_front(tool, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    argv = {"make_synthetic": ["--out", str(file), "--num-videos", "1"],
            "encode_latents": ["--input", str(file), "--vae", str(file), "--out", str(file)],
            "decode_latents": [str(file), "--vae", str(file), "--out", str(file)],
            "train": ["--config", "model/tiny", f"data.shards=[{file}]", f"train.run_dir={file}/run"],
            "train_vae": ["--run-dir", str(file), "--steps", "1"]}[tool]
    main = {"make_synthetic": make_synthetic.main, "encode_latents": encode_latents.main,
            "decode_latents": decode_latents.main, "train": train_cli.main, "train_vae": train_vae.main}[tool]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None)
    err = capsys.readouterr().err + (rc if isinstance(rc, str) else "")
    assert f"{file} is a file, not a folder" in err


@pytest.mark.parametrize("tool,argv", [
    ("make_synthetic", ["--frames", "4"]),
    ("encode_latents", ["--input", "i", "--vae", "v", "--fps", "-1"]),
    ("decode_latents", ["missing.tar", "--vae", "v"]),
])
def test_a_refused_command_leaves_no_output_folder(tool, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = {"make_synthetic": make_synthetic.main, "encode_latents": encode_latents.main,
            "decode_latents": decode_latents.main}[tool]
    try:
        rc = main([*argv, "--out", "out"])
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None) and not (tmp_path / "out").exists()
    if tool == "encode_latents":  # --finalize only reads
        assert encode_latents.main(["--out", "typo", "--finalize"]) == 1
        assert not (tmp_path / "typo").exists()


def test_print_config_works_whatever_the_run_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train_cli.main(["--config", "model/tiny", f"train.run_dir={tmp_path / 'file'}", "--print-config"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["decode_latents", "x", "--vae", "v", "--out", "o", "--num", "-1"], "--num must be >= 0"),
    (["encode_latents", "--input", "i", "--vae", "v", "--out", "o", "--world-size", "0"], "--world-size must be >= 1"),
    (["encode_latents", "--input", "i", "--vae", "v", "--out", "o", "--decode-workers", "-1"],
     "--decode-workers and --prefetch must be >= 0"),
])
def test_impossible_counts_are_refused(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = {"decode_latents": decode_latents.main, "encode_latents": encode_latents.main}[argv[0]]
    with pytest.raises(SystemExit):
        main(argv[1:])
    assert message in capsys.readouterr().err


def test_export_checkpoint_tag_is_checked_before_launching(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="checkpoints/latest does not exist"):
        export.checkpoint_tag(run, "latest")
    (run / "checkpoints" / "step00000010").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000010\n")
    assert export.checkpoint_tag(run, "latest") == "step00000010"
    with pytest.raises(ValueError, match="step99 does not exist; checkpoints there: step00000010"):
        export.checkpoint_tag(run, "step99")


def test_unfinished_runs_and_missing_shards_are_named_for_the_command(tmp_path):
    """`sample --model <run without final_model/>` says what to do (it said "no config.json"); inspect_shards and
    decode_latents name their own argument, not the training config's data.shards."""
    from cogvx_ds.data.shards import resolve_shards
    from cogvx_ds.sample import load_components

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without final_model/ .*cogvx_ds.export"):
        load_components(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="^shards: shard files not found"):
        resolve_shards([str(tmp_path / "x.tar")], what="shards")
