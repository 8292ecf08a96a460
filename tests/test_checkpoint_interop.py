"""Weight interop: save_diffusers -> diffusers, sharded safetensors, SAT -> ours, and the errors on bad files."""

import argparse
import dataclasses
import json
import shutil

import pytest
import torch
from dit_helpers import CONFIGS, SIZES, make_inputs, make_reference, reference_forward_backward, rel_err
from safetensors.torch import load_file, save_file

from cogvx_ds.checkpoint.diffusers_io import WEIGHTS_NAME
from cogvx_ds.checkpoint.layout import StateDictError
from cogvx_ds.checkpoint.sat import UnsafeCheckpointError, diffusers_to_sat, sat_to_diffusers
from cogvx_ds.config import ModelConfig
from cogvx_ds.models import CogVideoXTransformer

TOL = 1e-5


def _out(model, kind, size=SIZES[1]):
    x, text, t, _ = make_inputs(kind, size)
    with torch.no_grad():
        return model(x, text, t)


def test_save_diffusers_loads_in_diffusers_with_same_outputs(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    ours = CogVideoXTransformer.from_config(ModelConfig(**CONFIGS["5b"], seed=3))
    with torch.no_grad():  # make every tensor non-trivial, including the zero-initialised ones
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.save_diffusers(tmp_path / "export")
    theirs = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "export").eval()
    x, text, t, probe = make_inputs("5b", SIZES[0])
    ref = reference_forward_backward(theirs, "5b", x, text, t, probe)[0]
    assert rel_err(_out(ours, "5b", SIZES[0]), ref) < TOL


def test_sharded_checkpoints_both_ways(tmp_path):
    ref = make_reference("2b")
    ref.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    assert (tmp_path / "theirs" / f"{WEIGHTS_NAME}.index.json").is_file()
    ours = CogVideoXTransformer.from_diffusers(tmp_path / "theirs")
    expected = _out(ours, "2b")

    ours.save_diffusers(tmp_path / "ours", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours" / f"{WEIGHTS_NAME}.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from diffusers import CogVideoXTransformer3DModel

    reloaded = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "ours")
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    assert rel_err(_out(CogVideoXTransformer.from_diffusers(tmp_path / "ours"), "2b"), expected) == 0
    # saving other weights into the same folder as one file leaves no stale shards or index behind
    other = CogVideoXTransformer.from_diffusers(tmp_path / "ours")
    with torch.no_grad():
        other.proj_out.weight.add_(1.0)
    other.save_diffusers(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", WEIGHTS_NAME]
    reread = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "ours").state_dict()["proj_out.weight"]
    torch.testing.assert_close(reread, ref.state_dict()["proj_out.weight"] + 1.0, rtol=0, atol=0)
    # two weight files holding the same key, without an index: refused, not silently merged
    shutil.copy(tmp_path / "ours" / WEIGHTS_NAME, tmp_path / "ours" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ValueError, match="is in both diffusion_pytorch_model.fp16.safetensors and"):
        CogVideoXTransformer.from_diffusers(tmp_path / "ours")


