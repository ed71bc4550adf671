"""Doc-test: every command of the README's tutorial runs (with fewer training steps)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def tutorial_steps() -> list[tuple[str, str]]:
    """The tutorial's commands ("cmd", line) and Python snippets ("python", code), in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Tutorial", 1)[1].split("\n## ", 1)[0]
    steps = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S):
        if lang == "python":
            steps.append(("python", body))
        else:
            steps += [("cmd", line.strip()) for line in body.splitlines()
                      if line.strip().startswith(("python -m wavenet_ae", "wavenet-ae ", "torchrun"))]
    return steps


def tutorial_commands() -> list[str]:
    return [s for kind, s in tutorial_steps() if kind == "cmd"]


def test_the_tutorial_has_every_verb():
    verbs = " ".join(s for _, s in tutorial_steps())
    for verb in ("wavenet_ae.train", "wavenet_ae.generate", "wavenet-ae encode", "wavenet_ae.evaluate",
                 "wavenet-ae export", "--format zerospeech", "wavenet_ae.load(", "Upstream(", "torchrun",
                 "--speaker", "--data"):
        assert verb in verbs


def test_tutorial_commands_run(tmp_path, synth_corpus):
    (tmp_path / "wavenet_ae").symlink_to(ROOT / "wavenet_ae")
    synth_corpus(n_speakers=2, per_speaker=3, seconds=(1.0, 1.5)).rename(tmp_path / "my_corpus")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    steps: dict[str, int] = {}
    for kind, cmd in tutorial_steps():
        if kind == "python":
            r = subprocess.run([sys.executable, "-c", cmd], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
            continue
        args = shlex.split(cmd)
        if "--max-steps" in args:                        # keep training short, resumes still longer
            run = args[args.index("--run-dir") + 1]
            steps[run] = steps.get(run, 0) + 3
            args[args.index("--max-steps") + 1] = str(steps[run])
        if args[0] == "python":
            args[0] = sys.executable
        elif args[0] == "wavenet-ae":                    # the console script, else its module
            args[:1] = [shutil.which("wavenet-ae")] if shutil.which("wavenet-ae") else [sys.executable, "-m",
                                                                                          "wavenet_ae.cli"]
        else:                                            # torchrun, from this interpreter
            args = [sys.executable, "-m", "torch.distributed.run", "--master_port",
                    str(29600 + os.getpid() % 1000)] + args[1:]
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
    assert (tmp_path / "resynth.wav").stat().st_size > 1000
    assert (tmp_path / "converted.wav").stat().st_size > 1000
    assert (tmp_path / "latents.npy").exists()
    assert len(list((tmp_path / "latents").rglob("*.npy"))) >= 6          # the corpus, mirrored
    assert (tmp_path / "submission/params.yaml").exists()
    assert (tmp_path / "demo.safetensors").stat().st_size > 1000
    assert (tmp_path / "runs/demo/report/report.html").exists()
    assert (tmp_path / "runs/demo/report/report.md").exists()
    assert (tmp_path / "runs/demo/loss.png").exists()
