"""Analytic FLOP and memory model of our expert transformer (`cogvx_ds.models.CogVideoXTransformer`).

    python -m cogvx_ds.perf_model                    # the 2B / 5B table at 49x480x720
    python -m cogvx_ds.perf_model --frames 49 --height 768 --width 1360
    python -m cogvx_ds.perf_model --model 5b --gpus 16 --sp 4 --no-ckpt --recompute-gelu   # your own layout

What it models, for one ModelConfig and one clip shape:
- parameters: an inventory of every weight with its shape and how TP splits it (checked against the real
  model built on the meta device, exactly);
- FLOPs per training sample: the matmuls (linear layers, the patch convolution and attention), forward and
  backward (checked against torch's FlopCounterMode on a tiny model, exactly);
- activation memory: what autograd keeps alive for backward, per layer and in total, with and without activation
  checkpointing, for any SP and TP degree. The counts follow *our* block tensor by tensor (see
  `_layer_saved`), not an idealised transformer;
- per-GPU memory for DP x SP x TP with ZeRO stage 0-3 and CPU offload: bf16 parameters and gradients, fp32 master
  weights and Adam moments (16 bytes per parameter before partitioning), ZeRO-3's persistent small parameters and
  reduce bucket, plus activations.

Conventions: bytes are bytes (GiB = 2**30); micro-batch 1 unless given; "d" is the model width.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from cogvx_ds.config import ModelConfig, load_config

GiB = 2**30


# --------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Clip:
    """A video clip in pixels; latents are 8x smaller in space and 4k+1 -> k+1 in time (the CogVideoX VAE)."""

    frames: int = 49
    height: int = 480
    width: int = 720
    vae_spatial: int = 8

    def tokens(self, m: ModelConfig) -> tuple[int, int]:
        """(text tokens, video tokens) of one sample."""
        f = (self.frames - 1) // m.temporal_compression_ratio + 1
        h = self.height // self.vae_spatial // m.patch_size
        w = self.width // self.vae_spatial // m.patch_size
        return m.max_text_seq_length, f * h * w


# --------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None = None  # the dim TP splits (Megatron column: 0, row: 1), None when replicated

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numel_per_tp_rank(self, tp: int) -> int:
        return self.numel // tp if self.tp_dim is not None else self.numel


def param_inventory(m: ModelConfig) -> list[Param]:
    """Every parameter of CogVideoXTransformer, named as in `named_parameters()`, full (TP=1) shapes."""
    d, t, hd = m.inner_dim, m.time_embed_dim, m.attention_head_dim
    pc = m.patch_size**2
    ps = [Param("patch_embed.proj.weight", (d, m.in_channels, m.patch_size, m.patch_size)),
          Param("patch_embed.proj.bias", (d,)),
          Param("patch_embed.text_proj.weight", (d, m.text_embed_dim)), Param("patch_embed.text_proj.bias", (d,)),
          Param("time_embedding.linear_1.weight", (t, d)), Param("time_embedding.linear_1.bias", (t,)),
          Param("time_embedding.linear_2.weight", (t, t)), Param("time_embedding.linear_2.bias", (t,))]
    for i in range(m.num_layers):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            ps += [Param(b + norm + ".linear.weight", (6 * d, t)), Param(b + norm + ".linear.bias", (6 * d,))]
            if m.norm_elementwise_affine:
                ps += [Param(b + norm + ".norm.weight", (d,)), Param(b + norm + ".norm.bias", (d,))]
        ps.append(Param(b + "attn.qkv.weight", (3 * d, d), 0))
        if m.attention_bias:
            ps.append(Param(b + "attn.qkv.bias", (3 * d,), 0))
        for qk in ("norm_q", "norm_k"):
            ps += [Param(b + f"attn.{qk}.weight", (hd,)), Param(b + f"attn.{qk}.bias", (hd,))]
        ps += [Param(b + "attn.proj.weight", (d, d), 1), Param(b + "attn.proj.bias", (d,)),
               Param(b + "mlp.fc1.weight", (4 * d, d), 0), Param(b + "mlp.fc1.bias", (4 * d,), 0),
               Param(b + "mlp.fc2.weight", (d, 4 * d), 1), Param(b + "mlp.fc2.bias", (d,))]
    if m.norm_elementwise_affine:
        ps += [Param("norm_final.weight", (d,)), Param("norm_final.bias", (d,))]
    ps += [Param("norm_out.linear.weight", (2 * d, t)), Param("norm_out.linear.bias", (2 * d,))]
    if m.norm_elementwise_affine:
        ps += [Param("norm_out.norm.weight", (d,)), Param("norm_out.norm.bias", (d,))]
    ps += [Param("proj_out.weight", (pc * m.out_channels, d)), Param("proj_out.bias", (pc * m.out_channels,))]
    return ps


def param_count(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of the whole model (tp=1) or held by one TP rank."""
    return sum(p.numel_per_tp_rank(tp) for p in param_inventory(m))