@pytest.mark.parametrize("kind", ["2b", "5b"])
def test_sat_checkpoint_loads_with_same_outputs(kind, tmp_path):
    ref = make_reference(kind)
    sd = ref.state_dict()
    sat = diffusers_to_sat(sd)
    assert any(k.endswith("attention.query_key_value.weight") for k in sat)
    assert any("adaLN_modulations.0.1.weight" in k for k in sat)
    assert sat_to_diffusers(sat).keys() == sd.keys()
    if kind == "2b":  # the released 2B file carries its fixed sin-cos table; its presence selects sin-cos
        sat["model.diffusion_model.mixins.pos_embed.pos_embedding"] = torch.zeros(1, 10, 64)
    torch.save({"module": sat, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "mp_rank_00_model_states.pt")
    cfg = ModelConfig(**CONFIGS[kind])
    ours = CogVideoXTransformer.from_sat(tmp_path / "mp_rank_00_model_states.pt", config=cfg)
    inferred = CogVideoXTransformer.from_sat(tmp_path)  # a folder; sizes and position type read off the file
    assert inferred.config.use_rotary_positional_embeddings == (kind == "5b")
    x, text, t, probe = make_inputs(kind, SIZES[0])
    expected = reference_forward_backward(ref, kind, x, text, t, probe)[0]
    assert rel_err(_out(ours, kind, SIZES[0]), expected) < TOL
    assert rel_err(_out(inferred, kind, SIZES[0]), expected) < TOL


def test_sat_adaln_chunk_order():
    """SAT's 12 chunks: vision (attn shift/scale/gate, mlp shift/scale/gate), then text (same six)."""
    w = torch.arange(12.0).repeat_interleave(2)[:, None]  # chunk c holds value c
    out = sat_to_diffusers({"model.diffusion_model.mixins.adaln_layer.adaLN_modulations.0.1.weight": w})
    assert out["transformer_blocks.0.norm1.linear.weight"][::2, 0].tolist() == [0, 1, 2, 6, 7, 8]
    assert out["transformer_blocks.0.norm2.linear.weight"][::2, 0].tolist() == [3, 4, 5, 9, 10, 11]


def test_sat_names_and_layouts_written_by_hand():
    """The SAT side written out by hand (the released CogVideoX SAT files' names and shapes, here at the tiny 5B-style
    size), not through diffusers_to_sat: every tensor lands where diffusers keeps it, q/k/v split in that order, the
    MLP's two matrices not swapped. (The round trip above would not see a rename made wrongly in both directions.)"""
    d, t, h, ff = 64, 32, 16, 256  # width, time embedding, head dim, MLP hidden
    layer = {"input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
             "post_attention_layernorm.weight": (d,), "post_attention_layernorm.bias": (d,),
             "attention.query_key_value.weight": (3 * d, d), "attention.query_key_value.bias": (3 * d,),
             "attention.dense.weight": (d, d), "attention.dense.bias": (d,),
             "mlp.dense_h_to_4h.weight": (ff, d), "mlp.dense_h_to_4h.bias": (ff,),
             "mlp.dense_4h_to_h.weight": (d, ff), "mlp.dense_4h_to_h.bias": (d,)}
    mixin = {"adaLN_modulations.{i}.1.weight": (12 * d, t), "adaLN_modulations.{i}.1.bias": (12 * d,),
             "query_layernorm_list.{i}.weight": (h,), "query_layernorm_list.{i}.bias": (h,),
             "key_layernorm_list.{i}.weight": (h,), "key_layernorm_list.{i}.bias": (h,)}
    shapes = {"time_embed.0.weight": (t, d), "time_embed.0.bias": (t,), "time_embed.2.weight": (t, t),
              "time_embed.2.bias": (t,), "mixins.patch_embed.proj.weight": (d, 4, 2, 2), "mixins.patch_embed.proj.bias": (d,),
              "mixins.patch_embed.text_proj.weight": (d, 24), "mixins.patch_embed.text_proj.bias": (d,),
              "transformer.final_layernorm.weight": (d,), "transformer.final_layernorm.bias": (d,),
              "mixins.final_layer.norm_final.weight": (d,), "mixins.final_layer.norm_final.bias": (d,),
              "mixins.final_layer.adaLN_modulation.1.weight": (2 * d, t),
              "mixins.final_layer.adaLN_modulation.1.bias": (2 * d,),
              "mixins.final_layer.linear.weight": (16, d), "mixins.final_layer.linear.bias": (16,)}
    for i in range(2):
        shapes.update({f"transformer.layers.{i}.{k}": v for k, v in layer.items()})
        shapes.update({"mixins.adaln_layer." + k.format(i=i): v for k, v in mixin.items()})
    g = torch.Generator().manual_seed(0)
    sat = {"model.diffusion_model." + k: torch.randn(v, generator=g) for k, v in shapes.items()}
    out = sat_to_diffusers(sat)
    ref = make_reference("5b").state_dict()
    assert out.keys() == ref.keys() and all(out[k].shape == ref[k].shape for k in ref)

    def sat_of(name):
        return sat["model.diffusion_model." + name]

    qkv = sat_of("transformer.layers.1.attention.query_key_value.weight")
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        assert torch.equal(out[f"transformer_blocks.1.attn1.{name}.weight"], qkv[j * d:(j + 1) * d])
        assert torch.equal(out[f"transformer_blocks.1.attn1.{name}.bias"],
                           sat_of("transformer.layers.1.attention.query_key_value.bias")[j * d:(j + 1) * d])
    for ours, theirs in [("transformer_blocks.1.attn1.to_out.0.weight", "transformer.layers.1.attention.dense.weight"),
                         ("transformer_blocks.1.ff.net.0.proj.weight", "transformer.layers.1.mlp.dense_h_to_4h.weight"),
                         ("transformer_blocks.1.ff.net.2.weight", "transformer.layers.1.mlp.dense_4h_to_h.weight"),
                         ("transformer_blocks.1.norm1.norm.weight", "transformer.layers.1.input_layernorm.weight"),
                         ("transformer_blocks.1.norm2.norm.weight", "transformer.layers.1.post_attention_layernorm.weight"),
                         ("transformer_blocks.1.attn1.norm_q.weight", "mixins.adaln_layer.query_layernorm_list.1.weight"),
                         ("transformer_blocks.1.attn1.norm_k.weight", "mixins.adaln_layer.key_layernorm_list.1.weight"),
                         ("time_embedding.linear_1.weight", "time_embed.0.weight"),
                         ("time_embedding.linear_2.weight", "time_embed.2.weight"),
                         ("patch_embed.proj.weight", "mixins.patch_embed.proj.weight"),
                         ("patch_embed.text_proj.weight", "mixins.patch_embed.text_proj.weight"),
                         ("norm_final.weight", "transformer.final_layernorm.weight"),
                         ("norm_out.norm.weight", "mixins.final_layer.norm_final.weight"),
                         ("norm_out.linear.weight", "mixins.final_layer.adaLN_modulation.1.weight"),
                         ("proj_out.weight", "mixins.final_layer.linear.weight")]:
        assert torch.equal(out[ours], sat_of(theirs)), ours


class Boom:  # stands for an arbitrary object in an untrusted pickle
    pass


def test_sat_pickle_with_objects_needs_explicit_opt_in(tmp_path):
    sat = diffusers_to_sat(make_reference("5b").state_dict())
    torch.save({"module": sat, "extra": Boom()}, tmp_path / "ckpt.pt")
    with pytest.raises(UnsafeCheckpointError, match="allow_unsafe_pickle=True"):
        CogVideoXTransformer.from_sat(tmp_path / "ckpt.pt", config=ModelConfig(**CONFIGS["5b"]))
    model = CogVideoXTransformer.from_sat(tmp_path / "ckpt.pt", config=ModelConfig(**CONFIGS["5b"]),
                                          allow_unsafe_pickle=True)
    assert model.config.num_layers == 2


def test_mismatched_keys_listed_in_one_error(tmp_path):
    make_reference("5b").save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / WEIGHTS_NAME))
    del sd["transformer_blocks.1.attn1.to_k.weight"]
    sd["transformer_blocks.0.extra.weight"] = torch.zeros(3)
    sd["proj_out.bias"] = torch.zeros(5)
    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(StateDictError) as e:
        CogVideoXTransformer.from_diffusers(tmp_path)
    msg = str(e.value)
    assert "missing (1): transformer_blocks.1.attn1.to_k.weight" in msg
    assert "unexpected (1): transformer_blocks.0.extra.weight" in msg
    assert "wrong shape (1): proj_out.bias: expected [16], got [5]" in msg


