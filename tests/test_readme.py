"""Doc-test: every command of the README's tutorial runs (with fewer training steps)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tutorial_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Tutorial", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip().startswith(("python -m wavenet_ae", "torchrun"))]


def test_the_tutorial_has_every_verb():
    verbs = " ".join(tutorial_commands())
    for verb in ("wavenet_ae.train", "wavenet_ae.generate", "wavenet_ae.encode", "wavenet_ae.evaluate",
                 "torchrun", "--speaker", "--data"):
        assert verb in verbs


def test_tutorial_commands_run(tmp_path, synth_corpus):
    (tmp_path / "wavenet_ae").symlink_to(ROOT / "wavenet_ae")
    synth_corpus(n_speakers=2, per_speaker=3, seconds=(1.0, 1.5)).rename(tmp_path / "my_corpus")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    steps: dict[str, int] = {}
    for cmd in tutorial_commands():
        args = shlex.split(cmd)
        if "--max-steps" in args:                        # keep training short, resumes still longer
            run = args[args.index("--run-dir") + 1]
            steps[run] = steps.get(run, 0) + 3
            args[args.index("--max-steps") + 1] = str(steps[run])
        if args[0] == "python":
            args[0] = sys.executable
        else:                                            # torchrun, from this interpreter
            args = [sys.executable, "-m", "torch.distributed.run", "--master_port",
                    str(29600 + os.getpid() % 1000)] + args[1:]
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
    assert (tmp_path / "resynth.wav").stat().st_size > 1000
    assert (tmp_path / "converted.wav").stat().st_size > 1000
    assert (tmp_path / "latents.npy").exists()
    assert (tmp_path / "runs/demo/report/report.md").exists()
    assert (tmp_path / "runs/demo/loss.png").exists()
