import warnings

import pytest
import torch

from wavenet_ae import checkpoint


def _state(step):
    return {"step": step, "w": torch.full((3,), float(step)), "pos": ['{"epoch": 0}']}


def test_save_keeps_the_last_k_and_round_trips(tmp_path):
    for s in range(1, 6):
        checkpoint.save(tmp_path, s, _state(s), keep=3)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 4, 5]
    got = checkpoint.load_latest(tmp_path)
    assert got["step"] == 5 and torch.equal(got["w"], torch.full((3,), 5.0))
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage):
    checkpoint.save(tmp_path, 1, _state(1))
    path = checkpoint.save(tmp_path, 2, _state(2))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF
    else:
        data = bytearray(b"not a checkpoint")
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=str(path.name)):
        checkpoint.load_file(path)
    with pytest.warns(UserWarning, match="falling back"):
        assert checkpoint.load_latest(tmp_path)["step"] == 1


def test_a_stale_temp_file_is_ignored_and_cleaned(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))
    stale = tmp_path / "checkpoints" / ".step-00000002.pt.tmp-999999"
    stale.write_bytes(b"half")
    assert checkpoint.load_latest(tmp_path)["step"] == 1
    checkpoint.save(tmp_path, 2, _state(2))
    assert not stale.exists()


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_no_checkpoint_files_is_a_fresh_start(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".step-00000001.pt.tmp-999999").write_bytes(b"half")
    assert checkpoint.load_latest(tmp_path) is None


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path):
    paths = [checkpoint.save(tmp_path, s, _state(s)) for s in (1, 2, 3)]
    for p in paths:
        _flip(p)
    with pytest.warns(UserWarning) as record, pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_latest(tmp_path)
    msg = str(e.value)
    d = str(checkpoint.checkpoint_dir(tmp_path))
    assert "\n" not in msg and d in msg and "none of the 3 checkpoints" in msg and "verifies" in msg
    assert "move" in msg and "--run-dir" in msg
    assert all(f"step-0000000{s}.pt" in msg for s in (1, 2, 3))
    assert len(record) == 3 and "no earlier checkpoint" in str(record[-1].message)


def test_damaged_newest_falls_back_to_the_previous_one_by_name(tmp_path):
    for s in (1, 2, 3):
        checkpoint.save(tmp_path, s, _state(s))
    _flip(checkpoint.checkpoint_dir(tmp_path) / "step-00000003.pt")
    with pytest.warns(UserWarning, match=r"step-00000003.pt: corrupt.*falling back to the previous "
                                         r"checkpoint step-00000002\.pt"):
        got = checkpoint.load_latest(tmp_path)
    assert got["step"] == 2 and torch.equal(got["w"], torch.full((3,), 2.0))


def test_the_only_checkpoint_damaged_says_there_is_no_earlier_one(tmp_path):
    _flip(checkpoint.save(tmp_path, 7, _state(7)))
    with pytest.warns(UserWarning, match="step-00000007.pt: corrupt.*; no earlier checkpoint") as record, \
            pytest.raises(checkpoint.CheckpointError, match="none of the 1 checkpoint in"):
        checkpoint.load_latest(tmp_path)
    assert not any("falling back" in str(w.message) for w in record)


def test_pruning_keeps_damaged_files_and_the_new_one_and_deletes_only_verified_older_ones(tmp_path,
                                                                                          monkeypatch):
    d = checkpoint.checkpoint_dir(tmp_path)
    for s in (1, 2, 3, 7, 8):
        checkpoint.save(tmp_path, s, _state(s), keep=0)
    for s in (2, 7, 8):                              # damaged: an older one and two higher-numbered ones
        _flip(d / f"step-{s:08d}.pt")
    damaged = {s: (d / f"step-{s:08d}.pt").read_bytes() for s in (2, 7, 8)}
    verified = []
    real_verify = checkpoint.verify
    monkeypatch.setattr(checkpoint, "verify", lambda p: verified.append(p.name) or real_verify(p))

    with pytest.warns(UserWarning, match=r"damaged checkpoint.*step-00000002\.pt"):
        new = checkpoint.save(tmp_path, 4, _state(4), keep=2)
    # 4 (new) and 3 are the two verified ones kept; 1 is a verified older one beyond keep: deleted
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 3, 4, 7, 8]
    assert checkpoint.load_file(new)["step"] == 4
    assert all((d / f"step-{s:08d}.pt").read_bytes() == b for s, b in damaged.items())
    assert verified == ["step-00000003.pt", "step-00000002.pt", "step-00000001.pt"]  # newest to oldest,
    # only those older than the new file

    verified.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        checkpoint.save(tmp_path, 5, _state(5), keep=2)
    assert not [w for w in record if "damaged" in str(w.message)]     # reported once already
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 4, 5, 7, 8]
    assert verified == ["step-00000004.pt", "step-00000003.pt", "step-00000002.pt"]
    with pytest.warns(UserWarning) as record:
        assert checkpoint.load_latest(tmp_path)["step"] == 5
    assert [str(w.message).split(": ")[0][-16:] for w in record] == ["step-00000008.pt", "step-00000007.pt"]