def test_unsupported_or_missing_diffusers_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CogVideoXTransformer.from_diffusers(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CogVideoXTransformer.from_diffusers(tmp_path)
    make_reference("5b").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, patch_size_t=2)))
    with pytest.raises(ValueError, match="patch_size_t = 2 is not supported"):
        CogVideoXTransformer.from_diffusers(tmp_path / "m")


def test_training_init_from_an_unsafe_sat_pickle_needs_train_allow_unsafe_pickle(tmp_path):
    from cogvx_ds.config import Config, TrainConfig
    from cogvx_ds.train.trainer import init_weights

    ref = make_reference("5b")
    torch.save({"module": diffusers_to_sat(ref.state_dict()), "extra": Boom()}, tmp_path / "ckpt.pt")
    model_cfg = ModelConfig(**CONFIGS["5b"])
    model = CogVideoXTransformer(model_cfg)
    cfg = Config(model=model_cfg, train=TrainConfig(init_from=str(tmp_path / "ckpt.pt")))
    with pytest.raises(UnsafeCheckpointError, match="train.allow_unsafe_pickle=true"):
        init_weights(model, cfg)
    init_weights(model, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, allow_unsafe_pickle=True)))
    want = ref.state_dict()["proj_out.weight"]
    assert torch.equal(model.state_dict()["proj_out.weight"], want)


