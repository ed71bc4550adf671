"""Training in real processes, interrupted by real signals, resumes bit-exactly."""
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wavenet_ae import checkpoint

STEPS = 14
SMALL = ["n_enc=24", "n_latent=8", "n_codes=32", "n_res=12", "n_dil=12", "n_skp=24", "n_post=24",
         "n_lc_out=16", "n_block_layers=6", "n_batch=3", "n_win=640", "buffer_seconds=10",
         "fraction=0.002", "validate_every=7", "log_every=1", "keep_checkpoints=20",
         "vq_warmup_steps=5"]   # the VQ warm-up ends inside the runs: resumes cross it


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run_dir), "--preset", "tiny",
            "--max-steps", str(STEPS), "--checkpoint-every", "4", "--seed", "5", "--set", *SMALL, *extra]


def _env(**kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.update(kw)
    return env


def _run(run_dir, **env):
    r = subprocess.run(_cmd(run_dir), env=_env(**env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _last_step(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    if not log.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines() if x.strip()]
    return max(steps, default=0)


def _wait(pred, proc, timeout=300):
    t = time.time()
    while not pred():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-3000:]}"
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.02)


def _final_state(run_dir):
    ck = checkpoint.load_file(checkpoint.list_checkpoints(run_dir)[-1][1])
    assert ck["step"] == STEPS
    return ck