# --------------------------------------------------------------------------------------------------- FLOPs
def flops_per_sample(m: ModelConfig, n_text: int, n_video: int, recompute: bool = False) -> dict:
    """Matmul FLOPs (multiply-add = 2) of one sample: forward, backward, total.

    Backward is twice the forward, except for the three layers whose inputs need no gradient (patch
    convolution, text projection and the first timestep linear: weight gradient only). Attention backward is
    counted as four queries x S matmuls (twice the forward); real flash kernels also recompute Q K^T. With
    activation checkpointing (`recompute`) the blocks run their forward once more during backward. The last block
    runs the text tokens as keys and values only (see ExpertBlock): their queries, output projection and MLP are
    not computed, nor the final layers' text rows. These are the model's FLOPs, whatever the layout (as MFU counts
    them): under Ulysses SP the last block's text queries still travel and are dropped after attention, and the
    small replicated linears (timestep MLP, AdaLN) run on every SP rank; neither is counted.
    """
    d, t, p2 = m.inner_dim, m.time_embed_dim, m.patch_size**2
    s = n_text + n_video
    no_input_grad = 2 * n_video * m.in_channels * p2 * d + 2 * n_text * m.text_embed_dim * d + 2 * d * t
    other = 2 * t * t + 2 * t * 2 * d + 2 * n_video * d * p2 * m.out_channels  # time linear_2, norm_out, proj_out

    def layer(tokens: int, queries: int) -> int:
        # qkv on the whole stream; proj and MLP on `tokens`; the two AdaLN linears; Q K^T and P V for `queries`
        return 2 * s * d * 3 * d + 2 * tokens * d * (d + 8 * d) + 2 * 2 * t * 6 * d + 2 * 2 * queries * s * d

    blocks = (m.num_layers - 1) * layer(s, s) + layer(n_video, n_video)
    attention = 2 * 2 * s * d * ((m.num_layers - 1) * s + n_video)
    forward = no_input_grad + other + blocks
    backward = no_input_grad + 2 * (other + blocks)
    extra = blocks if recompute else 0
    return {"forward": forward, "backward": backward, "recompute": extra, "total": forward + backward + extra,
            "attention_fraction": 3 * attention / (forward + backward)}


