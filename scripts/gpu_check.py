#!/usr/bin/env python3
"""The GPU check (issue 16): build, test and measure everything CUDA in one device call of <= 8 minutes.

Run it through `scripts/gpu_check.sh`, whose header has the exact device call. The steps run in this
order, each with its own timeout inside one overall budget (--budget, default 450 s, under the call's
480): a step that fails or hangs is recorded (a hung one is killed with its process group) and the next
step runs.

  env               the machine: GPU, compute capability (-> TORCH_CUDA_ARCH_LIST), torch, nvcc, driver
  wheels            pip install --target /tmp/site the wheels carried in .whl/ (scripts/gpu_wheels.sh made
                    them here); imports them and checks their Requires-Dist against what is installed
  build             setup.py build_ext --inplace for this GPU only (all cores, WAVENET_AE_FORCE_CUDA=1),
                    then asserts that every CUDA kernel is registered
  cuda_tests        pytest -m cuda: every test that is skipped without a GPU (tests/conftest.py marks them)
  nccl_cli          torchrun --nproc_per_node=1 -m wavenet_ae.train --device cuda (paper preset) + a resume.
                    NB: at world size 1 train.py creates no process group, so this run checks the torchrun
                    environment and the device handling, not the collectives: the next step does
  nccl_collectives  a 1-rank NCCL process group running train.py's collectives (_vote, the gathers of
                    save()) on the training device, and a DDP training step of the paper model (every
                    parameter and buffer must be on the GPU: NCCL serves CUDA tensors only)
  gen_speed         benchmarks/gen_speed.py: python, cpp and cuda (fp32/fp16/bf16 weights), batch 1..256, paper
  data_speed        benchmarks/data_speed.py: loaders (inline, thread, process) vs the paper step on cuda
  train_speed       benchmarks/train_speed.py: cuda, paper preset, bf16 autocast, batch 8 and 32, reference vs
                    fused (step time, samples/s, peak memory)
  resume            the paper preset on the demo corpus on the GPU (~2 min): two uninterrupted runs and one
                    interrupted by SIGINT and resumed, all to the same step N (N sized from train_speed's step
                    time and the budget left); says whether the resume is bit-exact or only close (and whether
                    two uninterrupted CUDA runs are bit-identical at all)

Results land in --out (default: $OUT, the device tool's folder that comes back): summary.json (every
step: commands, status, seconds, timeout, parsed results; rewritten after each step), gpu_check.log (all
output of all commands), cuda_tests.xml (junit), gen_speed.json, data_speed.json and train_speed.json (rows). The
console gets each step's tail and, last, a summary that fits the tool's 12,000-character output tail.

--dry-run (CI: tests/test_gpu_kit.py) runs every step that needs no GPU and lists the GPU steps with their
commands and timeouts: the env probe; the wheels (present? their Requires-Dist covered by the device's
packages? tree + wheels under the 64 MiB the device tool carries); setup.py still reads the switches the
build sets; `pytest -m cuda --collect-only` collects more than zero tests; the exact arguments of every
train/torchrun command parsed by wavenet_ae.train's and torchrun's own parsers (with the --set keys
checked against the config); each benchmark's exact arguments checked with its --check-args; and the
NCCL probe run for real on the CPU with gloo and the tiny preset.

--cpu-rehearsal runs nccl_cli, nccl_collectives and resume on the CPU (tiny preset, gloo) to check their
orchestration without a GPU: `python3 scripts/gpu_check.py --cpu-rehearsal --only nccl_cli,nccl_collectives,resume
--resume-steps 40 --out /tmp/rehearsal` (about 2 minutes on 2 cores; the resume is bit-exact there).

This module imports only the standard library at the top: it runs before the wheels are installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")                 # where the carried wheels are installed on the device
WORK = Path("/tmp/gpu_check")            # run directories of the training steps
WHEEL_DIR = ROOT / ".whl"
DEFAULT_BUDGET = 450.0                   # seconds; the device call's timeout_s is 480
TREE_LIMIT = 64 * 2**20                  # what the device tool carries (working tree + carried paths)

# What the device lacks for `wavenet_ae` and its tests, pinned to the versions the CPU machines run
# (the CI install of 2026-11). Found by comparing librosa's and soundfile's Requires-Dist (and theirs)
# with the device's package list below; `--check-wheels` re-checks that closure on the downloaded wheels.
WHEELS = {
    "librosa": "0.11.0",
    "soundfile": "0.14.0",     # bundles libsndfile
    "soxr": "1.1.0",
    "audioread": "3.1.0",
    "pooch": "1.9.0",
    "decorator": "5.2.1",
    "platformdirs": "4.14.8",  # pooch
    "cffi": "2.0.0",           # soundfile
    "pycparser": "3.0",        # cffi
}
IMPORTS = ["librosa", "soundfile", "soxr", "audioread", "pooch", "decorator", "platformdirs", "cffi",
           "pycparser"]

# The device's Python packages (the device library's KINDS.md, nvidia-h200, as read on 2026-11-17).
DEVICE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless opt-einsum opt-einsum-fx optax optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil py-cpuinfo pyarrow pybind11 pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentence-transformers sentencepiece setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torch-geometric torchaudio torchdiffeq torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp
""".split())
DEVICE_PYTHON = "3.12"

# the measurements
GEN_ARGS = ["--presets", "paper", "--batches", "1,4,16,64,256", "--engines", "python,cpp,cuda",
            "--cuda-dtypes", "fp32,fp16,bf16", "--seconds", "0.3", "--python-seconds", "0.3", "--repeat", "3",
            "--keep-going"]
DATA_SPEED_ARGS = ["--presets", "paper", "--device", "cuda", "--files", "24", "--batches", "300", "--step-repeat", "5",
                   "--keep-going"]
TRAIN_SPEED_ARGS = ["--configs", "cuda:paper:bf16:8,cuda:paper:bf16:32", "--modes", "reference,fused",
                    "--steps", "10", "--warmup", "3", "--keep-going"]
# the training runs (paper preset, demo corpus)
TRAIN_SEED = 7
TRAIN_DEVICE, TRAIN_PRESET, PROBE = "cuda", "paper", ("nccl", "cuda", "paper")   # --cpu-rehearsal changes them
RESUME_RUNS = 3                          # A, A2 (uninterrupted) and B (SIGINT, resume) run at once
RESUME_DEFAULT_STEPS = 200               # when train_speed gave no step time


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------
# processes: own process group, output to the log, killed on timeout
# ---------------------------------------------------------------------------------------------------

