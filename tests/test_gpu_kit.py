"""The GPU check kit (scripts/gpu_check.sh, scripts/gpu_wheels.sh) stays wired on machines without a GPU:
its dry run runs every step that needs no GPU and lists the GPU steps; its result parsing and resume
verdicts are checked on synthetic inputs."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "wheels", "build", "cuda_tests", "nccl_cli", "nccl_collectives", "gen_speed", "data_speed",
         "train_speed", "resume")


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _kit()


def test_dry_run_lists_every_step_and_collects_the_gpu_tests(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for name in STEPS:
        assert re.search(rf"^  STEP {name} +timeout +\d+ s", out, re.M), f"step {name} not listed:\n{out[-3000:]}"
    n = int(re.search(r"collected (\d+) CUDA tests", out).group(1))
    assert n > 0
    assert "setup.py build_ext --inplace" in out and "WAVENET_AE_FORCE_CUDA=1" in out
    assert "pytest -m cuda" in out
    assert "torch.distributed.run --standalone --nproc_per_node=1 -m wavenet_ae.train" in out
    assert "--device cuda" in out
    assert re.search(r"DRY RUN: \d+ checks ok, 0 failed", out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and summary["cuda_tests_collected"] == n
    assert [s["name"] for s in summary["plan"]] == list(STEPS)
    assert all(c["ok"] for c in summary["checks"])
    assert sum(s["expect"] for s in summary["plan"]) <= summary["budget_s"] <= 480 - 20
    assert (tmp_path / "gpu_check.log").stat().st_size > 0


def _ckpt(seed=0, step=10, pos="p", bump=None):
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(4, 3, generator=g)}}}
    if bump:
        model["w"] = model["w"] + bump
    return {"step": step, "model": model, "optimizer": opt, "data_position": [pos]}


def test_compare_states_and_resume_verdicts():
    a = _ckpt()
    same = gc.compare_states(a, _ckpt())
    assert same["bit_exact"] and same["n_differ"] == 0 and same["n_tensors"] == 4
    near = gc.compare_states(a, _ckpt(bump=1e-6))
    far = gc.compare_states(a, _ckpt(bump=1e-2))
    assert not near["bit_exact"] and near["model_equal"] is False and near["optimizer_equal"] is True
    assert near["worst"] == "model.w" and 0 < near["max_rel_diff"] < far["max_rel_diff"]
    assert gc.resume_verdict(same, same).startswith("bit-exact; two uninterrupted runs are bit-identical")
    assert gc.resume_verdict(near, same).startswith("NOT EXACT")          # A == A2 but resumed B differs
    assert gc.resume_verdict(near, near).startswith("only close")         # as far as a second plain run
    assert gc.resume_verdict(far, near).startswith("DIFFERS more")
    moved = gc.compare_states(a, _ckpt(pos="q"))
    assert gc.resume_verdict(moved, near).startswith("DIFFERS: the data positions differ")
    assert gc.resume_verdict(gc.compare_states(a, _ckpt(step=9)), same).startswith("DIFFERS: final steps")


def test_resume_is_sized_to_the_budget():
    assert gc.resume_steps(None, 150) == gc.RESUME_DEFAULT_STEPS
    assert gc.resume_steps(0.02, 150) == int((150 - 45) / (0.02 * 2 * 3))
    assert gc.resume_steps(10.0, 150) == 30 and gc.resume_steps(1e-4, 150) == 3000
    p = gc.resume_plan(200)
    assert p["sigint_at"] % p["every"] and p["every"] < p["sigint_at"] < p["steps"]


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str], tag="py3-none-any") -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *[f"Requires-Dist: {r}" for r in requires]]) + "\n\nlong description\nRequires-Dist: nope\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_requirement_closure(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "WHEELS", {"soundfile": "1.0", "cffi": "2.0"})
    _fake_wheel(tmp_path, "soundfile", "1.0", ["cffi>=1.0", "numpy", "standard-aifc; python_version >= '3.13'",
                                               "sphinx; extra == 'docs'"])
    assert gc.check_wheels(tmp_path) == ["cffi==2.0 missing"]
    _fake_wheel(tmp_path, "cffi", "2.0", ["pycparser; implementation_name != 'PyPy'"])
    assert gc.check_wheels(tmp_path) == ["cffi needs pycparser, which is neither carried nor on the device"]
    _fake_wheel(tmp_path, "extra_pkg", "1.0", [], tag="cp311-cp311-manylinux_2_17_x86_64")
    problems = gc.check_wheels(tmp_path)
    assert any("extra_pkg-1.0-cp311" in p and "not in the list" in p for p in problems)
    assert any("not for CPython 3.12" in p for p in problems)


def test_error_line_skips_torchrun_boilerplate():
    text = """[rank0]: Traceback (most recent call last):
RuntimeError: No backend type associated with device type cpu
E1130 04:40:00 torch/distributed/elastic/multiprocessing/api.py: failed (exitcode: 1)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""
    assert "No backend type associated with device type cpu" in gc.error_line(text)
    assert "error_file" not in gc.error_line(text)


def test_benchmarks_reject_bad_arguments():
    for argv in (["benchmarks/gen_speed.py", "--engines", "cuda,fortran", "--check-args"],
                 ["benchmarks/train_speed.py", "--configs", "cuda:paper:bf16:8", "--modes", "fastest",
                  "--check-args"]):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "unknown" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(not any((ROOT / ".whl").glob("*.whl")), reason="no .whl/: run scripts/gpu_wheels.sh")
def test_downloaded_wheels_are_the_pinned_closure():
    assert gc.check_wheels(ROOT / ".whl") == []