# --------------------------------------------------------------------------------------------------- activations
def _layer_saved(m: ModelConfig, n_text: int, n_video: int, sp: int, tp: int, dtype_bytes: int,
                 attention: str = "sdpa", recompute_gelu: bool = False, last: bool = False) -> float:
    """Bytes one ExpertBlock leaves for its backward on one rank (micro-batch 1), tensor by tensor
    (`recompute_gelu`: `model.recompute_gelu`, the GELU output rebuilt in backward instead of kept).

    A block works on one [text; video] stream: under Ulysses SP each rank holds 1/SP of the text tokens and 1/SP
    of the video tokens and runs the token-local work on them, and attention on the full sequence with
    heads/(TP*SP). TP splits the heads and the MLP hidden; the stream, the LayerNorms and the inputs of the QKV /
    fc1 projections stay whole on every TP rank (Megatron sequence parallelism is not used). The `last` block
    runs the text tokens as keys and values only: everything after attention, and without SP the queries, cover
    the video tokens alone.
    """
    e, f32 = dtype_bytes, 4
    d, dl, heads = m.inner_dim, m.inner_dim // tp, m.num_attention_heads // tp
    tok = n_text / sp + n_video // sp  # tokens this rank runs token-local work on (text split as evenly as it goes)
    out = n_video // sp if last else tok  # tokens after attention
    seq = (n_text + n_video) / sp  # attention: full sequence, 1/SP of the heads
    rows = n_video if last and sp == 1 else tok  # query rows (under SP: this rank's share of them)
    # whole width: the block input (the first fused AdaLN saves x and the statistics, not the normalised output) and
    # the QKV input; after attention the mid-block stream (the second AdaLN's input), the fc1 input, the attention
    # projection and fc2 outputs (the gated residuals save them)
    full = 2 * d * tok + 4 * d * out
    # QKV output (the QK-norm input; v is a view of it), fc1 and GELU outputs
    split = 3 * dl * tok + (4 if recompute_gelu else 8) * dl * out
    stats = (2 * (tok + out) + 2 * heads * (tok + rows)) * f32  # mean/rstd of the two AdaLN norms and the QK norms
    if attention == "tiled":  # the CPU tiled kernel (models.dit.attention): its own per-head copies of q (scaled), k
        # and v, its output, the probabilities (heads/SP x its query rows x all tokens), and the proj input (a
        # re-laid-out copy; under SP the re-joined output, of which the last block's proj input is a view)
        q_rows = rows * sp if sp > 1 else rows  # under SP the kernel sees every rank's queries
        saved = 2 * dl * (seq + q_rows / sp) * e + heads * q_rows * seq * e + dl * (out if sp == 1 else tok) * e
    elif sp == 1:  # SDPA saves q and k (rotated, or the QK-norm outputs), the qkv view v, and its output (= proj input)
        # (on CPUs the fused QK norm writes q head-major, SDPA's output follows it and the projection's input is a
        # token-major copy: dl x tok more, not counted; on GPUs q stays token-major)
        saved = dl * (2 * rows + tok) * e + heads * rows * f32
    else:  # Ulysses: the received q/k/v buffer (SDPA reads views of it) and SDPA's output over seq x heads/SP,
        # plus the re-joined output for proj (the last block's proj input is a view of it); the rotated q, k before
        # the all-to-all are not kept
        saved = 4 * dl * seq * e + heads * seq * f32 + dl * tok * e
    return (full + split) * e + stats + saved


def activation_bytes(m: ModelConfig, n_text: int, n_video: int, sp: int = 1, tp: int = 1, dtype_bytes: int = 2,
                     checkpointing: bool = False, micro_batch: int = 1, attention: str = "sdpa",
                     recompute_gelu: bool = False) -> dict:
    """Activation memory of one rank: `stored` is what the forward leaves alive for backward (what a
    measurement right after forward sees, the output excluded); `peak` adds, with checkpointing, one block's
    recomputed activations during backward. `attention`: "sdpa" (flash: on GPUs, and on CPUs outside
    the tiled kernel's range) or "tiled" (the CPU kernel that keeps the attention probabilities, taken by
    `model.cpu_attention=auto` for bfloat16 up to 3,072 tokens and float32 up to 1,536: see
    `cogvx_ds.models.dit.attention.use_tiled`). `recompute_gelu` (`model.recompute_gelu`) has no effect with
    checkpointing, as in the model."""
    e, d = dtype_bytes, m.inner_dim
    tok = n_text / sp + n_video // sp  # this rank's [text; video] stream
    gelu = recompute_gelu and not checkpointing
    layer = _layer_saved(m, n_text, n_video, sp, tp, e, attention, gelu)
    last = _layer_saved(m, n_text, n_video, sp, tp, e, attention, gelu, last=True)
    block_input = tok * d * e  # the [text; video] stream entering a block
    # outside the blocks: the patch-matmul input (the patchified copy of all latents; an SP rank's slice is a view
    # of it) and the text-projection input (a view of the whole text input); then on the video tokens the last
    # block returns: norm_final's input, norm_out's input (= norm_final's output), proj_out's input, LayerNorm stats
    inputs = (n_video * m.in_channels * m.patch_size**2 + n_text * m.text_embed_dim) * e
    video = n_video // sp
    top = inputs + 3 * video * d * e + 2 * 2 * video * 4
    if checkpointing:  # each block keeps only its input stream
        stored = m.num_layers * block_input + top
        peak = stored + max(layer, last)
    else:
        stored = peak = (m.num_layers - 1) * layer + last + top
    return {"per_layer": layer * micro_batch, "block_input": block_input * micro_batch,
            "stored": stored * micro_batch, "peak": peak * micro_batch}