class Log:
    def __init__(self, path: Path | None):
        self.fh = open(path, "a", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        if self.fh:
            with self.lock:
                self.fh.write(text if text.endswith("\n") else text + "\n")
                self.fh.flush()

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.write(text)


class Proc:
    """A child in its own process group; its output (stdout + stderr) is kept and logged line by line."""

    def __init__(self, argv: list[str], env: dict, log: Log, tag: str, cwd: Path = ROOT):
        self.argv, self.tag, self.log = argv, tag, log
        self.lines: list[str] = []
        self.t0 = time.monotonic()
        self.timed_out = False
        log.write(f"[{tag}] $ {shlex.join(argv)}")
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self.log.write(f"[{self.tag}] {line}")

    def poll(self):
        return self.p.poll()

    def wait(self, deadline: float) -> int:
        try:
            rc = self.p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
            rc = 124
        self.thread.join(5)
        self.seconds = time.monotonic() - self.t0
        return rc

    def kill(self) -> None:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.p.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                self.p.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------------------------------
# the context every step sees
# ---------------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, a):
        self.py = a.python
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry = a.dry_run
        self.budget = a.budget
        self.t0 = time.monotonic()
        self.log = Log(self.out / "gpu_check.log")
        self.arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"   # env step replaces it by the GPU's
        self.cuda_home = find_cuda_home()
        self.cores = os.cpu_count() or 1
        self.train_step_s: float | None = None                           # from train_speed, sizes resume
        self.resume_steps: int | None = a.resume_steps
        self.summary: dict = {"dry_run": self.dry, "budget_s": self.budget, "root": str(ROOT),
                              "out": str(self.out), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "steps": {}}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        pp = [str(SITE), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(PYTHONPATH=os.pathsep.join(pp), PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
                   NUMBA_CACHE_DIR="/tmp/numba_cache")
        if self.cuda_home:
            env["CUDA_HOME"] = self.cuda_home
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, argv: list[str], timeout: float, tag: str, **env) -> Proc:
        p = Proc(argv, self.env(**env), self.log, tag)
        p.rc = p.wait(time.monotonic() + timeout)
        return p

    def save_summary(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        os.replace(tmp, self.out / "summary.json")


def find_cuda_home() -> str | None:
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    nvcc = shutil.which("nvcc")
    return str(Path(os.path.realpath(nvcc)).parents[1]) if nvcc else None


def tail(text: str, n: int) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


_BOILERPLATE = re.compile(r"error_file|To enable traceback|ChildFailedError|elastic/errors|^=+$|^\[?\d+\]?:?$|"
                          r"torch\.distributed\.elastic")


def error_line(text: str, n: int = 3) -> str:
    """The most telling lines of a failed command: the last ones that name an error (torchrun's own
    report left out), else its last lines."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _BOILERPLATE.search(ln)]
    hits = [ln for ln in lines if re.search(r"Error|Exception|error:|FAILED|Traceback|assert", ln)
            and not ln.startswith("Traceback")]
    return " | ".join((hits or lines)[-n:])[:700]


def self_cmd(ctx: Ctx, *args: str) -> list[str]:
    return [ctx.py, str(Path(__file__).resolve()), *args]


# ---------------------------------------------------------------------------------------------------
# commands (one definition serves the run, the dry run and the listing)
# ---------------------------------------------------------------------------------------------------

def torchrun(ctx: Ctx, *args: str) -> list[str]:
    return [ctx.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args]


def train_args(run_dir: Path, steps: int, every: int, sets: list[str]) -> list[str]:
    return ["-m", "wavenet_ae.train", "--run-dir", str(run_dir), "--preset", TRAIN_PRESET, "--device", TRAIN_DEVICE,
            "--max-steps", str(steps), "--checkpoint-every", str(every), "--seed", str(TRAIN_SEED),
            "--set", *sets]


def nccl_cli_cmds(ctx: Ctx) -> list[list[str]]:
    d = WORK / "nccl_cli"
    sets = ["log_every=1", "validate_every=2"]
    return [torchrun(ctx, *train_args(d, 4, 2, sets)), torchrun(ctx, *train_args(d, 6, 2, sets))]


def nccl_probe_cmd(ctx: Ctx, backend=None, device=None, preset=None, result=None) -> list[str]:
    backend, device, preset = backend or PROBE[0], device or PROBE[1], preset or PROBE[2]
    result = result or (WORK / "nccl_probe.json")
    return torchrun(ctx, str(Path(__file__).resolve()), "--nccl-probe", "--backend", backend,
                    "--device", device, "--preset", preset, "--result", str(result))


def resume_plan(steps: int) -> dict:
    every = max(5, steps // 3)
    at = steps // 2 + 1
    if at % every == 0:
        at += 1
    sets = ["log_every=5", f"validate_every={max(5, steps // 2)}"]
    dirs = {k: WORK / "resume" / k for k in ("a", "a2", "b")}
    return {"steps": steps, "every": every, "sigint_at": at, "sets": sets, "dirs": dirs,
            "argv": {k: train_args(d, steps, every, sets) for k, d in dirs.items()}}


def tests_cmd(ctx: Ctx, collect: bool = False) -> list[str]:
    a = [ctx.py, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    if collect:
        return a + ["--collect-only", "-q", "tests"]
    a += ["-v", "-rfEs", "--durations=10", f"--junitxml={ctx.out / 'cuda_tests.xml'}"]
    import importlib.util
    if importlib.util.find_spec("pytest_timeout"):
        a.append("--timeout=120")
    return a + ["tests"]


# which ops of the wavenet_ae namespace have a CUDA kernel (asked of the dispatcher, not of the package's
# flags, whose names may change); CPU-only ops are listed, not failed (e.g. linear_cross_entropy)
BUILD_CHECK = """
import torch, wavenet_ae._C as C
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("wavenet_ae::"))
cuda = [n[12:] for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print("wavenet_ae._C", C.__file__.rsplit("/", 1)[-1], "has_cuda", C.has_cuda(), "cpu", C.cpu_capability(),
      "| CUDA kernels:", ", ".join(cuda) or "none", "| without:", ", ".join(n[12:] for n in ops if n[12:] not in cuda))
assert C.has_cuda() and cuda, "the extension has no CUDA kernels"
"""

ENV_PROBE = """
import json, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available(), "cores": __import__("os").cpu_count()}
if d["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, capability="%d.%d" % torch.cuda.get_device_capability(0), sms=p.multi_processor_count,
             memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    try:
        v = torch.cuda.nccl.version()
        d["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:
        d["nccl"] = "unavailable: %s" % e
print("ENV_JSON " + json.dumps(d))
"""


def step_cmds(ctx: Ctx, name: str) -> list[list[str]]:
    return next(st["cmds"] for st in plan(ctx) if st["name"] == name)


def plan(ctx: Ctx) -> list[dict]:
    """Every step: name, timeout, expected seconds (a guess for an H200 + 16 cores), what the dry run checks
    of it, and the commands it runs."""
    rp = resume_plan(RESUME_DEFAULT_STEPS)
    return [
        {"name": "env", "timeout": 30, "expect": 5, "dry": "runs the torch probe",
         "cmds": [[ctx.py, "-c", "<ENV_PROBE>"], ["nvcc", "--version"],
                  ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                   "temperature.gpu,power.draw", "--format=csv"]]},
        {"name": "wheels", "timeout": 60, "expect": 10, "dry": "wheels present, requirements covered, size",
         "cmds": [[ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(SITE), ".whl/*.whl"],
                  self_cmd(ctx, "--check-site")]},
        {"name": "build", "timeout": 240, "expect": 80, "dry": "setup.py still reads these switches",
         "note": "TORCH_CUDA_ARCH_LIST = this GPU's capability (env step), MAX_JOBS = this machine's cores",
         "cmds": [["env", f"TORCH_CUDA_ARCH_LIST={ctx.arch}", f"MAX_JOBS={ctx.cores}",
                   f"CUDA_HOME={ctx.cuda_home}", "WAVENET_AE_FORCE_CUDA=1",
                   ctx.py, "setup.py", "build_ext", "--inplace"],
                  [ctx.py, "-c", "<BUILD_CHECK>"]]},
        {"name": "cuda_tests", "timeout": 150, "expect": 60, "dry": "pytest -m cuda --collect-only: > 0 tests",
         "cmds": [["env", "WAVENET_AE_REQUIRE_EXT=1", *tests_cmd(ctx)]]},
        {"name": "nccl_cli", "timeout": 75, "expect": 30, "dry": "torchrun's and train's parsers, --set keys",
         "cmds": nccl_cli_cmds(ctx)},
        {"name": "nccl_collectives", "timeout": 60, "expect": 20, "dry": "the same probe with gloo on the CPU (tiny)",
         "cmds": [nccl_probe_cmd(ctx)]},
        {"name": "gen_speed", "timeout": 100, "expect": 45, "dry": "these arguments with --check-args",
         "cmds": [[ctx.py, "benchmarks/gen_speed.py", *GEN_ARGS, "--json-out", str(ctx.out / "gen_speed.json")]]},
        {"name": "data_speed", "timeout": 60, "expect": 20, "dry": "these arguments with --check-args",
         "cmds": [[ctx.py, "benchmarks/data_speed.py", *DATA_SPEED_ARGS,
                   "--json-out", str(ctx.out / "data_speed.json")]]},
        {"name": "train_speed", "timeout": 130, "expect": 65, "dry": "these arguments with --check-args",
         "cmds": [[ctx.py, "benchmarks/train_speed.py", *TRAIN_SPEED_ARGS,
                   "--json-out", str(ctx.out / "train_speed.json")]]},
        {"name": "resume", "timeout": 170, "expect": 100, "dry": "train's parser, --set keys",
         "note": f"N steps sized at run time from train_speed's step time and the budget left "
                 f"(shown: N={RESUME_DEFAULT_STEPS}); A and A2 run to N uninterrupted, B gets SIGINT at "
                 f"step >= {rp['sigint_at']} and is resumed with the same command; all three at once",
         "cmds": [[ctx.py, *rp["argv"]["a"]], [ctx.py, *rp["argv"]["a2"]], [ctx.py, *rp["argv"]["b"]],
                  ["kill", "-INT", "<B>"], [ctx.py, *rp["argv"]["b"]],
                  self_cmd(ctx, "--compare-runs", *map(str, rp["dirs"].values()))]},
    ]


# ---------------------------------------------------------------------------------------------------
# steps (real run)
# ---------------------------------------------------------------------------------------------------

def step_env(ctx: Ctx, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    p = ctx.run([ctx.py, "-c", ENV_PROBE], deadline - time.monotonic(), "env")
    res: dict = {"cuda_home": ctx.cuda_home, "cores": ctx.cores}
    m = re.search(r"^ENV_JSON (.*)$", p.text, re.M)
    if m:
        res.update(json.loads(m.group(1)))
    if ctx.cuda_home:
        q = ctx.run([os.path.join(ctx.cuda_home, "bin", "nvcc"), "--version"], 10, "env")
        v = re.search(r"release ([\d.]+)", q.text)
        res["nvcc"] = v.group(1) if v else tail(q.text, 1)
    if shutil.which("nvidia-smi"):
        q = ctx.run(step_cmds(ctx, "env")[2], 10, "env")
        res["nvidia_smi"] = tail(q.text, 2)
    if res.get("capability"):
        ctx.arch = res["capability"]
    res["arch_list"] = ctx.arch
    ok = p.rc == 0 and m is not None
    gpu = res.get("gpu") or "no GPU visible to torch"
    note = (f"{gpu}, cc {res.get('capability', '-')}, torch {res.get('torch')} (CUDA {res.get('torch_cuda')}), "
            f"python {res.get('python')}, nvcc {res.get('nvcc', 'missing')}, {ctx.cores} cores")
    return {"status": "ok" if ok else "failed", "note": note, **res}


def step_wheels(ctx: Ctx, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if not wheels:
        return {"status": "failed", "note": f"no wheels in {WHEEL_DIR}: run scripts/gpu_wheels.sh here and carry "
                                            f"'.whl'"}
    p = ctx.run([ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                 "--upgrade", "--target", str(SITE), *map(str, wheels)], deadline - time.monotonic(), "wheels")
    if p.rc != 0:
        return {"status": "failed", "note": f"pip install rc {p.rc}: {error_line(p.text)}"}
    q = ctx.run(self_cmd(ctx, "--check-site"), deadline - time.monotonic(), "wheels")
    return {"status": "ok" if q.rc == 0 else "failed", "wheels": [w.name for w in wheels],
            "note": tail(q.text, 1) if q.rc == 0 else tail(q.text, 4)}


def step_build(ctx: Ctx, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    if not ctx.cuda_home:
        return {"status": "failed", "note": "no nvcc found (CUDA_HOME, /usr/local/cuda, PATH)"}
    p = ctx.run([ctx.py, "setup.py", "build_ext", "--inplace"], deadline - time.monotonic(), "build",
                TORCH_CUDA_ARCH_LIST=ctx.arch, MAX_JOBS=ctx.cores, WAVENET_AE_FORCE_CUDA=1)
    secs = round(p.seconds, 1)
    if p.rc != 0:
        errs = [ln for ln in p.lines if re.search(r"error|Error", ln)][:8]
        return {"status": "timeout" if p.timed_out else "failed", "build_s": secs,
                "note": (f"rc {p.rc}: " + (" | ".join(errs) or tail(p.text, 3)))[:700]}
    q = ctx.run([ctx.py, "-c", BUILD_CHECK], max(5.0, deadline - time.monotonic()), "build")
    warnings = sum(1 for ln in p.lines if "warning" in ln.lower())
    return {"status": "ok" if q.rc == 0 else "failed", "build_s": secs, "warning_lines": warnings,
            "arch_list": ctx.arch, "max_jobs": ctx.cores,
            "note": f"built in {secs} s for sm_{ctx.arch.replace('.', '')} ({warnings} warning lines); "
                    + tail(q.text, 1)}


def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    res = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skipped_names": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            res[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").strip().splitlines()
                res["failed"].append({"test": name, "message": (msg[0] if msg else "")[:300]})
            elif case.find("skipped") is not None:
                res["skipped_names"].append(name)
    res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    return res


def step_cuda_tests(ctx: Ctx, timeout: float) -> dict:
    xml = ctx.out / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    p = ctx.run(tests_cmd(ctx), timeout, "cuda_tests", WAVENET_AE_REQUIRE_EXT=1)
    res: dict = {"rc": p.rc}
    if xml.exists():
        res.update(parse_junit(xml))
    line = next((ln for ln in reversed(p.lines) if re.search(r"\d+ (passed|failed|error|skipped)", ln)), "")
    res["pytest_summary"] = line.strip("= ")
    if not xml.exists():            # killed (a hang): count the verbose lines, name the test that never ended
        outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", p.text, re.M)
        for k in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            res[k.lower() + "_so_far"] = sum(1 for _, o in outcomes if o == k)
        started = [ln.split()[0] for ln in p.lines if re.match(r"^tests/\S+::\S+", ln)]
        res["failed"] = [{"test": t, "message": o} for t, o in outcomes if o in ("FAILED", "ERROR")]
        if started and started[-1] not in {t for t, _ in outcomes}:
            res["hung_in"] = started[-1]
        res["pytest_summary"] = (f"killed after {p.seconds:.0f} s: {res['passed_so_far']} passed, "
                                 f"{res['failed_so_far']} failed, {res['skipped_so_far']} skipped so far"
                                 + (f"; hung in {res['hung_in']}" if res.get("hung_in") else ""))
    status = "ok" if p.rc == 0 and not res.get("skipped") else ("timeout" if p.timed_out else "failed")
    note = res["pytest_summary"] or tail(p.text, 2)
    if res.get("skipped"):
        note += f" -- {res['skipped']} CUDA tests still skipped on the GPU"
    return {"status": status, "note": note, **res}


def step_nccl_cli(ctx: Ctx, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    shutil.rmtree(WORK / "nccl_cli", ignore_errors=True)
    res: dict = {"world_size_note": "world size 1: train.py's setup_distributed returns before creating a process "
                                    "group, so no collective runs here (nccl_collectives runs them)"}
    for i, argv in enumerate(nccl_cli_cmds(ctx)):
        p = ctx.run(argv, deadline - time.monotonic(), "nccl_cli", OMP_NUM_THREADS=4, NCCL_DEBUG="WARN")
        res[f"run{i}_rc"] = p.rc
        if p.rc != 0:
            return {"status": "timeout" if p.timed_out else "failed", **res,
                    "note": f"run {i} rc {p.rc}: {error_line(p.text)}"}
        if i == 1 and "resumed" not in p.text:
            return {"status": "failed", **res, "note": "the second run did not resume"}
    return {"status": "ok", **res, "note": f"torchrun 1 process, {TRAIN_PRESET}, {TRAIN_DEVICE}: 4 steps, then resumed "
                                           f"to 6 (no process group at world size 1)"}


def step_nccl_collectives(ctx: Ctx, timeout: float) -> dict:
    result = WORK / "nccl_probe.json"
    result.unlink(missing_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    p = ctx.run(nccl_probe_cmd(ctx, result=result), timeout, "nccl_collectives", OMP_NUM_THREADS=4,
                NCCL_DEBUG="WARN")
    if not result.exists():
        return {"status": "timeout" if p.timed_out else "failed", "note": f"rc {p.rc}: {error_line(p.text)}"}
    r = json.loads(result.read_text())
    bad = {k: v.get("error", "false") for k, v in r["checks"].items() if not v["ok"]}
    return {"status": "ok" if p.rc == 0 and not bad else "failed", **r,
            "note": (f"{len(r['checks'])} checks ok" if not bad else
                     "FAILED: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))[:600]}


def step_gen_speed(ctx: Ctx, timeout: float) -> dict:
    out = ctx.out / "gen_speed.json"
    out.unlink(missing_ok=True)
    p = ctx.run(step_cmds(ctx, "gen_speed")[0], timeout, "gen_speed")
    if not out.exists():
        return {"status": "timeout" if p.timed_out else "failed", "note": f"rc {p.rc}: {error_line(p.text)}"}
    rows = json.loads(out.read_text())["rows"]
    errors = [f"{r['engine']}/{r['weights']} B={r['batch']}: {r['error']}" for r in rows if "error" in r]
    note = f"{len(rows) - len(errors)} rows -> gen_speed.json" + (f"; {len(errors)} FAILED, first: {errors[0]}"
                                                                   if errors else "")
    return {"status": "ok" if p.rc == 0 and not errors else "failed", "rows": len(rows), "errors": errors,
            "table": gen_table(rows), "note": note[:700]}


def gen_table(rows: list[dict]) -> list[str]:
    """samples/s (all streams) per engine/weights (rows) and batch (columns)."""
    batches = sorted({r["batch"] for r in rows})
    order = {"python": 0, "cpp": 1, "cuda": 2}
    keys = sorted({(r["preset"], r["engine"], r["weights"]) for r in rows},
                  key=lambda k: (k[0], order.get(k[1], 9), k[2]))
    lines = ["gen_speed samples/s (all streams)".ljust(34) + "".join(f"{'B=' + str(b):>11}" for b in batches)]
    for k in keys:
        cells = []
        for b in batches:
            r = next((r for r in rows if (r["preset"], r["engine"], r["weights"], r["batch"]) == (*k, b)), None)
            cells.append(f"{'-':>11}" if not r else f"{'ERROR':>11}" if "error" in r else f"{r['samples_per_s']:11,.0f}")
        lines.append(f"  {k[0]} {k[1]}/{k[2]}".ljust(34) + "".join(cells))
    return lines


def step_train_speed(ctx: Ctx, timeout: float) -> dict:
    out = ctx.out / "train_speed.json"
    out.unlink(missing_ok=True)
    p = ctx.run(step_cmds(ctx, "train_speed")[0], timeout, "train_speed")
    if not out.exists():
        return {"status": "timeout" if p.timed_out else "failed", "note": f"rc {p.rc}: {error_line(p.text)}"}
    doc = json.loads(out.read_text())
    rows, failed = doc["rows"], doc.get("failed", [])
    for r in rows:
        if (r.get("device"), r.get("preset"), r.get("dtype"), r.get("batch"), r.get("mode")) == \
                ("cuda", "paper", "bf16", 8, "fused"):
            ctx.train_step_s = r["step_s"]
    if ctx.train_step_s:
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "train_step_s.json").write_text(json.dumps(ctx.train_step_s))   # for a rerun of resume alone
    table = [f"{r['config']:22s} {r['mode']:10s} {r['step_s'] * 1e3:8.1f} ms/step {r['samples_per_s']:12,.0f} "
             f"samples/s  x{(r.get('speedup') or 0):.2f} ref  peak {r.get('peak_mb') or 0:8.0f} MB" for r in rows]
    note = f"{len(rows)} rows -> train_speed.json" + "".join(
        f"; {f['config']} FAILED: {error_line(f['error'], 2)}" for f in failed)
    return {"status": "ok" if p.rc == 0 and rows and not failed else "failed", "rows": len(rows), "table": table,
            "failed": failed, "note": note[:700] if rows or failed else
            f"no rows: {' | '.join(ln for ln in p.lines if ln.startswith('# skipping')) or error_line(p.text)}"}


def _last_step(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    best = 0
    try:
        for line in log.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                pass
    except OSError:
        pass
    return best


def resume_steps(step_s: float | None, seconds: float) -> int:
    """Steps each of the three concurrent runs can make in `seconds` (less ~45 s of process starts and the
    comparison), from the fused step time train_speed measured alone (x2 for the loop's data, syncs,
    logging and checkpoints, x the runs sharing the GPU)."""
    if not step_s:
        return RESUME_DEFAULT_STEPS
    n = int((seconds - 45.0) / (step_s * 2.0 * RESUME_RUNS))
    return max(30, min(3000, n))


def step_resume(ctx: Ctx, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    if ctx.train_step_s is None and (WORK / "train_step_s.json").exists():   # an earlier call on this machine
        ctx.train_step_s = json.loads((WORK / "train_step_s.json").read_text())
    steps = ctx.resume_steps or resume_steps(ctx.train_step_s, timeout)
    rp = resume_plan(steps)
    shutil.rmtree(WORK / "resume", ignore_errors=True)
    env = dict(OMP_NUM_THREADS=4)
    res: dict = {"steps": steps, "checkpoint_every": rp["every"], "sigint_at_or_after": rp["sigint_at"],
                 "sized_from_step_s": ctx.train_step_s}
    ctx.log.say(f"  resume: N={steps} steps, checkpoint every {rp['every']}, SIGINT to B at step >= {rp['sigint_at']}")
    procs = {k: Proc([ctx.py, *rp["argv"][k]], ctx.env(**env), ctx.log, f"resume:{k}") for k in ("a", "a2", "b")}
    b_leg, signalled, t_sig = 1, False, None
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
                res.update({f"{k}_last_step": _last_step(d) for k, d in rp["dirs"].items()})
                return {"status": "timeout", **res, "note": f"not finished in {timeout:.0f} s ({res})"}
            b = procs["b"]
            if b_leg == 1 and not signalled and b.poll() is None and _last_step(rp["dirs"]["b"]) >= rp["sigint_at"]:
                b.p.send_signal(signal.SIGINT)
                signalled, t_sig = True, now
            if b_leg == 1 and b.poll() is not None:
                rc = b.wait(deadline)
                from_ck = _checkpoint_steps(rp["dirs"]["b"])
                res.update(b_first_rc=rc, b_signalled=signalled, b_stopped_at=max(from_ck, default=None),
                           b_said_stopped="stopped by signal" in b.text)
                if rc != 0:
                    for p in procs.values():
                        p.kill()
                    return {"status": "failed", **res, "note": f"interrupted run exited {rc}: {error_line(b.text)}"}
                procs["b"] = Proc([ctx.py, *rp["argv"]["b"]], ctx.env(**env), ctx.log, "resume:b2")
                b_leg = 2
            if all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    rcs = {k: p.wait(deadline) for k, p in procs.items()}
    res.update({f"{k}_rc": v for k, v in rcs.items()})
    if any(rcs.values()):
        k = next(k for k, v in rcs.items() if v)
        return {"status": "failed", **res, "note": f"run {k} exited {rcs[k]}: {error_line(procs[k].text)}"}
    res["resumed_line"] = next((ln for ln in procs["b"].lines if ln.startswith("resumed")), None)
    res["samples_per_s"] = _samples_per_s(rp["dirs"]["a"])
    cmp_out = WORK / "resume_compare.json"
    cmp_out.unlink(missing_ok=True)
    q = ctx.run(self_cmd(ctx, "--compare-runs", *map(str, rp["dirs"].values()), "--result", str(cmp_out)),
                max(10.0, deadline - time.monotonic()), "resume")
    if not cmp_out.exists():
        return {"status": "failed", **res, "note": f"comparison failed: {error_line(q.text)}"}
    c = json.loads(cmp_out.read_text())
    res.update(c)
    problems = []
    if not signalled:
        problems.append("B finished before the SIGINT")
    elif not res.get("b_said_stopped"):
        problems.append("B did not say 'stopped by signal'")
    if not res["resumed_line"]:
        problems.append("B's second run did not resume")
    exact = c["verdict"].startswith("bit-exact")
    ok = not problems and (exact or c["verdict"].startswith("only close"))
    note = (f"N={steps}, SIGINT at step {res.get('b_stopped_at')}: {c['verdict']}"
            + (f" [{'; '.join(problems)}]" if problems else ""))
    return {"status": "ok" if ok else "failed", **res, "note": note}


def _checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(m.group(1)) for n in (os.listdir(d) if d.is_dir() else [])
                  if (m := re.match(r"^step-(\d+)\.pt$", n)))


def _samples_per_s(run_dir: Path) -> float | None:
    vals = []
    try:
        for line in (run_dir / "log.jsonl").read_text().splitlines():
            try:
                v = json.loads(line).get("samples_per_s")
            except ValueError:
                continue
            if isinstance(v, (int, float)):
                vals.append(v)
    except OSError:
        return None
    vals = sorted(vals[len(vals) // 4:])                 # past the warm-up
    return vals[len(vals) // 2] if vals else None


STEP_FUNCS = {"env": step_env, "wheels": step_wheels, "build": step_build, "cuda_tests": step_cuda_tests,
              "nccl_cli": step_nccl_cli, "nccl_collectives": step_nccl_collectives, "gen_speed": step_gen_speed,
              "train_speed": step_train_speed, "resume": step_resume}
MIN_SECONDS = {"resume": 60, "build": 30}


def run_all(ctx: Ctx, only: set[str] | None, skip: set[str]) -> int:
    steps = plan(ctx)
    ctx.log.say(f"GPU check: {len(steps)} steps, budget {ctx.budget:.0f} s, results in {ctx.out}")
    for st in steps:
        name = st["name"]
        rec: dict = {"timeout": st["timeout"], "expect": st["expect"]}
        if (only and name not in only) or name in skip:
            continue
        timeout = min(st["timeout"], ctx.remaining() - 5)     # resume sizes its runs to what it gets
        if timeout < MIN_SECONDS.get(name, 10):
            rec.update(status="skipped", note=f"out of budget ({ctx.remaining():.0f} s left)")
            ctx.summary["steps"][name] = rec
            ctx.save_summary()
            ctx.log.say(f"\n== {name}: skipped, out of budget")
            continue
        ctx.log.say(f"\n== {name} (timeout {timeout:.0f} s, {ctx.remaining():.0f} s of the budget left)")
        t = time.monotonic()
        try:
            r = STEP_FUNCS[name](ctx, timeout)
        except Exception as e:                               # a bug in this script: record it, go on
            r = {"status": "failed", "note": f"gpu_check.py raised {type(e).__name__}: {e}"}
        rec.update(r, seconds=round(time.monotonic() - t, 1), effective_timeout=round(timeout))
        ctx.summary["steps"][name] = rec
        ctx.save_summary()
        ctx.log.say(f"-- {name}: {rec['status']} in {rec['seconds']} s: {rec.get('note', '')}")
        for line in r.get("table", []):
            ctx.log.say("   " + line)
    print_summary(ctx)
    bad = [n for n, r in ctx.summary["steps"].items() if r["status"] != "ok"]
    return 1 if bad else 0


def print_summary(ctx: Ctx) -> None:
    s = ctx.summary["steps"]
    env = s.get("env", {})
    ctx.log.say("\n" + "=" * 100)
    ctx.log.say(f"GPU CHECK SUMMARY  {env.get('gpu', '?')} (cc {env.get('capability', '?')}), torch {env.get('torch', '?')}, "
                f"nvcc {env.get('nvcc', '?')}, {time.monotonic() - ctx.t0:.0f} s of {ctx.budget:.0f}")
    ctx.log.say(f"{'step':18s}{'status':9s}{'s':>7s}{'limit':>7s}  note")
    for name, r in s.items():
        ctx.log.say(f"{name:18s}{r['status']:9s}{r.get('seconds', 0):7.0f}{r.get('effective_timeout', r['timeout']):7.0f}"
                    f"  {str(r.get('note', ''))[:300]}")
    t = s.get("cuda_tests", {})
    for f in t.get("failed", [])[:15]:
        ctx.log.say(f"  FAILED {f['test']}: {f['message'][:160]}")
    if len(t.get("failed", [])) > 15:
        ctx.log.say(f"  ... {len(t['failed']) - 15} more in summary.json / cuda_tests.xml")
    for name in ("gen_speed", "train_speed"):
        for line in s.get(name, {}).get("table", []):
            ctx.log.say("  " + line)
    if "verdict" in s.get("resume", {}):
        r = s["resume"]
        ctx.log.say(f"  resume ({TRAIN_PRESET} on {TRAIN_DEVICE}, {r['steps']} steps, SIGINT at {r.get('b_stopped_at')}, "
                    f"{r.get('samples_per_s') or 0:,.0f} samples/s per run): {r['verdict']}")
    files = sorted(p.name for p in ctx.out.iterdir() if p.is_file() and not p.name.startswith("."))
    ctx.log.say(f"files in {ctx.out}: {', '.join(files)}")


# ---------------------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------------------

def dry_run(ctx: Ctx) -> int:
    steps = plan(ctx)
    checks: list[tuple[str, bool, str]] = []
    clock = [time.monotonic()]

    def check(name: str, ok: bool, note: str) -> None:
        checks.append((name, ok, note))
        now = time.monotonic()
        ctx.log.say(f"  [{'ok' if ok else 'FAIL'}] {name} ({now - clock[0]:.1f} s): {note}")
        clock[0] = now

    ctx.log.say(f"GPU check DRY RUN: runs what needs no GPU, lists the rest (results in {ctx.out})")
    # env probe
    p = ctx.run([ctx.py, "-c", ENV_PROBE], 60, "dry:env")
    m = re.search(r"^ENV_JSON (.*)$", p.text, re.M)
    check("env probe", p.rc == 0 and m is not None, m.group(1) if m else tail(p.text, 3))
    # wheels
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    missing = [n for n in WHEELS if not any(norm(w.name.split("-")[0]) == norm(n) for w in wheels)]
    ctx.log.say(f"  [{'ok' if not missing else 'warn'}] wheels: {len(wheels)} in {WHEEL_DIR}"
                + (f"; missing {missing}: run scripts/gpu_wheels.sh before the device call" if missing else ""))
    if wheels:
        problems = check_wheels(WHEEL_DIR)
        check("wheel requirements covered (wheels + device packages)", not problems, "; ".join(problems) or "yes")
    size = tree_bytes() + sum(w.stat().st_size for w in wheels)
    check("working tree + .whl under 64 MiB", size < TREE_LIMIT, f"{size / 2**20:.1f} MiB")
    # build switches
    setup = (ROOT / "setup.py").read_text()
    lost = [k for k in ("WAVENET_AE_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME") if k not in setup]
    check("setup.py reads the build switches", not lost, f"missing {lost}" if lost else
          f"nvcc here: {ctx.cuda_home or 'none'} (on the device: CUDA_HOME from /usr/local/cuda or PATH)")
    # the CUDA test selection
    p = ctx.run(tests_cmd(ctx, collect=True), 120, "dry:collect")
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", p.text)
    n = int(m.group(1)) if m else 0
    errs = re.search(r"(\d+) errors?", tail(p.text, 1))
    check("pytest -m cuda collects CUDA tests", n > 0,
          f"collected {n} CUDA tests" + (f", {errs.group(1)} collection errors" if errs else ""))
    ctx.summary["cuda_tests_collected"] = n
    # the exact train / torchrun commands
    rp = resume_plan(RESUME_DEFAULT_STEPS)
    cmds = [c[1:] for c in nccl_cli_cmds(ctx)] + [[ctx.py, *rp["argv"][k]][1:] for k in ("a", "b")]
    p = ctx.run(self_cmd(ctx, "--check-train-args", json.dumps(cmds)), 120, "dry:train-args")
    check("train/torchrun arguments parse (nccl_cli, resume)", p.rc == 0,
          tail(p.text, 1) if p.rc == 0 else error_line(p.text))
    # benchmarks' exact arguments
    for st in (s for s in steps if s["name"] in ("gen_speed", "train_speed")):
        p = ctx.run(st["cmds"][0] + ["--check-args"], 120, f"dry:{st['name']}")
        check(f"{st['name']} arguments", p.rc == 0, tail(p.text, 1)[:300] if p.rc == 0 else error_line(p.text))
    # the collective probe, on the CPU with gloo
    result = ctx.out / "nccl_probe_dry.json"
    result.unlink(missing_ok=True)
    p = ctx.run(nccl_probe_cmd(ctx, "gloo", "cpu", "tiny", result), 180, "dry:probe", OMP_NUM_THREADS=1)
    ok = p.rc == 0 and result.exists() and all(v["ok"] for v in json.loads(result.read_text())["checks"].values())
    check("collective probe (gloo, CPU, tiny preset)", ok,
          json.dumps(json.loads(result.read_text())["checks"])[:700] if result.exists() else error_line(p.text))
    # the GPU steps
    ctx.log.say("\nGPU steps (in this order; each step's timeout is capped by the budget left):")
    total = 0
    for st in steps:
        total += st["expect"]
        ctx.log.say(f"  STEP {st['name']:17s} timeout {st['timeout']:4d} s, expected ~{st['expect']:3d} s "
                    f"(dry run: {st['dry']})")
        if st.get("note"):
            ctx.log.say(f"      {st['note']}")
        for c in st["cmds"]:
            ctx.log.say(f"      $ {shlex.join(c)}")
    ctx.log.say(f"expected total ~{total} s of the {ctx.budget:.0f} s budget (the device call's limit is 480 s)")
    bad = [c for c in checks if not c[1]]
    ctx.summary.update(checks=[{"name": n, "ok": o, "note": t} for n, o, t in checks],
                       plan=[{k: v for k, v in st.items() if k != "cmds"} | {"cmds": [shlex.join(c) for c in st["cmds"]]}
                             for st in steps], expected_total_s=total)
    ctx.save_summary()
    ctx.log.say(f"DRY RUN: {len(checks) - len(bad)} checks ok, {len(bad)} failed")
    return 1 if bad else 0


def tree_bytes() -> int:
    """Bytes of what the device tool carries: tracked files and untracked files git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    total = 0
    for name in out.split(b"\0"):
        if name:
            try:
                total += (ROOT / os.fsdecode(name)).stat().st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------------------
# helpers run as subcommands (they may import torch and the package)
# ---------------------------------------------------------------------------------------------------

def wheel_requirements(whl: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel file."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    get = lambda k: [ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.startswith(k + ":")]  # noqa: E731
    return get("Name")[0], get("Version")[0], get("Requires-Dist")


def unmet(requires: list[str], have: set[str], python=DEVICE_PYTHON) -> list[str]:
    """Requirement names (markers evaluated for the device's Python on Linux x86-64, extras off) not in
    `have` (normalised names)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    env = default_environment()
    env.update(python_version=python, python_full_version=python + ".0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython", os_name="posix", extra="")
    out = []
    for line in requires:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        if norm(r.name) not in have:
            out.append(r.name)
    return out


def check_wheels(folder: Path) -> list[str]:
    """Problems of the wheel set: a version other than WHEELS pins, two versions of one name, a wheel not
    for the device's Python, a requirement neither carried nor on the device."""
    problems, names = [], {}
    for whl in sorted(folder.glob("*.whl")):
        name, version, requires = wheel_requirements(whl)
        n = norm(name)
        if n in names:
            problems.append(f"two versions of {name}: {names[n]} and {version}")
        names[n] = version
        if n not in {norm(k) for k in WHEELS}:
            problems.append(f"{whl.name} is not in the list (WHEELS)")
        elif WHEELS[next(k for k in WHEELS if norm(k) == n)] != version:
            problems.append(f"{name} {version} is not the pinned version")
        tags = whl.name[:-4].split("-")[-3:]
        if not (tags[0].startswith(("py3", "py2.py3")) or "cp312" in tags[0] or tags[1] == "abi3"):
            problems.append(f"{whl.name} is not for CPython {DEVICE_PYTHON}")
        for req in unmet(requires, set(DEVICE_HAS) | {norm(k) for k in WHEELS}):
            problems.append(f"{name} needs {req}, which is neither carried nor on the device")
    for k in WHEELS:
        if norm(k) not in names:
            problems.append(f"{k}=={WHEELS[k]} missing")
    return problems


def check_site() -> int:
    """On the device, after the install: every carried distribution's requirements are installed in a
    matching version, and the modules import."""
    import importlib
    import importlib.metadata as md
    from packaging.requirements import Requirement
    problems = []
    for dist in md.distributions(path=[str(SITE)]):
        for line in dist.requires or []:
            r = Requirement(line)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            try:
                v = md.version(r.name)
            except md.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {r}: not installed")
                continue
            if r.specifier and not r.specifier.contains(v, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {r}: {v} installed")
    versions = {}
    for mod in IMPORTS:
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as e:                               # noqa: BLE001 - report any import failure
            problems.append(f"import {mod}: {type(e).__name__}: {e}")
    for p in problems:
        print("PROBLEM", p)
    print(("imports ok: " if not problems else f"{len(problems)} problems; imports: ")
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 1 if problems else 0


def check_train_args(cmds: list[list[str]]) -> int:
    """Each command is torchrun's or python's argv after the interpreter: parse it with the parsers the
    run will use, and check the --set keys against the preset's config."""
    from torch.distributed.run import get_args_parser
    from wavenet_ae.config import preset
    from wavenet_ae.train import parse_args
    n = 0
    for argv in cmds:
        if argv[:2] == ["-m", "torch.distributed.run"]:
            targs = get_args_parser().parse_args(argv[2:])
            assert targs.module and targs.training_script == "wavenet_ae.train", targs
            argv = ["-m", targs.training_script, *targs.training_script_args]
        assert argv[:2] == ["-m", "wavenet_ae.train"], argv
        a = parse_args(argv[2:])
        preset(a.preset).with_overrides(list(a.set or []))
        n += 1
    print(f"{n} train commands parse; --set keys exist")
    return 0


def compare_states(a: dict, b: dict) -> dict:
    """How two checkpoints differ: model weights, optimizer state, data position."""
    import torch
    res = {"steps": [a.get("step"), b.get("step")], "model_equal": True, "optimizer_equal": True,
           "data_position_equal": a.get("data_position") == b.get("data_position"),
           "n_tensors": 0, "n_differ": 0, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst": None}
    pairs = []
    if a["model"].keys() != b["model"].keys():
        res["model_equal"] = False
        res["worst"] = "model keys differ"
    pairs += [(f"model.{k}", a["model"][k], b["model"][k]) for k in a["model"] if k in b["model"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    if sa.keys() != sb.keys():
        res["optimizer_equal"] = False
    pairs += [(f"optimizer.{i}.{k}", sa[i][k], sb[i][k]) for i in sa if i in sb for k in sa[i]
              if torch.is_tensor(sa[i][k]) and k in sb[i]]
    for name, x, y in pairs:
        res["n_tensors"] += 1
        if x.shape == y.shape and torch.equal(x, y):
            continue
        res["n_differ"] += 1
        res["model_equal" if name.startswith("model.") else "optimizer_equal"] = False
        if x.shape != y.shape:
            mad = rel = float("inf")
        else:
            d = x.double() - y.double()
            mad = d.abs().max().item()
            rel = d.norm().item() / max(x.double().norm().item(), 1e-30)
        if rel > res["max_rel_diff"] or res["worst"] is None:
            res["worst"] = name
        res["max_abs_diff"] = max(res["max_abs_diff"], mad)
        res["max_rel_diff"] = max(res["max_rel_diff"], rel)
    res["bit_exact"] = res["model_equal"] and res["optimizer_equal"] and res["data_position_equal"] \
        and res["steps"][0] == res["steps"][1]
    return res


def resume_verdict(a_b: dict, a_a2: dict | None) -> str:
    """One line: is the resumed run (B) bit-identical to the uninterrupted one (A), and if not, is it as
    close as a second uninterrupted run (A2) is (run-to-run nondeterminism of CUDA training)?"""
    base = "" if a_a2 is None else (
        "; two uninterrupted runs are bit-identical" if a_a2["bit_exact"] else
        f"; two uninterrupted runs differ too (max rel diff {a_a2['max_rel_diff']:.2e}: CUDA training is not "
        f"deterministic here)")
    if a_b["bit_exact"]:
        return "bit-exact" + base
    if a_b["steps"][0] != a_b["steps"][1]:
        return f"DIFFERS: final steps {a_b['steps']}"
    if not a_b["data_position_equal"]:
        return "DIFFERS: the data positions differ (a resume bug whatever the float arithmetic)" + base
    what = f"max rel diff {a_b['max_rel_diff']:.2e} ({a_b['n_differ']}/{a_b['n_tensors']} tensors, worst {a_b['worst']})"
    if a_a2 is None:
        return f"only close? not bit-exact, {what}; no second uninterrupted run to compare"
    if a_a2["bit_exact"]:
        return f"NOT EXACT: the resumed run differs, {what}" + base + " -- a resume bug on CUDA"
    if a_b["max_rel_diff"] <= 10 * max(a_a2["max_rel_diff"], 1e-12):
        return (f"only close: not bit-exact, {what}, no further from the uninterrupted run than a second "
                f"uninterrupted run is" + base)
    return f"DIFFERS more than run-to-run nondeterminism explains: {what}" + base


def compare_runs(dirs: list[str], result: str | None) -> int:
    from wavenet_ae import checkpoint
    states = {}
    for name, d in zip(("a", "a2", "b"), dirs):
        ck = checkpoint.list_checkpoints(d)
        if not ck:
            raise SystemExit(f"no checkpoint in {d}")
        states[name] = checkpoint.load_file(ck[-1][1])
    a_b = compare_states(states["a"], states["b"])
    a_a2 = compare_states(states["a"], states["a2"]) if "a2" in states else None
    out = {"a_vs_resumed": a_b, "a_vs_a2": a_a2, "verdict": resume_verdict(a_b, a_a2)}
    print(json.dumps(out, indent=1))
    if result:
        Path(result).write_text(json.dumps(out, indent=1))
    return 0


def nccl_probe(a) -> int:
    """Under torchrun (one process): a real process group of `a.backend`, then train.py's collectives on
    the training device and a DDP training step of the model built as train() builds it."""
    import torch
    import torch.distributed as dist
    from wavenet_ae import train as T
    from wavenet_ae.config import preset
    from wavenet_ae.data.slice_buffer import SliceBuffer
    from wavenet_ae.model import WaveNetAE

    checks: dict = {}

    def check(name, fn):
        try:
            v = fn()
            checks[name] = {"ok": bool(v)} if not isinstance(v, dict) else v
        except Exception as e:                                   # noqa: BLE001 - every failure is a finding
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}

    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"        # what setup_distributed gives at world size > 1
    else:
        device = "cpu"
    # _vote(loss, grad_norm, stop, world, device): the world argument 2 takes the collective path of a
    # multi-rank run
    for dev in dict.fromkeys([device, a.device]):
        one, nan = torch.tensor(1.0, device=dev), torch.tensor(float("nan"), device=dev)
        check(f"_vote on {dev}", lambda dev=dev, one=one, nan=nan: (
            T._vote(one, one, False, 2, dev) == (False, False, False)
            and T._vote(nan, one, True, 2, dev) == (True, False, True)))
    cfg = preset(a.preset)
    model = buf = None
    try:
        splits = T.load_corpora(None, cfg)
        train_set = splits["train"]
        model = WaveNetAE(cfg.model).to(device)
        mean, std = T.feature_stats(train_set, cfg)
        model.encoder.set_feature_stats(mean, std)
        opt = T.make_optimizer(model, cfg)
        p = model.plan(cfg.data.n_win)
        buf = SliceBuffer(train_set, cfg.model, p, cfg.data.n_batch, cfg.data.buffer_seconds, cfg.data.fraction,
                          seed=cfg.train.seed, rank=rank, world_size=world)
    except Exception as e:                                       # noqa: BLE001
        checks["setup as train() does"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    if model is not None and buf is not None:
        want = torch.device(device).type

        def on_device():
            off = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != want]
            return {"ok": not off, **({"error": f"not on {want}: {off[:10]}"} if off else {})}
        check("parameters and buffers on the training device", on_device)
        ddp_box = {}

        def make_ddp():
            ddp_box["m"] = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
            return True
        check("DDP wraps the model (broadcasts parameters and buffers)", make_ddp)

        def steps():
            losses = []
            for _ in range(2):
                batch = next(buf)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                    loss, _ = T._loss(ddp_box["m"], model, batch, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()                                 # DDP all-reduces the gradients here
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                losses.append(float(loss))
            ok = all(map(lambda v: v == v and abs(v) < 1e9, losses))
            return {"ok": ok, "losses": losses}
        if "m" in ddp_box:
            check("2 DDP training steps (gradients all-reduced)", steps)

        def gathers():      # what save() gathers, as train.gather does at world size > 1
            out1, out2 = [None] * world, [None] * world
            dist.all_gather_object(out1, json.dumps(buf.state()))
            dist.all_gather_object(out2, T.rng_state(device))
            return out1[0] == json.dumps(buf.state()) and torch.equal(out2[0]["torch"], T.rng_state(device)["torch"])
        check("gather of data position and RNG state (checkpoint)", gathers)
        buf.close()
    dist.barrier()
    dist.destroy_process_group()
    res = {"backend": a.backend, "device": device, "world": world, "preset": a.preset, "checks": checks,
           "note": "one rank: catches collectives on the wrong device and DDP on CPU tensors, not rank disagreement"}
    print(json.dumps(res, indent=1))
    if a.result:
        Path(a.result).write_text(json.dumps(res, indent=1))
    return 0 if all(c["ok"] for c in checks.values()) else 1


# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dry-run", action="store_true", help="run what needs no GPU, list the GPU steps")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check_out",
                    help="results folder (default: $OUT, else /tmp/gpu_check_out)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps (default 450)")
    ap.add_argument("--only", default="", help="comma-separated steps to run (a rerun on a warm machine)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable, help="interpreter for the steps")
    ap.add_argument("--resume-steps", type=int, default=None, help="N of the resume step (default: sized to the budget)")
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    help="run nccl_cli, nccl_collectives and resume on the CPU (tiny preset, gloo) to check the "
                         "orchestration here; e.g. --cpu-rehearsal --only nccl_cli,nccl_collectives,resume "
                         "--resume-steps 40")
    # subcommands used by the steps themselves
    ap.add_argument("--wheel-specs", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-wheels", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-site", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-train-args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compare-runs", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="nccl", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="paper", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.wheel_specs:
        print("\n".join(f"{k}=={v}" for k, v in WHEELS.items()))
        return 0
    if a.check_wheels:
        problems = check_wheels(Path(a.check_wheels))
        for p in problems:
            print("PROBLEM", p)
        print(f"wheels in {a.check_wheels}: {'requirements covered' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    if a.check_site:
        return check_site()
    if a.check_train_args:
        return check_train_args(json.loads(a.check_train_args))
    if a.compare_runs:
        return compare_runs(a.compare_runs, a.result)
    if a.nccl_probe:
        return nccl_probe(a)

    unknown = {s for s in (a.only + "," + a.skip).split(",") if s} - set(STEP_FUNCS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; steps: {', '.join(STEP_FUNCS)}")
    if a.cpu_rehearsal:
        global TRAIN_DEVICE, TRAIN_PRESET, PROBE
        TRAIN_DEVICE, TRAIN_PRESET, PROBE = "cpu", "tiny", ("gloo", "cpu", "tiny")
    ctx = Ctx(a)
    if a.dry_run:
        return dry_run(ctx)
    return run_all(ctx, {s for s in a.only.split(",") if s} or None, {s for s in a.skip.split(",") if s})


if __name__ == "__main__":
    sys.exit(main())
