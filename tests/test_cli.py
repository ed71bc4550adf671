"""The console script `wavenet-ae VERB` is the `python -m wavenet_ae.VERB` command, and every verb
takes its common options from wavenet_ae.cli."""
import importlib
import shutil
import subprocess
import sys

import pytest

from wavenet_ae import cli

EXE = shutil.which("wavenet-ae")
needs_script = pytest.mark.skipif(EXE is None and "CI" not in __import__("os").environ,
                                  reason="console script not installed (pip install -e .)")


def run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_every_verb_has_a_main():
    for verb, module in cli.VERBS.items():
        assert callable(importlib.import_module(module).main), verb


@needs_script
def test_console_script_is_the_module_command():
    a = run([EXE, "rfield", "--preset", "tiny", "--set", "model.n_block_layers=3"])
    b = run([sys.executable, "-m", "wavenet_ae.rfield", "--preset", "tiny", "--set", "model.n_block_layers=3"])
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "receptive" in a.stdout.lower()
    bad = run([EXE, "rfield", "--set", "model.no_such_key=1"])
    assert bad.returncode == 2 and bad.stderr.strip() == "wavenet-ae rfield: error: unknown config key 'model.no_such_key'"


@needs_script
def test_errors_name_the_form_the_command_was_started_with(tmp_path):
    missing = tmp_path / "nope"
    a = run([EXE, "generate", "--run-dir", str(missing), "--input", "x.wav", "--out", "y.wav"])
    assert a.returncode == 2
    assert a.stderr.strip() == f"wavenet-ae generate: error: run dir {missing} does not exist"
    b = run([sys.executable, "-m", "wavenet_ae.generate", "--run-dir", str(missing), "--input", "x.wav",
             "--out", "y.wav"])
    assert b.stderr.strip() == f"python -m wavenet_ae.generate: error: run dir {missing} does not exist"


@needs_script
def test_unknown_verb_and_no_verb():
    r = run([EXE, "fly"])
    assert r.returncode == 2 and "unknown verb 'fly'" in r.stderr and "train" in r.stderr
    assert run([EXE]).returncode == 2
    h = run([EXE, "--help"])
    assert h.returncode == 0 and all(v in h.stdout for v in cli.VERBS)


def test_device_defaults_to_cuda_when_available(monkeypatch):
    import torch
    ap = cli.parser("encode", "x")
    cli.add_device(ap)
    for avail, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=avail: a)
        assert cli.resolve_device(ap, ap.parse_args([]).device) == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        cli.resolve_device(ap, "cuda")
    assert cli.resolve_device(ap, "cpu") == "cpu"


@pytest.mark.parametrize("verb", ["train", "encode", "evaluate"])
def test_verbs_that_load_a_model_take_device(verb, capsys):
    """--device, defaulting to cuda when available (generate picks its device with --engine auto)."""
    with pytest.raises(SystemExit):
        importlib.import_module(cli.VERBS[verb]).main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--device {cpu,cuda}" in out and "default: cuda when a CUDA device is available" in out
