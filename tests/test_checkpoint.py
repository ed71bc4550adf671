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
