"""Corpus indexing speed: building the index (1 thread, the pool), a warm start from the index cache, the
manifest maker, per file and projected to LibriSpeech's 281,241 files.

    python benchmarks/index_speed.py [--files N] [--threads 1,8] [--repeat R] [--format flac|wav] [--cold]
                                     [--corpus DIR [--speaker-level N]] [--json] [--json-out PATH] [--check-args]

Without --corpus, a synthetic corpus of N tiny files (0.05 s each) in LibriSpeech's layout
(subset/speaker/chapter/utt.flac, 50 files a chapter, 2 chapters a speaker) is written to a temporary
folder; with --corpus an existing one is indexed (e.g. a real LibriSpeech root with --speaker-level 2).
Cases, each the best of R runs:
  reference     the former index: sorted(rglob), then sf.info of every file, one at a time
  build         index_corpus without a cache, at each --threads
  build+cache   index_corpus writing a new cache (the first start of a run)
  warm          index_corpus with an up-to-date cache: folders listed and files stat'ed, no header read
  trusted       index_corpus(trust_cache=True): the cache read alone (the other ranks of a run)
  manifest      python -m wavenet_ae.data.manifest's listing (no header read)
The files are in the page cache (written just before, or read by the first run), unless --cold: then
before every run each file's cached pages are dropped (posix_fadvise DONTNEED; folders and inodes stay
cached), so headers are read from the disk, as at the first start after a reboot. A network file system
costs more per file again, and that is where threads help most.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

LIBRISPEECH_FILES = 281_241          # train 960 h + dev + test, all subsets


def make_corpus(root: Path, n_files: int, fmt: str) -> Path:
    """n_files tiny files as LibriSpeech lays them out; returns the root (speaker level 2)."""
    import soundfile as sf
    wav = (0.1 * np.random.default_rng(0).standard_normal(800)).astype(np.float32)
    root = root / "LibriSpeech"
    for k in range(n_files):
        spk, chap, utt = k // 100, (k // 50) % 2, k % 50
        subset = "dev-clean" if spk % 20 == 19 else "train-clean-100"
        d = root / subset / str(spk) / str(chap)
        if utt == 0:
            d.mkdir(parents=True, exist_ok=True)
        sf.write(d / f"{spk}-{chap}-{utt:04d}.{fmt}", wav, 16000, format=fmt.upper())
    return root


def reference_index(source: Path, speaker_level: int) -> int:
    """The index as it was before the cache: sorted(rglob), then sf.info per file, serially."""
    import soundfile as sf
    n = 0
    for p in sorted(source.rglob("*")):
        parts = p.relative_to(source).parts
        if p.is_file() and len(parts) > speaker_level and p.suffix.lower() in (".wav", ".flac", ".ogg"):
            sf.info(str(p))
            n += 1
    return n


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages only: sync first); no root needed."""
    os.sync()
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> int:
    from common import add_run_args
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000, help="synthetic corpus size (default 20000)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts for the build (default: 1 and corpus.default_threads())")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    ap.add_argument("--format", choices=("flac", "wav"), default="flac", help="synthetic files' format")
    ap.add_argument("--cold", action="store_true",
                    help="drop the files from the page cache before every run (headers read from the disk)")
    ap.add_argument("--corpus", default=None, metavar="DIR", help="index this folder instead of a synthetic one")
    ap.add_argument("--speaker-level", type=int, default=2, help="with --corpus: the speaker folder's depth")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    add_run_args(ap, "case")
    args = ap.parse_args(argv)

    from common import environment, format_table
    from wavenet_ae.data import corpus as C
    from wavenet_ae.data.manifest import manifest_rows

    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, C.default_threads()})
    if any(t < 1 for t in threads) or args.files < 1 or args.repeat < 1:
        ap.error("--threads, --files and --repeat must be positive")
    env = environment()
    print(f"# index_speed: {env['cpu']} ({env['cpu_cores']} cores), python {env['python']}, "
          f"soundfile direct sf_open: {C._sf_lib is not None}")
    if args.check_args:
        print(json.dumps({"files": args.files, "threads": threads, "repeat": args.repeat, "format": args.format,
                          "cold": args.cold,
                          "corpus": args.corpus, "speaker_level": args.speaker_level, "json_out": args.json_out}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="index_speed-"))
    try:
        if args.corpus:
            root, level = Path(args.corpus), args.speaker_level
        else:
            t = time.perf_counter()
            root, level = make_corpus(work, args.files, args.format), 2
            print(f"# wrote {args.files} {args.format} files of 0.05 s in {time.perf_counter() - t:.1f} s")
        cache = work / C.INDEX_CACHE_NAME
        warnings.simplefilter("ignore")

        def index(**kw):
            return C.index_corpus(root, 16000, 1, speaker_level=level, **kw)

        paths = [p for p, _ in C.walk_corpus(root, level)] if args.cold else []

        def best(fn) -> float:
            times = []
            for _ in range(args.repeat):
                evict(paths)
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        def fresh(**kw):
            cache.unlink(missing_ok=True)
            return index(cache=cache, **kw)

        n = len(index(threads=max(threads)).utterances)       # also brings the files into the page cache
        cases = [("reference", 1, lambda: reference_index(root, level))]
        cases += [("build", t, lambda t=t: index(threads=t)) for t in threads]
        cases += [("build+cache", t, lambda t=t: fresh(threads=t)) for t in threads]
        fresh()
        cases += [("warm", t, lambda t=t: index(cache=cache, threads=t)) for t in threads]
        cases += [("trusted", None, lambda: index(cache=cache, trust_cache=True)),
                  ("manifest", None, lambda: manifest_rows([root], work / "m.tsv", level))]
        rows = []
        for name, t, fn in cases:
            s = best(fn)
            rows.append({"case": name, "threads": t, "files": n, "cold": args.cold, "seconds": s,
                         "ms_per_file": 1e3 * s / n,
                         "projected_s": s / n * LIBRISPEECH_FILES})
        ref = rows[0]["seconds"]
        for r in rows:
            r["speedup"] = ref / r["seconds"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cols = [("case", "case"), ("threads", "threads"), ("files", "files"), ("seconds", "s"),
            ("ms_per_file", "ms/file"), ("speedup", "x ref"), ("projected_s", f"s at {LIBRISPEECH_FILES:,}")]
    print(format_table(rows, cols))
    print(f"# best of {args.repeat}; the projection scales this run's time per file linearly; files "
          + ("dropped from the page cache before every run (--cold)" if args.cold else "in the page cache"))
    if args.json:
        print(json.dumps(rows, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
