"""Write a corpus manifest (`path<TAB>speaker`) from audio folders, reading no audio: only the folders
are listed, so it runs in seconds over LibriSpeech's 281k files (e.g. on a login node).

    python -m wavenet_ae.data.manifest DIR [DIR ...] --out manifest.tsv [--speaker-level N]

Speaker = the folder N deep in each DIR (1, the default: `DIR/speaker/...`; 2: a LibriSpeech root,
`DIR/subset/speaker/chapter/utt.flac`). Files with an audio extension (corpus.AUDIO_EXTENSIONS) are
listed in sorted order; symbolic links to folders are followed. Paths are written relative to the
manifest's folder when they lie under it, absolute otherwise. Several DIRs: their speaker names are
one namespace (the same name in two DIRs is one speaker).
"""
from __future__ import annotations

import csv
import io
import os
import sys
import warnings
from pathlib import Path

from .corpus import AUDIO_EXTENSIONS, LIBRISPEECH_SUBSETS, walk_corpus


def manifest_rows(dirs: list[str | Path], out: str | Path, speaker_level: int = 1) -> tuple[list, int]:
    """([(path as written, speaker)], number of non-audio files left out) for the folders `dirs`."""
    base = os.path.join(os.path.abspath(os.path.dirname(out) or "."), "")
    rows, other = [], 0
    for d in dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d} is not a folder")
        found = walk_corpus(d, speaker_level)
        subsets = sorted({s for _, s in found} & LIBRISPEECH_SUBSETS) if speaker_level == 1 else []
        if subsets:
            warnings.warn(f"{d} looks like a LibriSpeech root: its folders {', '.join(subsets)} are taken as "
                          f"the speakers; --speaker-level 2 takes the folders below them", stacklevel=2)
        for path, speaker in found:
            if not path.lower().endswith(AUDIO_EXTENSIONS):
                other += 1
                continue
            full = os.path.abspath(path)
            rel = full[len(base):] if full.startswith(base) else full
            if rel.startswith("#"):             # a manifest line starting with '#' is a comment
                rel = "./" + rel
            rows.append((rel, speaker))
    return rows, other


def write_manifest(path: str | Path, rows: list[tuple[str, str]]) -> None:
    """The TSV that corpus.index_corpus reads: header `path<TAB>speaker`, one file a line (csv quoting
    where a name needs it), written atomically."""
    from ..checkpoint import atomic_write
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["path", "speaker"])
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode("utf-8", errors="surrogateescape"))


def main(argv: list[str] | None = None) -> int:
    from .. import cli
    ap = cli.parser("manifest", __doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="audio folder(s)")
    ap.add_argument("--out", required=True, help="the manifest to write (e.g. manifest.tsv)")
    ap.add_argument("--speaker-level", type=int, default=1, metavar="N",
                    help="depth of the speaker folder below DIR: 1 = DIR/speaker/... (default), "
                         "2 = a LibriSpeech root (DIR/subset/speaker/chapter/utt.flac)")
    args = ap.parse_args(argv)
    if args.speaker_level < 1:
        ap.error(f"--speaker-level must be >= 1, got {args.speaker_level}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows, other = manifest_rows(args.dirs, args.out, args.speaker_level)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if not rows:
            raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) at least {args.speaker_level} "
                             f"folder(s) below {', '.join(args.dirs)}")
        write_manifest(args.out, rows)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    speakers = len({s for _, s in rows})
    print(f"{args.out}: {len(rows)} files, {speakers} speakers"
          + (f"; left out {other} files without an audio extension" if other else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