# --------------------------------------------------------------------------------------------------- per GPU
@dataclass
class Layout:
    dp: int = 1
    sp: int = 1
    tp: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False  # fp32 master + Adam + gradient partitions in CPU memory
    offload_param: bool = False  # ZeRO-3 bf16 parameter partitions in CPU memory
    checkpointing: bool = True
    recompute_gelu: bool = False  # model.recompute_gelu (matters without checkpointing)
    micro_batch: int = 1
    param_bytes: int = 2  # bf16 parameters and gradients; 4 for fp32 training (then no separate master copy)
    persistence_threshold: int = 1_000_000  # ZeRO-3: parameters smaller than this stay gathered on every rank
    reduce_bucket_size: int = 500_000_000  # ZeRO gradient bucket, elements (ds_configs/zero3_bf16.json)
    # ZeRO-3's gathered working set (ds_configs/zero3_bf16.json, which states DeepSpeed's defaults): see
    # zero3_gathered_numel
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000

    @property
    def gpus(self) -> int:
        return self.dp * self.sp * self.tp

    def describe(self) -> str:
        off = "+offload(opt" + ("+param" if self.offload_param else "") + ")" if self.offload_optimizer else ""
        gelu = " +GELU recompute" if self.recompute_gelu and not self.checkpointing else ""
        return (f"DP{self.dp}xSP{self.sp}xTP{self.tp} ZeRO-{self.zero_stage}{off} "
                f"ckpt {'on' if self.checkpointing else 'off'}{gelu}")


def model_state_bytes(m: ModelConfig, lay: Layout) -> dict:
    """Per-rank bytes of parameters, gradients, fp32 master weights and Adam moments, partitioned over DP x SP
    (the ZeRO group), after TP has split the large matrices. Padding to equal partitions is included.

    `device` is what stays in GPU memory, `host` what offload moves to CPU memory (per rank)."""
    z = lay.dp * lay.sp
    inv = param_inventory(m)
    n = sum(p.numel_per_tp_rank(lay.tp) for p in inv)
    n_part = sum(math.ceil(p.numel_per_tp_rank(lay.tp) / z) for p in inv)  # ZeRO pads each parameter
    pb = lay.param_bytes
    master = 4 if pb != 4 else 0  # fp32 training updates the parameters themselves
    st = lay.zero_stage
    params = pb * (n_part if st == 3 else n)
    grads = pb * (n_part if st >= 2 else n)
    optim = (master + 8) * (n_part if st >= 1 else n)
    persistent = pb * sum(p.numel_per_tp_rank(lay.tp) for p in inv
                          if p.numel_per_tp_rank(lay.tp) < lay.persistence_threshold) if st == 3 else 0
    host = 0
    if lay.offload_optimizer:  # plus the fp32 gradient partition DeepSpeed keeps beside them on the CPU
        host += optim + grads + 4 * (n_part if st >= 2 else n)
        optim = grads = 0
    if lay.offload_param and st == 3:
        host += params
        params = 0
    return {"params": params, "grads": grads, "optimizer": optim, "persistent": persistent,
            "model_states": params + grads + optim, "host": host, "numel_per_rank": n_part if st == 3 else n}


