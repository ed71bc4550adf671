"""report.html end to end: the report of a briefly trained run, opened in Debian's Chromium, headless,
driven by selenium. Skipped when the browser is missing, unless CI is set (scripts/test.sh installs it:
there a missing browser is a failure)."""
import html
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# a speaker folder and a run dir whose names would be markup if they were not escaped
ODD_SPEAKER = "ked<b>&\"'x"
ODD_RUN = "run <i>&\"'"


def _need_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        msg = (f"missing {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium; "
               f"scripts/test.sh does both)")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the browser test cannot run: {msg}")
        pytest.skip(msg)


class _Refs(HTMLParser):
    """Tags, and every attribute that makes a browser fetch something."""
    def __init__(self):
        super().__init__()
        self.tags, self.refs = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "poster", "data",
                                                                      "action", "background")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A run trained 6 steps on the demo corpus (one speaker renamed ODD_SPEAKER) and its report: 2 files
    resynthesised and converted, 0.5 s each."""
    from wavenet_ae.data import DEMO_CORPUS
    tmp = tmp_path_factory.mktemp("report_html")
    corpus = tmp / "corpus"
    shutil.copytree(DEMO_CORPUS, corpus)
    (corpus / "ked").rename(corpus / ODD_SPEAKER)
    rows = [line.split("\t") for line in (corpus / "split.tsv").read_text().splitlines()]
    for r in rows[1:]:
        if r[1] == "ked":
            r[0], r[1] = r[0].replace("ked/", ODD_SPEAKER + "/", 1), ODD_SPEAKER
    (corpus / "split.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    run = tmp / ODD_RUN
    small = ["n_enc=24", "n_latent=8", "n_codes=32", "n_res=12", "n_dil=12", "n_skp=24", "n_post=24",
             "n_lc_out=16", "n_block_layers=6", "n_batch=4", "validate_every=3", "vq_warmup_steps=2"]
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run), "--preset", "tiny",
                        "--data", str(corpus), "--max-steps", "6", "--set", *small],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.evaluate", "--run-dir", str(run), "--data", str(corpus),
                        "--n-resynth", "2", "--seconds", "0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    page = run / "report" / "report.html"
    assert f"written to {page}" in r.stderr
    return run, page


def test_report_html_is_self_contained_and_escaped(report):
    run, page = report
    text = page.read_text()
    rep = json.loads((run / "report" / "report.json").read_text())
    parser = _Refs()
    parser.feed(text)
    assert not parser.tags & {"script", "link", "iframe", "object", "embed", "base"}
    assert parser.refs and all(v.startswith(("data:image/png;base64,", "data:audio/wav;base64,"))
                               for _, _, v in parser.refs), [(t, k, v[:60]) for t, k, v in parser.refs]
    assert "http:" not in text and "https:" not in text and "url(" not in text
    assert sum(t == "audio" for t, _, _ in parser.refs) == 3 * len(rep["resynthesis"]) == 6
    # names from the file system are text, never markup
    for odd in (ODD_SPEAKER, str(run)):
        assert odd not in text and html.escape(odd) in text
    assert not parser.tags & {"b", "i"}
    # report.md's tables are here, and report.md links the page
    for e in rep["resynthesis"]:
        assert f"<td>{html.escape(Path(e['file']).name)}</td>" in text
        assert f'<td class="num">{e["mcd_db"]:.2f}</td>' in text
    assert "[report.html](report.html)" in (run / "report" / "report.md").read_text()
    assert not list(page.parent.glob(".report.html.tmp*"))                  # the atomic write's temp file
    assert page.stat().st_size < 2_000_000


def test_report_html_in_headless_chromium(report, tmp_path):
    _need_browser()
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    run, page = report
    rep = json.loads((run / "report" / "report.json").read_text())
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)          # explicit paths: selenium-manager downloads nothing
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.get(page.as_uri())
        media = "return Array.from(document.querySelectorAll('audio')).map(a => ({file: a.dataset.file, " \
                "role: a.dataset.role, ready: a.readyState, error: a.error && a.error.code, duration: a.duration}))"
        WebDriverWait(driver, 30).until(lambda d: all(a["ready"] >= 1 or a["error"] is not None
                                                      for a in d.execute_script(media)))
        audio = driver.execute_script(media)
        imgs = driver.execute_script("return Array.from(document.images).map(i => ({alt: i.alt, "
                                     "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))")
        body = driver.find_element(By.TAG_NAME, "body").text
        h1 = driver.find_element(By.TAG_NAME, "h1").text
        odd_elements = driver.find_elements(By.CSS_SELECTOR, "b, i, script")
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        log = driver.get_log("browser")
    finally:
        driver.quit()
    print(f"screenshot: {shot}")
    print("audio:", audio)
    print("images:", imgs)
    assert [e for e in log if e["level"] == "SEVERE"] == []

    assert len(audio) == 6
    for a in audio:
        assert a["error"] is None and a["ready"] >= 1, a
        assert a["duration"] == pytest.approx(sf.info(str(run / "report" / a["file"])).duration, abs=0.01), a
    assert [a["role"] for a in audio] == ["input", "resynthesis", "conversion"] * 2
    assert [a["file"] for a in audio if a["role"] == "conversion"] == [e["audio"]["conversion"]
                                                                     for e in rep["resynthesis"]]

    assert len(imgs) == 5                      # loss, receptive field, codebook usage, 2 spectrograms
    for i in imgs:
        assert i["complete"] and i["width"] > 0 and i["height"] > 0, i
    loss = next(i for i in imgs if i["alt"] == "loss.png")
    assert loss["width"] == Image.open(run / "report" / "loss.png").width

    # escaped names read as text in the page, and made no elements
    assert h1 == f"Evaluation of {run}" and odd_elements == []
    assert f"converted to speaker {ODD_SPEAKER}" in body
    for e in rep["resynthesis"]:
        assert Path(e["file"]).name in body and f"{e['mcd_db']:.2f}" in body

    img = np.asarray(Image.open(shot).convert("RGB"))
    print("screenshot size", img.shape)
    assert img.shape[1] >= 1000 and img.shape[0] >= 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50        # text and figures, not a blank page


def test_long_clips_are_embedded_cut_to_pcm16(tmp_path):
    """A float wav longer than MAX_EMBED_SECONDS goes into the page as its first seconds, 16-bit PCM."""
    import base64
    import io
    from wavenet_ae.evaluate.html import MAX_EMBED_SECONDS, wav_data_uri
    sr = 16000
    x = (0.5 * np.sin(2 * np.pi * 220 * np.arange(int((MAX_EMBED_SECONDS + 2.5) * sr)) / sr)).astype(np.float32)
    sf.write(tmp_path / "long.wav", x, sr, subtype="FLOAT")
    uri, seconds = wav_data_uri(tmp_path / "long.wav")
    assert uri.startswith("data:audio/wav;base64,") and seconds == MAX_EMBED_SECONDS
    data = base64.b64decode(uri.split(",", 1)[1])
    info = sf.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.samplerate) == ("WAV", "PCM_16", sr)
    y, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert len(y) == MAX_EMBED_SECONDS * sr and np.abs(y - x[:len(y)]).max() < 1e-4


def test_report_without_resynthesis_has_no_players(report):
    """--n-resynth 0: the page still renders, with the tables and figures and no audio."""
    from wavenet_ae.evaluate.html import render
    from wavenet_ae.evaluate.report import report_tables
    run, page = report
    rep = json.loads((run / "report" / "report.json").read_text()) | {"resynthesis": []}
    text = render(rep, report_tables(rep), run / "report")
    assert "<audio" not in text and "Listen:" not in text
    assert "<h2>Resynthesis and voice conversion</h2>" in text and text.count("<img") == 3