def _assert_identical(a, b):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ: {k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state differs: {i}.{k}"
    assert a["data_position"] == b["data_position"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    _run(run_dir)
    return _final_state(run_dir)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigint_at_a_random_step_then_resume_is_exact(reference, tmp_path, seed):
    at = random.Random(seed).randint(1, STEPS - 2)
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait(lambda: _last_step(tmp_path) >= at, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = checkpoint.list_checkpoints(tmp_path)[-1][0]
    assert at <= stopped < STEPS, "SIGINT must checkpoint the step it interrupted"
    assert "stopped by signal" in err
    r = _run(tmp_path)
    assert f"resumed {tmp_path} at step {stopped}" in r.stdout
    _assert_identical(reference, _final_state(tmp_path))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_is_exact(reference, tmp_path, seed):
    rng = random.Random(100 + seed)
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    at = rng.randint(2, STEPS - 3)
    _wait(lambda: _last_step(tmp_path) >= at, proc)
    time.sleep(rng.uniform(0, 0.3))
    proc.kill()
    proc.wait()
    latest = checkpoint.load_latest(tmp_path)  # None (killed before the first) or the final one is fine too
    assert latest is None or latest["step"] % 4 == 0 or latest["step"] == STEPS
    _run(tmp_path)
    _assert_identical(reference, _final_state(tmp_path))


def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_run(reference, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(WAVENET_AE_TEST_CKPT_DELAY="3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck_dir = checkpoint.checkpoint_dir(tmp_path)
    # the second checkpoint (step 8) is being written: the first one (step 4) must survive
    _wait(lambda: ck_dir.is_dir() and any(p.name.startswith(".step-00000008") for p in ck_dir.iterdir()),
          proc)
    proc.kill()
    proc.wait()
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [4]
    assert checkpoint.load_latest(tmp_path)["step"] == 4
    _run(tmp_path)
    assert not list(ck_dir.glob(".step-*"))           # the half-written temp file was cleaned up
    _assert_identical(reference, _final_state(tmp_path))


def test_second_sigint_while_checkpointing_corrupts_nothing(reference, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), env=_env(WAVENET_AE_TEST_CKPT_DELAY="1.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _last_step(tmp_path) >= 5, proc)
    proc.send_signal(signal.SIGINT)
    ck_dir = checkpoint.checkpoint_dir(tmp_path)
    _wait(lambda: any(p.name.startswith(".step-") for p in ck_dir.iterdir()), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert checkpoint.load_latest(tmp_path)["step"] >= 5
    _run(tmp_path)
    _assert_identical(reference, _final_state(tmp_path))


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    r = subprocess.run(_cmd(tmp_path, "lr=1e6", "lr_warmup_steps=1", "--checkpoint-every", "1"),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 3 and "non-finite" in r.stderr and ".flac" in r.stderr
    last = checkpoint.load_latest(tmp_path)
    assert last is not None and all(torch.isfinite(v).all() for v in last["model"].values()
                                    if v.is_floating_point())


def test_changed_settings_on_resume_are_a_clear_error(tmp_path):
    first = subprocess.run(_cmd(tmp_path, "n_res=20", "--max-steps", "1"), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    r = subprocess.run(_cmd(tmp_path, "n_res=13"), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "model.n_res" in r.stderr
    ok = subprocess.run(_cmd(tmp_path, "n_res=20", "--max-steps", "2"), env=_env(),
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and "resumed" in ok.stdout          # max_steps is safe to change


def test_the_buffer_size_cannot_change_on_resume(tmp_path):
    """It decides which files make up a chunk: a resume with another size would not be exact."""
    from wavenet_ae.config import preset
    from wavenet_ae.train import config_for_run, parse_args
    (tmp_path / "config.json").write_text(preset("tiny").to_json())
    args = parse_args(["--run-dir", str(tmp_path), "--set", "buffer_seconds=5"])
    with pytest.raises(SystemExit, match="data.buffer_seconds"):
        config_for_run(tmp_path, args)
    cfg, is_new = config_for_run(tmp_path, parse_args(["--run-dir", str(tmp_path), "--max-steps", "7"]))
    assert not is_new and cfg.train.max_steps == 7


def test_two_process_gloo_training_checkpoints_every_rank_and_resumes(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank's data position is saved and restored; a resume
    on one process re-shards it."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000)]
    cmd = lambda steps: torchrun + _cmd(tmp_path, "--max-steps", str(steps))[1:]
    r = subprocess.run(cmd(4), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = checkpoint.load_latest(tmp_path)
    pos = [json.loads(p) for p in ck["data_position"]]
    assert [p["rank"] for p in pos] == [0, 1] and all(p["world_size"] == 2 for p in pos)
    assert (tmp_path / "index.tsv").is_file()          # rank 0's index, which rank 1 took
    r = subprocess.run(cmd(6), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    assert checkpoint.load_latest(tmp_path)["step"] == 6
    # a preempted job resumed on fewer processes re-shards the data position and goes on
    r = subprocess.run(_cmd(tmp_path, "--max-steps", "8"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "re-sharded the data position of 2 ranks onto 1" in r.stdout, r.stderr[-3000:]
    ck = checkpoint.load_latest(tmp_path)
    assert ck["step"] == 8 and [json.loads(p)["world_size"] for p in ck["data_position"]] == [1]


def test_a_corpus_of_bad_files_is_one_clear_line(tmp_path):
    """Headers fine, content NaN: every file is skipped with its warning line and the run exits non-zero
    with one error line, not a traceback."""
    import numpy as np
    import soundfile as sf
    for s in range(2):
        (tmp_path / "corpus" / f"spk{s}").mkdir(parents=True)
        wav = 0.1 * np.ones(16000, np.float32)
        wav[100] = np.nan
        sf.write(tmp_path / "corpus" / f"spk{s}" / "u0.wav", wav, 16000, subtype="FLOAT")
    cmd = _cmd(tmp_path / "run", "--data", str(tmp_path / "corpus"))
    # valid_fraction=0: every file is a training file (which files a hash holds out depends on the path)
    cmd.insert(cmd.index("--set") + 1, "valid_fraction=0")
    r = subprocess.run(cmd,
                       env=_env(PYTHONWARNINGS="default"), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "could be loaded" in lines[-1], r.stderr[-3000:]
    for s in range(2):
        assert f"warning: skipping {tmp_path}/corpus/spk{s}/u0.wav: NaN/inf samples" in lines
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_config_and_speakers_are_written_atomically_and_only_when_they_change(tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run)
    cmd[cmd.index("--max-steps") + 1] = "2"
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, timeout=600)
    files = [run / "config.json", run / "speakers.json"]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    time.sleep(0.05)
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, timeout=600)     # nothing changed
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before
    cmd[cmd.index("--max-steps") + 1] = "3"                                             # a safe change
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, timeout=600)
    assert json.loads(files[0].read_text())["train"]["max_steps"] == 3
    assert files[0].stat().st_ino != before[0][0]          # replaced by a rename, never rewritten in place
    assert (files[1].stat().st_ino, files[1].stat().st_mtime_ns) == before[1]
    assert not list(run.glob(".*tmp*"))


def test_the_step_vote_is_a_collective_on_the_training_device(monkeypatch):
    """NCCL serves only CUDA tensors: the per-step collective must live on the training device (here a
    meta device stands in for it; the fake process group refuses anything else, as NCCL refuses CPU)."""
    from wavenet_ae import train
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)
        if t.device.type != "meta":
            raise RuntimeError(f"No backend type associated with device type {t.device.type}")
    monkeypatch.setattr(train.dist, "all_reduce", all_reduce)
    one = torch.tensor(1.0)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):   # .tolist() after the collective
        train._vote(one, one, True, 2, "meta")
    assert seen == [torch.device("meta")]


def test_the_vote_flags_a_bad_loss_a_bad_gradient_and_the_stop_signal():
    from wavenet_ae import train
    one, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert train._vote(one, one, False, 1, "cpu") == (False, False, False)
    assert train._vote(nan, one, False, 1, "cpu") == (True, False, False)
    assert train._vote(one, inf, True, 1, "cpu") == (False, True, True)


def test_an_old_format_checkpoint_upgrades_and_loads(tmp_path):
    """Format 0 (no "format" key): optimizer groups saying fused=None, a vqvae model state without
    steps_seen (from before the VQ warm-up). `checkpoint.upgrade`, through load_latest and load_run,
    fixes both on the dict; model and optimizer then load strictly and step as the ones that saved."""
    from wavenet_ae.config import preset
    from wavenet_ae.model import WaveNetAE
    from wavenet_ae.run_dir import load_run
    from wavenet_ae.train import make_optimizer
    torch.manual_seed(0)
    cfg = preset("tiny").with_overrides([*SMALL, "bottleneck=vqvae", "vq_warmup_steps=0"])

    def update(model, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    model = WaveNetAE(cfg.model)
    opt = make_optimizer(model, cfg)
    update(model, opt, 1)
    old = {"step": 1, "config": cfg.to_dict(), "speakers": ["a", "b"], "optimizer": opt.state_dict(),
           "model": {k: v for k, v in model.state_dict().items() if k != "bottleneck.steps_seen"}}
    for group in old["optimizer"]["param_groups"]:
        group["fused"] = None
    (tmp_path / "config.json").write_text(cfg.to_json())
    checkpoint.save(tmp_path, 1, old)

    state = checkpoint.load_latest(tmp_path)
    assert state["format"] == checkpoint.FORMAT
    assert [g["fused"] for g in state["optimizer"]["param_groups"]] == [True]
    assert int(state["model"]["bottleneck.steps_seen"]) == 0
    resumed = WaveNetAE(cfg.model)
    resumed.load_state_dict(state["model"])
    resumed_opt = make_optimizer(resumed, cfg)
    resumed_opt.load_state_dict(state["optimizer"])
    assert [g["fused"] for g in resumed_opt.param_groups] == [True]
    update(model, opt, 2)
    update(resumed, resumed_opt, 2)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    run = load_run(tmp_path)
    assert run.step == 1 and run.speakers == ["a", "b"] and int(run.model.bottleneck.steps_seen) == 0

    current = {"format": checkpoint.FORMAT, "model": {"bottleneck.codebook": None},
               "optimizer": {"param_groups": [{"fused": None}]}}
    assert checkpoint.upgrade(copy.deepcopy(current)) == current      # the current format: nothing to do
    checkpoint.save(tmp_path, 2, {**old, "format": checkpoint.FORMAT + 1})
    with pytest.raises(checkpoint.CheckpointError, match="newer"):
        checkpoint.load_latest(tmp_path)
