"""cogvx_ds.utils.tune_malloc: freed activation memory stays in the process instead of being page-faulted back in
every step (glibc; each case runs in its own process, since mallopt is process-wide)."""

import os
import subprocess
import sys

import pytest

from cogvx_ds.utils import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="tune_malloc only acts on glibc")

# Minor page faults per training step of a small DiT (2 layers, width 256, 784 tokens), after a warm-up step.
PROBE = """
import resource, torch
from cogvx_ds.utils import tune_malloc
tuned = tune_malloc()
from cogvx_ds.config import ModelConfig
from cogvx_ds.models import CogVideoXTransformer
torch.manual_seed(0)
m = CogVideoXTransformer.from_config(ModelConfig(
    num_attention_heads=4, attention_head_dim=64, num_layers=2, in_channels=16, out_channels=16, time_embed_dim=128,
    text_embed_dim=64, max_text_seq_length=16, sample_frames=9, sample_height=32, sample_width=32,
    use_rotary_positional_embeddings=True))
x, text, t = torch.randn(1, 3, 16, 32, 32), torch.randn(1, 16, 64), torch.tensor([500.0])
def step():
    m(x, text, t).square().mean().backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("COGVX_DS_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "OMP_NUM_THREADS": "2", **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_malloc_cuts_the_page_faults_of_a_training_step():
    """Observed: 830-1,060 faults per step tuned; 5,900-8,000 with glibc's defaults in most runs, but in about one
    run of six glibc happens to keep the memory itself (1,600), so the default side gets up to three tries."""
    tuned, faults = _probe()
    assert tuned
    default_faults = []
    for _ in range(3):
        untouched, n = _probe(COGVX_DS_MALLOC="default")
        assert not untouched
        default_faults.append(n)
        if faults < n / 3:
            break
    assert faults < max(default_faults) / 3, (faults, default_faults)


@pytest.mark.parametrize("env,wins", [({"MALLOC_TRIM_THRESHOLD_": "1000000"}, True),
                                      ({"MALLOC_MMAP_MAX_": "0"}, True),
                                      ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=65536"},
                                       True),
                                      ({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, False)],
                         ids=["trim_threshold", "mmap_max", "GLIBC_TUNABLES", "unrelated_settings"])
def test_the_users_malloc_settings_win(env, wins):
    """The user's own value of what tune_malloc sets wins; malloc settings that do not conflict leave it on."""
    tuned, _ = _probe(**env)
    assert tuned != wins