def zero3_gathered_numel(block: int, total: int, lay: Layout) -> int:
    """Elements of the (TP-split) non-persistent block parameters ZeRO-3 holds gathered at once, at its peak: the
    turn from forward to backward, where the last blocks of the forward are the first of the backward (with or
    without activation checkpointing). DeepSpeed keeps a used parameter gathered while its next use is within
    stage3_max_reuse_distance elements, and lets stage3_max_live_parameters stay gathered; the larger of the two
    decides, in whole blocks (at least one, at most all). Measured on a 42-block model with the thresholds in
    blocks of it (benchmarks/memory.py --worker gathered, tests/test_perf_model.py): live/reuse 7.56/7.56 -> 8
    blocks, 3/3 -> 3, 4/12 -> 12, 12/0.5 -> 12, 1/1 -> 1, each within 0.11 blocks (the non-block parameters). For
    the 5B model at the shipped 1e9 / 1e9: 8 of its blocks, 1.97 GiB in bf16."""
    window = max(lay.max_live_parameters, lay.max_reuse_distance)
    return min(total, max(1, math.ceil(window / block)) * block)


def memory_per_gpu(m: ModelConfig, clip: Clip, lay: Layout) -> dict:
    """GPU bytes per rank: model states + ZeRO buffers + activations (peak, backward included)."""
    n_text, n_video = clip.tokens(m)
    states = model_state_bytes(m, lay)
    # ZeRO-3 working set: the gathered (full, TP-split) parameters (zero3_gathered_numel), plus the gradient reduce
    # bucket (one bf16 buffer of reduce_bucket_size elements).
    inv = param_inventory(m)
    gathers = [p for p in inv if p.name.startswith("blocks.") and p.numel_per_tp_rank(lay.tp) >= lay.persistence_threshold]
    block = sum(p.numel_per_tp_rank(lay.tp) for p in gathers if p.name.startswith("blocks.0."))
    blocks_total = sum(p.numel_per_tp_rank(lay.tp) for p in gathers)
    gathered = zero3_gathered_numel(block, blocks_total, lay) * lay.param_bytes if lay.zero_stage == 3 else 0
    bucket = min(lay.reduce_bucket_size, states["numel_per_rank"] * lay.dp * lay.sp) * lay.param_bytes \
        if lay.zero_stage >= 2 else 0
    act = activation_bytes(m, n_text, n_video, lay.sp, lay.tp, 2 if lay.param_bytes == 2 else 4,
                           lay.checkpointing, lay.micro_batch, recompute_gelu=lay.recompute_gelu)
    buffers = states["persistent"] + gathered + bucket
    total = states["model_states"] + buffers + act["peak"]
    return {**states, "buffers": buffers, "activations": act["peak"], "total": total}


# --------------------------------------------------------------------------------------------------- table
SIZES = {"2B": "model/2b", "5B": "model/5b"}
DEFAULT_LAYOUTS = [  # (gpus, dp, sp, tp, checkpointing, offload, recompute_gelu)
    (8, 8, 1, 1, True, False, False), (8, 8, 1, 1, True, True, False), (8, 4, 2, 1, False, False, False),
    (8, 2, 4, 1, False, False, False), (8, 2, 4, 1, False, False, True), (8, 2, 2, 2, False, False, False),
    (64, 64, 1, 1, True, False, False), (64, 16, 4, 1, False, False, False),
]


