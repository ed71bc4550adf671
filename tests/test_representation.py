"""benchmarks/representation.py: its summary, targets and plot on fake runs with known numbers, and
the script end to end on a very short run."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wavenet_ae.config import preset

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rep = _load("representation")


def _train_records(steps, t0):
    return [{"step": s, "kind": "train", "time": t0 + i, "ce": 3.0} for i, s in enumerate(steps)]


def test_training_minutes_leave_out_the_time_between_interruption_and_resume():
    log = (_train_records(range(10, 101, 10), 0)            # 9 intervals of 1 s
           + [{"kind": "event", "time": 10, "message": "stopped by signal"}]
           + _train_records(range(60, 101, 10), 1000)       # resumed from step 50: 4 intervals
           + _train_records(range(110, 151, 10), 2000))     # killed after a checkpoint at 100: 4 intervals
    assert rep.training_minutes(log) == pytest.approx(17 / 60)
    assert rep.training_minutes([]) is None


def _fake_run(root, bottleneck, gains, probes, abx, perplexity=None, active_dims=None):
    d = root / f"{bottleneck}-seed0"
    (d / "report").mkdir(parents=True)
    cfg = preset("tiny")
    cfg.model.bottleneck, cfg.train.seed = bottleneck, 0
    (d / "config.json").write_text(cfg.to_json())
    (d / "speakers.json").write_text(json.dumps([f"s{i}" for i in range(6)]))
    valid = [{"step": 250 * (i + 1), "kind": "valid", "time": 0.0, "ce": 3.0 - 0.1 * i, "conditioning_gain": g,
              "speaker_gain": 0.01} for i, g in enumerate(gains)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _train_records(range(10, 31, 10), 0) + valid))
    rec = {"ce": 3.0, "conditioning_gain": gains[-1]}
    if perplexity is not None:
        rec.update(perplexity=perplexity, codes_used=40)
    if active_dims is not None:
        rec["active_dims"] = active_dims
    report = {"step": 250 * len(gains), "reconstruction": rec,
              "probe_accuracy": dict(zip(["phone_latents", "phone_mfcc", "speaker_latents", "speaker_mfcc"], probes)),
              "abx": {"latents": {"within": abx[0], "across": abx[1]},
                      "mfcc": {"within": abx[2], "across": abx[3]}}}
    (d / "report" / "report.json").write_text(json.dumps(report))
    return d


def test_summary_targets_and_plot_of_fake_runs(tmp_path):
    # vqvae: gain rising to 0.05 (0.02 at mid-run), perplexity 20 >= 64 / 4, phones 0.6 >= 0.5,
    # speakers 0.2 <= (1/6 + 0.6) / 2, ABX within 5% vs MFCC 1% (missed), across 10% vs 20% (met)
    vq = rep.summarize(_fake_run(tmp_path, "vqvae", [0.01, 0.02, 0.03, 0.05], [0.6, 0.5, 0.2, 0.6], [5, 10, 1, 20],
                                 perplexity=20.0))
    ae = rep.summarize(_fake_run(tmp_path, "ae", [0.2, 0.3, 0.2, 0.1], [0.7, 0.5, 0.6, 0.6], [3, 9, 1, 20]))
    vae = rep.summarize(_fake_run(tmp_path, "vae", [0.03, 0.04], [0.5, 0.5, 0.5, 0.6], [3, 9, 1, 20],
                                  active_dims=7))
    assert vq["steps"] == 1000 and vq["minutes"] == pytest.approx(2 / 60)
    assert vq["gain"] == 0.05 and vq["gain_mid"] == 0.02 and vq["valid_ce"] == pytest.approx(2.7)
    assert vq["codebook"] == (20.0, 40) and ae["codebook"] is None and vae["active_dims"] == 7
    assert vq["phone"] == (0.6, 0.5) and vq["abx_across"] == (10, 20)
    lines = rep.targets([ae, vae, vq])
    print("\n".join(lines))
    status = [line.split("]")[0][1:] for line in lines]
    assert status == ["missed", "met", "met", "met", "missed", "met"]
    assert "ae-seed0 0.100 (mid-run 0.300) (missed)" in lines[0] and "vae-seed0 0.040" in lines[0]
    assert rep.targets([ae])[1].startswith("[n/a] vqvae codebook")
    table = rep.markdown_table([vq], rep.COLUMNS)
    assert "| vqvae | 0 | 1000 |" in table and "| 0.600 / 0.500 |" in table
    rep.plot([ae, vae, vq], tmp_path / "gain.png")
    assert (tmp_path / "gain.png").stat().st_size > 1000


def test_representation_script_end_to_end(tmp_path):
    """20 steps of one bottleneck: trains with the documented command, evaluates, prints and writes the
    table and the target lines, plots."""
    out = tmp_path / "rep"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "representation.py"), "--bottlenecks", "vqvae",
           "--steps", "20", "--out", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:] + (out / "vqvae-seed0.out").read_text()[-3000:]
    print(r.stdout)
    assert "| vqvae | 0 | 20 |" in r.stdout and "[missed] conditioning gain" in r.stdout
    assert (out / "representation.md").read_text().strip() == r.stdout.strip()
    assert (out / "conditioning_gain.png").stat().st_size > 1000
    assert json.loads((out / "vqvae-seed0" / "report" / "report.json").read_text())["step"] == 20
    n_records = len((out / "vqvae-seed0" / "log.jsonl").read_text().splitlines())
    assert n_records == 3                                   # train at 10, 20; validation at 20


def test_issue20_targets_variants_and_tracked_reports_of_fake_runs(tmp_path):
    """targets_20 on known numbers; a run named V-B-seedS reads as variant V; a kept report-stepK
    shows in the tracked column."""
    d = _fake_run(tmp_path, "vqvae", [0.3, 0.2, 0.25, 0.3], [0.6, 0.5, 0.3, 0.6], [5, 10, 1, 20], perplexity=20.0)
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    for r in log:
        if r["kind"] == "valid":
            r.update(speaker_gain=0.05 * r["step"] / 250, probe_phone_latents=0.1 * r["step"] / 250)
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    report = json.loads((d / "report" / "report.json").read_text())
    report["resynthesis"] = [{"conversion_frames_judged_target": v} for v in (0.4, 0.7)]
    (d / "report" / "report.json").write_text(json.dumps(report))
    (d / "report-step500").mkdir()
    (d / "report-step500" / "report.json").write_text(json.dumps(
        {"step": 500, "probe_accuracy": {"phone_latents": 0.4}, "abx": {"latents": {"across": 30.0}},
         "resynthesis": [{"conversion_frames_judged_target": 0.25}]}))
    r = rep.summarize(d.rename(tmp_path / "combo-vqvae-seed0"))
    assert r["variant"] == "combo" and rep._variant_of("vqvae-seed3", "vqvae") == "-"
    assert r["vc_target"] == pytest.approx(0.55) and r["speaker_gain"] == pytest.approx(0.2)
    assert r["gains_mid_end"] == (0.2, 0.3) and r["probe_phone_mid_end"] == (pytest.approx(0.2), pytest.approx(0.4))
    assert r["track_vc_phone"] == "500: 0.400 / 30.0 / 0.25"
    lines = rep.targets_20([r])
    print("\n".join(lines))
    # phones 0.6 >= 0.5 met; ABX across 10 < 20 met; speaker 0.3 <= (1/6 + 0.6)/2 met; VC 0.55 met;
    # speaker gain 0.2 met; gain 0.3 >= mid-run 0.2 met
    assert [line.split("]")[0][1:] for line in lines] == ["met"] * 6
    r["vc_target"], r["speaker_gain"] = 0.3, 0.05
    assert [line.split("]")[0][1:] for line in rep.targets_20([r])][3:5] == ["missed", "missed"]
    assert "| combo | vqvae | 0 |" in rep.markdown_table([r], rep.COLUMNS_20)
    # --all-runs tabulates every evaluated run of the folder, not one without its report
    (tmp_path / "baseline-vqvae-seed1").mkdir()
    (tmp_path / "baseline-vqvae-seed1" / "config.json").write_text("{}")
    assert [d.name for d in rep.finished_runs(tmp_path)] == ["combo-vqvae-seed0"]


def test_variants_parse_from_the_table_and_the_command_line():
    assert rep.parse_variants("", []) == [(None, [])]
    got = rep.parse_variants("baseline,cmvn", ["wide=n_global_embed=64,speaker_in_lc=true"])
    assert got == [("baseline", []), ("cmvn", rep.VARIANTS["cmvn"]),
                   ("wide", ["n_global_embed=64", "speaker_in_lc=true"])]
    with pytest.raises(SystemExit, match="unknown variant"):
        rep.parse_variants("nope", [])
    with pytest.raises(SystemExit, match="NAME=KEY=VAL"):
        rep.parse_variants("", ["bad-name=n_codes=3"])
    # every built-in variant is a valid override of the small preset
    for sets in rep.VARIANTS.values():
        preset("small").with_overrides(sets)


def test_a_run_as_it_stood_at_a_step(tmp_path):
    """--at-step K: a screening's budget. The row takes the validation records up to K and the report
    made at K (a tracked report-stepK, or the final report when it was made at K); a run with no report
    at K is left out."""
    d = _fake_run(tmp_path, "vqvae", [0.3, 0.2, 0.25, 0.35], [0.6, 0.5, 0.3, 0.6], [5, 10, 1, 20], perplexity=20.0)
    (d / "report-step500").mkdir()
    (d / "report-step500" / "report.json").write_text(json.dumps(
        {"step": 500, "probe_accuracy": {"phone_latents": 0.4, "phone_mfcc": 0.5}, "abx": None}))
    r = rep.summarize(d, at_step=500)
    assert r["steps"] == 500 and r["gain"] == 0.2 and r["phone"] == (0.4, 0.5) and r["tracked"] == {}
    assert rep.summarize(d)["gain"] == 0.35 and rep.summarize(d, at_step=1000)["phone"] == (0.6, 0.5)
    assert [x.name for x in rep.finished_runs(tmp_path, 500)] == [d.name]
    assert rep.finished_runs(tmp_path, 750) == []
