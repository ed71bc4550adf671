"""Resumable slice buffer: (B, N) batches of windows that are 100% valid, in a seeded random order.

The buffer holds whole files up to `buffer_seconds` of audio (a *chunk*), enumerates every valid
window start of the chunk (every sample t0 whose joint window, `rfield.WindowPlan`, lies inside one
file), draws a seeded permutation of them (only the first `fraction` of it, to mix more), cuts
batches of B windows, then loads the next chunk. An epoch is one pass over this rank's files.

Position = (seed, epoch, cursor: first file of the chunk in the epoch's order, drawn: windows
already taken from the chunk's permutation). Every random choice is derived from the seed and the
position, so `restore(state())` rebuilds the identical future batch sequence by reloading one
chunk: the cost is proportional to the buffer, not to the progress through the epoch.
Under torch.distributed, rank r of W takes files r, r + W, ... of each epoch's permutation.
"""
from __future__ import annotations

import hashlib
import math
import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..config import ModelConfig
from ..features import mfcc_features
from ..ops import mu_law_encode
from ..rfield import WindowPlan
from .corpus import BadAudioWarning, Corpus, CorpusError, load_audio

STATE_VERSION = 1


@dataclass
class Batch:
    feats: torch.Tensor        # (B, n_in, n_frames) float32
    dec_q: torch.Tensor        # (B, N + R) int64 mu-law classes; targets are [:, R:]
    speaker: torch.Tensor      # (B,) int64
    files: list[int]           # corpus index of each window's file
    starts: list[int]          # first target sample of each window in its file
    position: dict             # the position *after* this batch (what a checkpoint stores)


def make_batch(chunks: list[tuple[int, np.ndarray, int]], picks: list[tuple[int, int]],
               p: WindowPlan, m: ModelConfig, position: dict) -> Batch:
    """Cut windows (chunk index, t0) out of loaded (file index, wav, speaker id) triples."""
    enc = np.stack([chunks[c][1][t0 - p.enc_offset: t0 - p.enc_offset + p.enc_len] for c, t0 in picks])
    dec = np.stack([chunks[c][1][t0 - p.dec_context: t0 + p.n_win] for c, t0 in picks])
    return Batch(feats=torch.from_numpy(mfcc_features(enc, m)),
                 dec_q=mu_law_encode(torch.from_numpy(dec), m.n_quant),
                 speaker=torch.tensor([chunks[c][2] for c, _ in picks], dtype=torch.int64),
                 files=[chunks[c][0] for c, _ in picks], starts=[t0 for _, t0 in picks],
                 position=position)