def model_rows(clip: Clip) -> list[dict]:
    rows = []
    for name, path in SIZES.items():
        m = load_config(path).model
        n_text, n_video = clip.tokens(m)
        fl = flops_per_sample(m, n_text, n_video)
        fl_ckpt = flops_per_sample(m, n_text, n_video, recompute=True)
        off = activation_bytes(m, n_text, n_video, checkpointing=False)
        gelu = activation_bytes(m, n_text, n_video, checkpointing=False, recompute_gelu=True)
        on = activation_bytes(m, n_text, n_video, checkpointing=True)
        rows.append({"model": name, "params": param_count(m), "text_tokens": n_text, "video_tokens": n_video,
                     "tflops_fwd": fl["forward"] / 1e12, "tflops_train": fl["total"] / 1e12,
                     "tflops_train_ckpt": fl_ckpt["total"] / 1e12, "attention_fraction": fl["attention_fraction"],
                     "act_layer_gib": off["per_layer"] / GiB, "act_gib": off["peak"] / GiB,
                     "act_gelu_gib": gelu["peak"] / GiB,
                     "act_ckpt_gib": on["peak"] / GiB})
    return rows


def layout_rows(clip: Clip, layouts=DEFAULT_LAYOUTS, sizes=("2B", "5B")) -> list[dict]:
    rows = []
    for name in sizes:
        m = load_config(SIZES[name]).model
        for gpus, dp, sp, tp, ckpt, offload, gelu in layouts:
            lay = Layout(dp=dp, sp=sp, tp=tp, checkpointing=ckpt, offload_optimizer=offload, recompute_gelu=gelu)
            assert lay.gpus == gpus
            if m.num_attention_heads % (sp * tp):
                continue
            mem = memory_per_gpu(m, clip, lay)
            rows.append({"model": name, "gpus": gpus, "layout": lay.describe(),
                         **{k: mem[k] / GiB for k in ("model_states", "buffers", "activations", "total", "host")}})
    return rows


