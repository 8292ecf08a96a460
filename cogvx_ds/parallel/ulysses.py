"""Ulysses sequence-parallel attention over [text tokens; video tokens].

Each SP rank holds 1/SP of the video tokens and a replica of all text tokens. DeepSpeed's
DistributedAttention all-to-alls the video q/k/v from (local sequence, all heads) to (full sequence, heads/SP);
the replicated text q/k/v are sliced to the same heads locally, so text is never duplicated in the sequence.
The text tokens' attention output (heads/SP on each rank) is all-gathered over heads with a summed gradient,
so every rank keeps an identical replica of the text stream.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.sequence.layer import DistributedAttention

from cogvx_ds.parallel.comm import gather_along_dim


def joint_attention(q_text, k_text, v_text, q_vid, k_vid, v_vid):
    """Full attention over the concatenated sequence; inputs [B, L, heads, d]; returns (text_out, video_out)."""
    n_text = q_text.shape[1]
    q = torch.cat([q_text, q_vid], 1).transpose(1, 2)
    k = torch.cat([k_text, k_vid], 1).transpose(1, 2)
    v = torch.cat([v_text, v_vid], 1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return out[:, :n_text], out[:, n_text:]


class UlyssesJointAttention(torch.nn.Module):
    """`forward(text qkv, local video qkv)` -> (text out replicated, local video out), all [B, L, heads, d]."""

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.dist_attn = DistributedAttention(self._local_attention, group, scatter_idx=2, gather_idx=1)
        self._text_in = None
        self._text_out = None

    def _local_attention(self, q_vid, k_vid, v_vid, *args, **kwargs):
        # Runs between DistributedAttention's all-to-alls: video is now full sequence x heads/SP.
        text_out, video_out = joint_attention(*self._text_in, q_vid, k_vid, v_vid)
        self._text_out = text_out
        return video_out

    def forward(self, q_text, k_text, v_text, q_vid, k_vid, v_vid):
        sp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        heads = q_vid.shape[2]
        if heads % sp:
            raise ValueError(f"{heads} local attention heads cannot be split over {sp} sequence-parallel ranks")
        hs = heads // sp
        self._text_in = tuple(t[:, :, rank * hs:(rank + 1) * hs] for t in (q_text, k_text, v_text))
        video_out = self.dist_attn(q_vid, k_vid, v_vid, 0)
        text_out, self._text_in, self._text_out = self._text_out, None, None
        return gather_along_dim(text_out, dim=2, group=self.group, grad_mode="sum"), video_out