def test_load_run_with_every_checkpoint_damaged_is_a_run_dir_error(tmp_path):
    from wavenet_ae.config import preset
    from wavenet_ae.run_dir import RunDirError, load_run
    (tmp_path / "config.json").write_text(preset("tiny").to_json())
    (tmp_path / "speakers.json").write_text('["a", "b"]')
    d = checkpoint.checkpoint_dir(tmp_path)
    d.mkdir()
    torch.save({"model": {}, "step": 5}, d / "step-00000005.pt")      # plain torch.save, truncated
    (d / "step-00000005.pt").write_bytes((d / "step-00000005.pt").read_bytes()[:40])
    _flip(checkpoint.save(tmp_path, 10, {"model": {}, "step": 10}, keep=0))
    with pytest.warns(RuntimeWarning) as record, \
            pytest.raises(RunDirError, match=r"none of the 2 checkpoints in .*step-00000010\.pt.*checksum.*"
                                             r"step-00000005\.pt.*unreadable"):
        load_run(tmp_path)
    assert "step-00000010.pt: corrupt" in str(record[0].message) and "falling back" in str(record[0].message)
    assert "step-00000005.pt is unreadable" in str(record[1].message)


def test_training_refuses_to_restart_when_no_checkpoint_verifies(tmp_path):
    import os
    import subprocess
    import sys
    small = ["n_enc=24", "n_latent=8", "n_codes=32", "n_res=12", "n_dil=12", "n_skp=24", "n_post=24",
             "n_lc_out=16", "n_block_layers=6", "n_batch=2", "n_win=640", "buffer_seconds=10",
             "fraction=0.002", "log_every=1"]            # as tests/test_train_resume.py, smaller batch
    cmd = lambda steps: [sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(tmp_path), "--preset",
                         "tiny", "--max-steps", str(steps), "--checkpoint-every", "1", "--seed", "1",
                         "--set", *small]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd(2), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = checkpoint.checkpoint_dir(tmp_path)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [1, 2]
    for _, p in checkpoint.list_checkpoints(tmp_path):
        _flip(p)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = subprocess.run(cmd(3), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert f"error: none of the 2 checkpoints in {d} verifies" in r.stderr and "--run-dir" in r.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before      # nothing rewritten, nothing new


def test_rng_state_saves_and_restores_only_this_ranks_gpu(monkeypatch):
    """A resumed process may see fewer GPUs than the one that saved: only the rank's own device's state
    is saved and restored (older checkpoints hold one per visible GPU: this rank's is picked)."""
    states = {0: torch.full((8,), 0, dtype=torch.uint8), 1: torch.full((8,), 1, dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((device, int(s[0]))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves every GPU"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restores every GPU"))
    cpu = torch.get_rng_state()
    s = checkpoint.rng_state("cuda:1")
    assert len(s["cuda"]) == 1 and int(s["cuda"][0][0]) == 1
    checkpoint.set_rng_state(s, "cuda:0")                  # the resumed rank sits on another index
    checkpoint.set_rng_state({**s, "cuda": [states[0], states[1]]}, "cuda:1")    # an older checkpoint
    assert restored == [(torch.device("cuda:0"), 1), (torch.device("cuda:1"), 1)]
    assert checkpoint.rng_state("cpu")["cuda"] == [] and torch.equal(torch.get_rng_state(), cpu)


def test_a_background_save_writes_a_snapshot_while_the_caller_goes_on(tmp_path, monkeypatch):
    """The caller gets control back while the file is still being written (a test hook pauses the
    write), may change its tensors meanwhile, and the checkpoint holds the state as submitted."""
    import time
    monkeypatch.setenv("WAVENET_AE_TEST_CKPT_DELAY", "0.5")
    saver = checkpoint.BackgroundSaver()
    w = torch.full((3,), 1.0)
    state = {"step": 1, "w": w, "opt": {"state": {0: {"m": w * 2}}, "groups": [{"lr": 0.1}]}}
    t = time.perf_counter()
    saver.submit(tmp_path, 1, state)
    assert time.perf_counter() - t < 0.4 and not checkpoint.list_checkpoints(tmp_path)
    w.add_(10.0)                                   # training goes on updating the parameters in place
    saver.wait()
    got = checkpoint.load_latest(tmp_path)
    assert torch.equal(got["w"], torch.full((3,), 1.0)) and torch.equal(got["opt"]["state"][0]["m"],
                                                                        torch.full((3,), 2.0))
    assert got["opt"]["groups"] == [{"lr": 0.1}]


def test_a_failed_background_save_is_raised_by_the_next_wait(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    saver = checkpoint.BackgroundSaver()
    saver.submit(blocker, 1, _state(1))
    with pytest.raises(checkpoint.CheckpointError, match="writing a checkpoint failed"):
        saver.wait()
    saver.wait()                                   # reported once