def markdown(clip: Clip, layouts=DEFAULT_LAYOUTS) -> str:
    out = [f"Per sample at {clip.frames}x{clip.height}x{clip.width} (micro-batch 1, bf16 activations):", "",
           "| model | params | tokens (text + video) | TFLOP fwd | TFLOP fwd+bwd | with ckpt recompute | attention share "
           "| activations / layer | activations, no ckpt | no ckpt, GELU recomputed | activations, ckpt |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in model_rows(clip):
        out.append(f"| {r['model']} | {r['params'] / 1e9:.3f} B | {r['text_tokens']} + {r['video_tokens']} = "
                   f"{r['text_tokens'] + r['video_tokens']:,} | {r['tflops_fwd']:.0f} | {r['tflops_train']:.0f} | "
                   f"{r['tflops_train_ckpt']:.0f} | {100 * r['attention_fraction']:.0f}% | "
                   f"{r['act_layer_gib']:.2f} GiB | {r['act_gib']:.1f} GiB | {r['act_gelu_gib']:.1f} GiB | "
                   f"{r['act_ckpt_gib']:.1f} GiB |")
    out += ["", "Memory per GPU (GiB; bf16 params + grads, fp32 master + Adam, ZeRO over DP x SP):", "",
            "| model | GPUs | layout | model states | ZeRO buffers | activations (peak) | total per GPU | "
            "CPU per rank |", "|---|---|---|---|---|---|---|---|"]
    for r in layout_rows(clip, layouts):
        out.append(f"| {r['model']} | {r['gpus']} | {r['layout']} | {r['model_states']:.1f} | {r['buffers']:.1f} | "
                   f"{r['activations']:.1f} | **{r['total']:.1f}** | {r['host']:.1f} |")
    return "\n".join(out)


def layout_report(m: ModelConfig, name: str, clip: Clip, lay: Layout) -> str:
    """One model on one layout: the per-GPU breakdown as lines of text."""
    mem = memory_per_gpu(m, clip, lay)
    n_text, n_video = clip.tokens(m)
    lines = [f"{name} on {lay.gpus} GPUs, {lay.describe()}, micro-batch {lay.micro_batch}, "
             f"{clip.frames}x{clip.height}x{clip.width} ({n_text} text + {n_video} video tokens), GiB per GPU:"]
    for key, what in [("model_states", "model states (params, grads, master, Adam)"), ("buffers", "ZeRO buffers"),
                      ("activations", "activations (peak)"), ("total", "total"), ("host", "CPU memory per rank")]:
        lines.append(f"  {what:<44} {mem[key] / GiB:8.1f}")
    return "\n".join(lines)


def _custom_layout(ap: argparse.ArgumentParser, args, name: str, m: ModelConfig) -> Layout:
    """The CLI's own-layout options as a Layout; what cannot run is an argparse error that names the flag."""
    sp, tp = (1 if v is None else v for v in (args.sp, args.tp))
    gpus = sp * tp if args.gpus is None else args.gpus
    micro = 1 if args.micro_batch is None else args.micro_batch
    for flag, value in (("--sp", sp), ("--tp", tp), ("--gpus", gpus), ("--micro-batch", micro)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    if gpus % (sp * tp):
        ap.error(f"--gpus {gpus} is not a multiple of SP x TP = {sp * tp}")
    if m.num_attention_heads % (sp * tp):
        ap.error(f"{name} has {m.num_attention_heads} heads, which SP x TP = {sp * tp} must divide")
    zero = 3 if args.zero is None else args.zero
    if args.offload == "param" and zero != 3:
        ap.error("--offload param needs ZeRO-3 (--zero 3)")
    return Layout(dp=gpus // (sp * tp), sp=sp, tp=tp, zero_stage=zero, checkpointing=not args.no_ckpt,
                  recompute_gelu=args.recompute_gelu, micro_batch=micro,
                  offload_optimizer=args.offload in ("optimizer", "param"), offload_param=args.offload == "param")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cogvx_ds.perf_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=49, help="clip frames, 4k+1 (default 49)")
    ap.add_argument("--height", type=int, default=480, help="clip height in pixels (default 480)")
    ap.add_argument("--width", type=int, default=720, help="clip width in pixels (default 720)")
    own = ap.add_argument_group("your own layout (any of these prints it instead of the default layouts)")
    own.add_argument("--model", default=None,
                     help="2b, 5b, or a model config (packaged name such as model/tiny, or a YAML path); default 5b")
    own.add_argument("--gpus", type=int, help="GPUs in all (DP = gpus / (SP x TP))")
    own.add_argument("--sp", type=int, default=None, help="Ulysses sequence-parallel degree (default 1)")
    own.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default 1)")
    own.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None, help="ZeRO stage (default 3)")
    own.add_argument("--offload", choices=["none", "optimizer", "param"], default=None,
                     help="ZeRO offload to CPU memory: the optimizer (master, Adam, grads), or that and the "
                          "parameters (ZeRO-3)")
    own.add_argument("--no-ckpt", action="store_true", help="without activation checkpointing")
    own.add_argument("--recompute-gelu", action="store_true", help="model.recompute_gelu (matters without ckpt)")
    own.add_argument("--micro-batch", type=int, default=None, help="samples per GPU per step (default 1)")
    args = ap.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        ap.error(f"--frames must be 4k+1 (1, 5, ..., 49), got {args.frames}")
    for flag, px in (("--height", args.height), ("--width", args.width)):
        if px < 16 or px % 16:
            ap.error(f"{flag} must be a positive multiple of 16 (VAE 8x, patch 2), got {px}")
    clip = Clip(args.frames, args.height, args.width)
    custom = [args.model, args.gpus, args.sp, args.tp, args.zero, args.offload, args.micro_batch]
    if all(v is None for v in custom) and not (args.no_ckpt or args.recompute_gelu):
        print(markdown(clip))
        return 0
    name = args.model or "5b"
    try:
        m = load_config(SIZES.get(name.upper(), name)).model
    except (FileNotFoundError, ValueError) as e:
        ap.error(f"--model {name}: {e} (expected 2b, 5b, a packaged model config such as model/tiny, or a YAML file "
                 "with a model section)")
    lay = _custom_layout(ap, args, name, m)
    print(layout_report(m, name, clip, lay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