class SliceBuffer:
    def __init__(self, corpus: Corpus, m: ModelConfig, p: WindowPlan, n_batch: int,
                 buffer_seconds: float, fraction: float = 1.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, prefetch: int = 4):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must lie in (0, 1]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.corpus, self.m, self.p, self.B = corpus, m, p, n_batch
        self.budget = int(buffer_seconds * m.sample_rate)
        self.fraction, self.seed, self.rank, self.world = fraction, seed, rank, world_size
        self.prefetch = prefetch
        self.usable = [i for i, u in enumerate(corpus.utterances) if u.n_samples >= p.total_len]
        if len(self.usable) < world_size:
            raise CorpusError(f"{len(self.usable)} files hold a full window "
                              f"({p.total_len} samples); {world_size} ranks need at least one each")
        self.digest = hashlib.sha1("\n".join(f"{u.path}\t{u.speaker}" for u in corpus.utterances)
                                   .encode()).hexdigest()[:16]
        self.bad: set[int] = set()
        self._position = {"epoch": 0, "cursor": 0, "drawn": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()

    # --- position ---------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able position after the last batch handed out."""
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world,
                "corpus": self.digest, **self._position}

    def restore(self, state: dict) -> None:
        for key, mine in (("version", STATE_VERSION), ("seed", self.seed), ("corpus", self.digest),
                          ("world_size", self.world), ("rank", self.rank)):
            if state.get(key) != mine:
                raise ValueError(f"data position does not match this run: {key} is {state.get(key)!r} "
                                 f"in the checkpoint, {mine!r} now")
        self.close()
        self._position = {k: int(state[k]) for k in ("epoch", "cursor", "drawn")}

    # --- the deterministic stream -------------------------------------------------------------
    def _epoch_files(self, epoch: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))
        return [self.usable[i] for i in order[self.rank:: self.world]]

    def _load_chunk(self, files: list[int], cursor: int, tail: np.ndarray):
        """Load files from `cursor` until the budget is met; the epoch's tail joins the last chunk
        when it could not fill a batch on its own. -> (chunks, next cursor, counts of starts)."""
        chunks, counts, total, n_samples = [], [], 0, 0
        i = cursor
        while i < len(files) and (n_samples < self.budget or total < self.B or 0 < tail[i] < self.B):
            idx = files[i]
            i += 1
            if idx in self.bad:
                continue
            utt = self.corpus.utterances[idx]
            try:
                wav = load_audio(utt.path, self.m.sample_rate)
            except CorpusError as e:
                warnings.warn(f"skipping {e}", BadAudioWarning)
                self.bad.add(idx)
                continue
            n_starts = len(wav) - self.p.total_len + 1
            if n_starts <= 0:
                self.bad.add(idx)
                continue
            chunks.append((idx, wav, self.corpus.speaker_id(utt.speaker)))
            counts.append(n_starts)
            total += n_starts
            n_samples += len(wav)
        return chunks, i, np.asarray(counts, dtype=np.int64)

    def _tail_starts(self, files: list[int]) -> np.ndarray:
        """tail[i] = window starts (by header lengths) in files[i:], for keeping tails whole."""
        n = [0 if f in self.bad else self.corpus.utterances[f].n_samples - self.p.total_len + 1
             for f in files]
        return np.concatenate([np.cumsum(n[::-1])[::-1], [0]])

    def _generate(self, position: dict) -> Iterator[Batch]:
        epoch, cursor, drawn = position["epoch"], position["cursor"], position["drawn"]
        files_epoch = None
        while True:
            if files_epoch != epoch:
                files, files_epoch = self._epoch_files(epoch), epoch
                tail = self._tail_starts(files)
            chunks, next_cursor, counts = self._load_chunk(files, cursor, tail)
            total = int(counts.sum()) if len(counts) else 0
            n_take = (max(self.B, math.floor(self.fraction * total)) // self.B) * self.B
            if total >= self.B:
                rng = np.random.default_rng([self.seed, epoch, cursor, self.rank, 1])
                order = rng.permutation(total)[:n_take]
                offsets = np.concatenate([[0], np.cumsum(counts)])
                while drawn + self.B <= n_take:
                    flat = order[drawn: drawn + self.B]
                    c = np.searchsorted(offsets, flat, side="right") - 1
                    picks = [(int(ci), int(fi - offsets[ci]) + self.p.before) for ci, fi in zip(c, flat)]
                    drawn += self.B
                    after = {"epoch": epoch, "cursor": cursor, "drawn": drawn}
                    if drawn + self.B > n_take:       # chunk exhausted: next batch starts a new one
                        after = self._advance(epoch, next_cursor, len(files))
                    yield make_batch(chunks, picks, self.p, self.m, after)
            elif next_cursor == cursor or (cursor == 0 and next_cursor >= len(files)):
                raise CorpusError(f"rank {self.rank}: its files hold fewer than {self.B} valid windows")
            pos = self._advance(epoch, next_cursor, len(files))
            epoch, cursor, drawn = pos["epoch"], pos["cursor"], pos["drawn"]

    @staticmethod
    def _advance(epoch: int, next_cursor: int, n_files: int) -> dict:
        if next_cursor >= n_files:
            return {"epoch": epoch + 1, "cursor": 0, "drawn": 0}
        return {"epoch": epoch, "cursor": next_cursor, "drawn": 0}

    # --- iteration (with a prefetch thread) ---------------------------------------------------
    def __iter__(self) -> "SliceBuffer":
        return self

    def __next__(self) -> Batch:
        if self.prefetch <= 0:
            if self._thread is None:
                self._gen = self._generate(dict(self._position))
                self._thread = threading.current_thread()   # marks the stream as started
            batch = next(self._gen)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batch = item
        self._position = dict(batch.position)
        return batch

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        start = dict(self._position)

        def work(q: queue.Queue, stop: threading.Event) -> None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("default")
                    for batch in self._generate(start):
                        while not stop.is_set():
                            try:
                                q.put(batch, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
            except BaseException as e:  # handed to the consumer
                q.put(e)

        self._thread = threading.Thread(target=work, args=(self._queue, self._stop), daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._stop.set()
            self._thread.join()
        self._thread = None


def fixed_batches(corpus: Corpus, m: ModelConfig, p: WindowPlan, n_batch: int,
                  max_batches: int) -> list[Batch]:
    """Deterministic held-out batches: evenly spaced windows of every file, files interleaved so
    that neighbours in a batch come from different utterances (for shuffled-latent diagnostics)."""
    per_file = []
    for idx, utt in enumerate(corpus.utterances):
        try:
            wav = load_audio(utt.path, m.sample_rate)
        except CorpusError as e:
            warnings.warn(f"skipping {e}", BadAudioWarning)
            continue
        starts = range(p.before, len(wav) - p.after + 1)
        if not starts:
            continue
        k = max(1, min(len(starts) // p.n_win, n_batch * max_batches))
        picks = [starts[i * (len(starts) - 1) // max(1, k - 1)] for i in range(k)]
        per_file.append(((idx, wav, corpus.speaker_id(utt.speaker)), picks))
    chunks = [c for c, _ in per_file]
    order = []                                     # round-robin over files
    for j in range(max((len(ps) for _, ps in per_file), default=0)):
        order += [(c, ps[j]) for c, (_, ps) in enumerate(per_file) if j < len(ps)]
    n = min(max_batches, len(order) // n_batch)
    return [make_batch(chunks, order[i * n_batch:(i + 1) * n_batch], p, m, {}) for i in range(n)]