def test_training_init_from_weights_of_the_other_family_is_refused(tmp_path):
    """CogVideoX-2b weights (sin-cos positions) have the same shapes as a RoPE model's: loading them into a 5B-style
    config would train with other positions and say nothing. The check names the field on both sides."""
    from cogvx_ds.config import Config, TrainConfig
    from cogvx_ds.train.trainer import init_weights

    make_reference("2b").save_pretrained(tmp_path / "2b")
    model_cfg = ModelConfig(**CONFIGS["5b"])
    cfg = Config(model=model_cfg, train=TrainConfig(init_from=str(tmp_path / "2b")))
    with pytest.raises(ValueError, match="use_rotary_positional_embeddings: False there, True here"):
        init_weights(CogVideoXTransformer(model_cfg), cfg)
    two = ModelConfig(**CONFIGS["2b"])
    model = CogVideoXTransformer(two)
    init_weights(model, dataclasses.replace(cfg, model=two))  # the matching family loads
    assert torch.equal(model.state_dict()["proj_out.weight"], make_reference("2b").state_dict()["proj_out.weight"])


def test_sat_checkpoints_of_the_other_position_family_or_learned_positions_are_refused(tmp_path):
    """A 2B-style SAT file (sin-cos table) has a RoPE model's shapes: from_sat(config=5B-style) and training's
    init_from loaded it without a word. RoPE with a trained position table (5B-I2V) loaded as sin-cos, the table
    dropped. Both are refused now, naming the position type."""
    from cogvx_ds.config import Config, TrainConfig
    from cogvx_ds.train.trainer import init_weights

    sat = diffusers_to_sat(make_reference("2b").state_dict())
    sat["model.diffusion_model.mixins.pos_embed.pos_embedding"] = torch.zeros(1, 10, 64)
    torch.save({"module": sat}, tmp_path / "2b.pt")
    rope_cfg = ModelConfig(**CONFIGS["5b"])
    with pytest.raises(ValueError, match="uses a sin-cos position table, but use_rotary_positional_embeddings = True"):
        CogVideoXTransformer.from_sat(tmp_path / "2b.pt", config=rope_cfg)
    cfg = Config(model=rope_cfg, train=TrainConfig(init_from=str(tmp_path / "2b.pt")))
    with pytest.raises(ValueError, match="train.init_from .*2b.pt: the checkpoint uses a sin-cos position table"):
        init_weights(CogVideoXTransformer(rope_cfg), cfg)
    CogVideoXTransformer.from_sat(tmp_path / "2b.pt", config=ModelConfig(**CONFIGS["2b"]))  # the matching family
    sat5 = diffusers_to_sat(make_reference("5b").state_dict())
    sat5["model.diffusion_model.mixins.pos_embed.freqs_sin"] = torch.zeros(10, 32)
    sat5["model.diffusion_model.mixins.pos_embed.pos_embedding"] = torch.zeros(1, 10, 64)
    torch.save({"module": sat5}, tmp_path / "i2v.pt")
    with pytest.raises(ValueError, match="learned positional embeddings"):
        CogVideoXTransformer.from_sat(tmp_path / "i2v.pt")


def test_a_sat_folder_loads_the_iteration_its_latest_names(tmp_path):
    """SAT saves <dir>/<iteration>/mp_rank_00_model_states.pt and a `latest` file; sorting the paths as text took
    500/ over 1500/."""
    from cogvx_ds.checkpoint.sat import read_sat_file

    for it in (500, 1000, 1500):
        (tmp_path / str(it)).mkdir()
        torch.save({"module": {"w": torch.full((2,), float(it))}}, tmp_path / str(it) / "mp_rank_00_model_states.pt")
    assert read_sat_file(tmp_path)["w"][0].item() == 1500  # no latest: the highest iteration
    (tmp_path / "latest").write_text("1000\n")
    assert read_sat_file(tmp_path)["w"][0].item() == 1000
