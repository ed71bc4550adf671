"""malloc.retain_freed_memory: training steps stop page-faulting once memory is kept in the process."""
import json
import subprocess
import sys

import pytest

STEP_FAULTS = r"""
import json, resource, sys, torch
from wavenet_ae import malloc
from wavenet_ae.config import preset
from wavenet_ae.model import WaveNetAE
from wavenet_ae.train import make_optimizer
did = malloc.retain_freed_memory() if sys.argv[1] == "retain" else "default"
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


def _step_faults(mode: str) -> tuple[str, list[int]]:
    r = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["did"], out["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retained_memory_makes_steady_state_steps_fault_free():
    _, default = _step_faults("default")
    did, retained = _step_faults("retain")
    assert did == "retain"
    steady = lambda f: sorted(f[3:])[len(f[3:]) // 2]  # median over steps 4-8
    # by default glibc hands freed blocks back to the kernel and every step touches fresh pages again
    assert steady(default) > 1000, default
    assert steady(retained) < 100, retained
