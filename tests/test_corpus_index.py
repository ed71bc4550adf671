"""Corpus indexing at scale: a LibriSpeech-shaped tree (subset/speaker/chapter/utt.flac) of thousands of
tiny files, a symlinked speaker folder, speaker levels, the manifest maker, the index cache (what it
probes again), and the thread pool."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from wavenet_ae.data import corpus as C
from wavenet_ae.data import manifest as M
from wavenet_ae.data.corpus import index_corpus

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
MIN = 400                      # min_samples: the 0.05 s files (800 samples) pass, 0.01 s ones do not


def _flac(path: Path, n: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = 0.1 * np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    sf.write(path, wav, SR, format="FLAC")


def _librispeech(base: Path, n_speakers: int = 50, chapters: int = 2, utts: int = 20) -> tuple[Path, dict]:
    """base/LibriSpeech/{train-clean-100,dev-clean}/SPK/CHAP/SPK-CHAP-NNNN.flac, a .trans.txt per
    chapter, one speaker folder that is a link to base/elsewhere/, a link back up (a cycle), one short
    and one corrupt file. Returns (root, {speaker: number of usable files})."""
    root = base / "LibriSpeech"
    want: dict[str, int] = {}
    k = 0
    for s in range(n_speakers):
        spk = str(100 + s)
        subset = "dev-clean" if s % 5 == 4 else "train-clean-100"
        top = (base / "elsewhere" / spk) if s == 7 else (root / subset / spk)
        for c in range(chapters):
            chap = top / str(1000 + c)
            for u in range(utts):
                _flac(chap / f"{spk}-{1000 + c}-{u:04d}.flac", 800, k)
                k += 1
            (chap / f"{spk}-{1000 + c}.trans.txt").write_text("TEXT\n")
        want[spk] = chapters * utts
    (root / "train-clean-100" / "107").symlink_to(base / "elsewhere" / "107", target_is_directory=True)
    (root / "train-clean-100" / "100" / "1000" / "up").symlink_to("../..", target_is_directory=True)
    _flac(root / "train-clean-100" / "101" / "1000" / "101-1000-short.flac", 160)
    (root / "train-clean-100" / "101" / "1000" / "101-1000-bad.flac").write_bytes(b"fLaC" + b"\0" * 40)
    (root / "SPEAKERS.TXT").write_text("; speakers\n")
    return root, want


@pytest.fixture(scope="module")
def libri(tmp_path_factory):
    """2000 files + 3 (one short, one corrupt) = read-only for the tests that share it."""
    return _librispeech(tmp_path_factory.mktemp("libri"))


@pytest.fixture
def count_probes(monkeypatch):
    calls: list[str] = []
    real = C._probe

    def probe(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(C, "_probe", probe)
    return calls


def _index(source, **kw):
    """index_corpus, and the warnings it gave (messages, in order)."""
    kw.setdefault("sample_rate", SR)
    kw.setdefault("min_samples", MIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = index_corpus(source, **kw)
    return corpus, [str(w.message) for w in caught]


def test_speaker_level_2_reads_librispeech_speakers_and_follows_links(libri):
    root, want = libri
    corpus, msgs = _index(root, speaker_level=2)
    by_speaker = {s: sum(u.speaker == s for u in corpus.utterances) for s in corpus.speakers}
    assert by_speaker == want                                  # speaker 107 lives behind a link
    assert all(u.n_samples == 800 for u in corpus.utterances)
    assert any("/train-clean-100/107/1000/107-1000-0000.flac" in u.path for u in corpus.utterances)
    assert sorted(os.path.basename(p) for p, _ in corpus.rejected) == ["101-1000-bad.flac", "101-1000-short.flac"]
    assert sum("skipping" in m and "/up: a link to a folder that contains it" in m for m in msgs) == 1
    assert not any("LibriSpeech root" in m for m in msgs)
    # level 1 on the root: the subsets would be the speakers; one warning line says so
    corpus1, msgs1 = _index(root)
    assert corpus1.speakers == ["dev-clean", "train-clean-100"]
    hints = [m for m in msgs1 if "looks like a LibriSpeech root" in m]
    assert len(hints) == 1 and "\n" not in hints[0] and "--speaker-level 2" in hints[0]
    # level 1 on a subset folder is the usual layout
    sub, _ = _index(root / "dev-clean")
    assert sub.speakers == sorted(s for s in want if int(s) % 5 == 4)


def test_manifest_maker_lists_what_the_directory_indexes(libri, tmp_path, capsys):
    root, want = libri
    out = root.parent / "manifest.tsv"                         # beside the corpus: relative paths
    assert M.main([str(root), "--out", str(out), "--speaker-level", "2"]) == 0
    assert f"{len(want) * 40 + 2} files, {len(want)} speakers" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[0] == "path\tspeaker" and lines[1].startswith("LibriSpeech/dev-clean/104/1000/")
    from_dir, _ = _index(root, speaker_level=2)
    from_manifest, _ = _index(out)
    assert ([(os.path.normpath(u.path), u.speaker, u.n_samples) for u in from_manifest.utterances]
            == [(os.path.normpath(u.path), u.speaker, u.n_samples) for u in from_dir.utterances])
    # elsewhere: absolute paths; several folders at level 1
    out2 = tmp_path / "train.tsv"
    assert M.main([str(root / "train-clean-100"), str(root / "dev-clean"), "--out", str(out2)]) == 0
    rows = out2.read_text().splitlines()[1:]
    assert len(rows) == len(want) * 40 + 2 and all(r.startswith(str(root)) for r in rows)
    capsys.readouterr()
    # errors are one line
    assert M.main([str(tmp_path / "nowhere"), "--out", str(out2)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nowhere is not a folder" in err
    # a LibriSpeech root at level 1 is written, with a warning line
    assert M.main([str(root), "--out", str(tmp_path / "l1.tsv")]) == 0
    assert "looks like a LibriSpeech root" in capsys.readouterr().err


def test_threads_and_cache_give_identical_results(libri, tmp_path, count_probes, monkeypatch):
    root, _ = libri
    ref, ref_msgs = _index(root, speaker_level=2, threads=1)
    assert len(count_probes) == len(ref.utterances) + 2        # each audio header read once
    many, msgs = _index(root, speaker_level=2, threads=8)
    assert many == ref and msgs == ref_msgs
    cache = tmp_path / C.INDEX_CACHE_NAME
    built, msgs = _index(root, speaker_level=2, threads=8, cache=cache)
    assert built == ref and msgs == ref_msgs
    del count_probes[:]
    warm, msgs = _index(root, speaker_level=2, cache=cache)
    assert warm == ref and msgs == ref_msgs and count_probes == []
    # trust_cache: neither lists folders (no warning about the link cycle) nor reads headers, same index
    monkeypatch.setattr(C, "_entries", lambda *a: pytest.fail("trust_cache listed the folders"))
    trusted, msgs = _index(root, speaker_level=2, cache=cache, trust_cache=True)
    assert trusted == ref and msgs == [m for m in ref_msgs if "/up:" not in m] and count_probes == []


def test_the_cache_reads_again_only_what_changed(tmp_path, count_probes):
    root, _ = _librispeech(tmp_path, n_speakers=50, chapters=1, utts=40)    # 2000 files
    cache = tmp_path / "run" / C.INDEX_CACHE_NAME
    cache.parent.mkdir()
    first, _ = _index(root, speaker_level=2, cache=cache)
    assert len(count_probes) == len(first.utterances) + 2 and cache.is_file()
    inode = cache.stat().st_ino
    del count_probes[:]
    again, _ = _index(root, speaker_level=2, cache=cache)
    assert again == first and count_probes == []
    assert cache.stat().st_ino == inode                         # unchanged: not written again
    # touch 3 (one longer, two with a new mtime only), add 2, remove 2
    chap = root / "train-clean-100" / "100" / "1000"
    _flac(chap / "100-1000-0000.flac", 1600)
    for name in ("100-1000-0001.flac", "100-1000-0002.flac"):
        st = os.stat(chap / name)
        os.utime(chap / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _flac(chap / "100-1000-9000.flac", 800)
    _flac(root / "train-clean-100" / "999" / "1" / "999-1-0000.flac", 800)
    (chap / "100-1000-0003.flac").unlink()
    (root / "dev-clean" / "104" / "1000" / "104-1000-0000.flac").unlink()
    del count_probes[:]
    changed, _ = _index(root, speaker_level=2, cache=cache)
    assert sorted(os.path.basename(p) for p in count_probes) == sorted(
        ["100-1000-0000.flac", "100-1000-0001.flac", "100-1000-0002.flac", "100-1000-9000.flac", "999-1-0000.flac"])
    names = {os.path.basename(u.path): u for u in changed.utterances}
    assert "100-1000-0003.flac" not in names and "104-1000-0000.flac" not in names
    assert names["100-1000-0000.flac"].n_samples == 1600 and "999" in changed.speakers
    assert len(changed.utterances) == len(first.utterances) + 2 - 2
    assert not list(cache.parent.glob(".*tmp*"))                # the atomic write left no temporary file
    del count_probes[:]
    fresh, _ = _index(root, speaker_level=2)                   # the cached result is the uncached one
    assert fresh == changed
    assert _index(root, speaker_level=2, cache=cache)[0] == changed


def test_rejections_are_warned_with_or_without_the_cache(tmp_path):
    root, _ = _librispeech(tmp_path, n_speakers=3, chapters=1, utts=2)
    (root / "train-clean-100" / "100" / "1000" / "notes.mp3").write_bytes(b"ID3")
    cache = tmp_path / C.INDEX_CACHE_NAME
    runs = [_index(root, speaker_level=2, cache=cache) for _ in range(2)]
    runs.append(_index(root, speaker_level=2, cache=cache, trust_cache=True))
    skips = [[m for m in msgs if m.startswith("skipping") and "/up:" not in m] for _, msgs in runs]
    assert len(skips[0]) == 3 and skips[0] == skips[1] == skips[2]
    assert [r.rejected for r, _ in runs] == [runs[0][0].rejected] * 3
    assert {r.split(" ")[0] for _, r in runs[0][0].rejected} == {"unreadable:", "too", "unknown"}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad number", "binary", "empty"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, count_probes, damage):
    root, _ = _librispeech(tmp_path, n_speakers=4, chapters=1, utts=3)
    cache = tmp_path / C.INDEX_CACHE_NAME
    ref, _ = _index(root, speaker_level=2, cache=cache)
    lines = cache.read_text().split("\n")
    if damage == "garbage":
        cache.write_text("hello\n")
    elif damage == "truncated":
        cache.write_text("\n".join(lines[:-3]) + "\n")
    elif damage == "bad number":
        cells = lines[3].split("\t")
        cells[2] = "12x"
        cache.write_text("\n".join(lines[:3] + ["\t".join(cells)] + lines[4:]))
    elif damage == "binary":
        cache.write_bytes(bytes(range(256)) * 4)
    else:
        cache.write_bytes(b"")
    del count_probes[:]
    rebuilt, msgs = _index(root, speaker_level=2, cache=cache)
    assert rebuilt == ref and len(count_probes) == len(ref.utterances) + 2
    damaged = [m for m in msgs if "index cache" in m]
    assert len(damaged) == 1 and "damaged" in damaged[0] and "rebuilding" in damaged[0]
    del count_probes[:]
    assert _index(root, speaker_level=2, cache=cache)[0] == ref and count_probes == []


def test_a_cache_for_other_arguments_is_not_reused(tmp_path, count_probes):
    root, _ = _librispeech(tmp_path, n_speakers=4, chapters=1, utts=3)
    cache = tmp_path / C.INDEX_CACHE_NAME
    ref, _ = _index(root, speaker_level=2, cache=cache)
    n_probed = len(ref.utterances) + 2
    for kw in (dict(sample_rate=8000), dict(min_samples=700), dict(speaker_level=1)):
        del count_probes[:]
        other, msgs = _index(root, **{"speaker_level": 2, **kw}, cache=cache)
        assert len(count_probes) == n_probed and not any("index cache" in m for m in msgs), kw
        assert other == _index(root, **{"speaker_level": 2, **kw})[0]
    assert _index(root, sample_rate=8000, min_samples=MIN // 2, speaker_level=2)[0].utterances[0].n_samples == 400
    # another source (the same files through a manifest) is another cache
    manifest = tmp_path / "m.tsv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # the link cycle
        M.write_manifest(manifest, M.manifest_rows([root], manifest, 2)[0])
    del count_probes[:]
    _index(manifest, cache=cache)
    assert len(count_probes) == n_probed
    # a trusted cache of a manifest that changed since is not taken; trust_cache never writes
    del count_probes[:]
    manifest.write_text(manifest.read_text() + "LibriSpeech/train-clean-100/100/1000/100-1000-0000.flac\tX\n")
    before = cache.read_bytes()
    trusted, _ = _index(manifest, cache=cache, trust_cache=True)
    assert "X" in trusted.speakers and cache.read_bytes() == before
    assert count_probes == []                          # listed again, the headers still from the cache


def test_walk_matches_sorted_rglob_and_odd_names_survive_the_cache(tmp_path, count_probes):
    """Utterance order and path spelling are those of the former `sorted(rglob)` index (a run's data
    stream and its hashed train/valid split depend on them); names with a tab or a backslash and a
    broken link go through the cache."""
    r = tmp_path / "c"
    for f in ["a/1.wav", "a-b/1.wav", "a/x/2.wav", "a/x-y/3.wav", "a/x.wav", "a/x-.wav", "B/z.wav", "a b/q.flac",
              "a.c/r.wav", "a/\u00e4.wav", "a/_.wav", "a/X.wav", "a/t\tab.wav", "a/back\\slash.wav"]:
        _flac(r / f, 800)
    (r / "top.wav").write_bytes(b"")
    (r / "a" / "n.txt").write_text("x")
    (r / "B" / "gone.wav").symlink_to(tmp_path / "nowhere.wav")

    def old(source):
        return [(str(p), p.relative_to(source).parts[0]) for p in sorted(Path(source).rglob("*"))
                if p.is_file() and len(p.relative_to(source).parts) >= 2
                and not p.name.endswith((".tsv", ".txt", ".md", ".json"))]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        for src in ("c", "c/", "./c", str(r), "../" + tmp_path.name + "/c"):
            assert [e for e in C.walk_corpus(src) if "gone" not in e[0]] == old(src), src
        os.chdir(r)
        assert [e for e in C.walk_corpus(".") if "gone" not in e[0]] == old(".")
    finally:
        os.chdir(cwd)
    cache = tmp_path / C.INDEX_CACHE_NAME
    ref, msgs = _index(r, cache=cache)
    assert any("B/gone.wav: missing file" in m for m in msgs)
    del count_probes[:]
    again, _ = _index(r, cache=cache)
    assert again == ref and count_probes == [] and any("\t" in u.path for u in again.utterances)


def test_the_manifest_cli_and_the_benchmark_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.data.manifest", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "m.tsv")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'nowhere'} is not a folder\n"
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "benchmarks/index_speed.py", "--files", "150", "--repeat", "1",
                        "--threads", "1,4", "--json-out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["case"], x["threads"]) for x in rows] == [
        ("reference", 1), ("build", 1), ("build", 4), ("build+cache", 1), ("build+cache", 4), ("warm", 1),
        ("warm", 4), ("trusted", None), ("manifest", None)]
    assert all(x["files"] == 150 and x["seconds"] > 0 for x in rows) and "s at 281,241" in r.stdout
