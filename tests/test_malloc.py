"""malloc.retain_freed_memory: freed memory is reused without page faults, and training steps stop faulting."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")

# Each step holds four blocks a little larger than the last step's, then frees them. By default glibc
# serves blocks above its (dynamic) threshold with fresh mmaps, so every step faults all its pages in;
# with the memory kept, a step reuses the last one's and faults only the growth (4 x 256 KiB).
GROWING_BLOCKS = r"""
import json, resource, sys, torch
from wavenet_ae import malloc
did = malloc.retain_freed_memory() if sys.argv[1] == "retain" else "default"
faults = []
for i in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(10 * 2**18 + i * 2**16) for _ in range(4)]  # 4 x (10 MiB + i x 256 KiB)
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"did": did, "faults": faults}))
"""

TRAINING_STEPS = r"""
import json, resource, sys, torch
from wavenet_ae import malloc
from wavenet_ae.config import preset
from wavenet_ae.model import WaveNetAE
from wavenet_ae.train import make_optimizer
did = malloc.retain_freed_memory()
torch.manual_seed(0)
cfg = preset("tiny")
model = WaveNetAE(cfg.model).train()
opt = make_optimizer(model, cfg)
p, m, B = model.plan(cfg.data.n_win), cfg.model, 2
batch = (torch.randn(B, m.n_in, p.n_frames), torch.randint(0, m.n_quant, (B, p.dec_len)),
         torch.randint(0, m.n_speakers, (B,)))
faults = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss, _ = model.loss(*batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"did": did, "faults": faults}))
"""


def _faults(script: str, *args: str) -> tuple[str, list[int]]:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["did"], out["faults"]


def test_freed_memory_is_reused_without_page_faults():
    _, default = _faults(GROWING_BLOCKS, "default")
    did, retained = _faults(GROWING_BLOCKS, "retain")
    assert did == "retain"
    pages = 4 * 10 * 2**20 // 4096
    # steps 5-8 (the first steps settle the heap)
    assert min(default[4:]) > pages // 2, default  # control: by default every step faults its blocks in
    assert max(retained[4:]) < pages // 10, retained


def test_steady_state_training_steps_do_not_fault():
    did, faults = _faults(TRAINING_STEPS)
    assert did == "retain"
    assert sorted(faults[3:])[2] < 100, faults  # median over steps 4-8
