"""Resumable slice buffer: (B, N) batches of windows that are 100% valid, in a seeded random order.

The buffer holds whole files up to `buffer_seconds` of audio (a *chunk*), enumerates every valid
window start of the chunk (every sample t0 whose joint window, `rfield.WindowPlan`, lies inside one
file), draws a seeded permutation of them (only the first `fraction` of it, to mix more), cuts
batches of B windows, then loads the next chunk. An epoch is one pass over this rank's files.

Position = (seed, epoch, cursor: first file of the chunk in the epoch's order, drawn: windows
already taken from the chunk's permutation, next: the first file after the chunk, and the files found
bad so far and at the epoch's start: they change which files make up a chunk). Every random choice
is derived from the seed and the position, so `restore(state())` rebuilds the identical future batch
sequence by reloading one chunk: the cost is proportional to the buffer, not to the progress through
the epoch. A file found bad is skipped with one warning, given on the thread that takes the batches.
Under torch.distributed, rank r of W takes files r, r + W, ... of each epoch's permutation.

Another world size (`restore_all` with the positions of a run of W ranks, now W' ranks): the files
no old rank has begun in its current epoch (nor, for ranks behind the furthest one, in the epochs up
to it) are dealt round-robin to the new ranks as an explicit file list for that epoch; then every
rank goes on with the next epoch sharded for W'. So within each epoch no file is skipped or repeated;
what is not exact: the undrawn windows of the chunks in progress (at most one buffer per old rank)
are dropped, as are the last windows of a new rank's share when they cannot fill a batch, and the
batch sequence differs from a run that had W' ranks all along.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import multiprocessing
import pickle
import queue
import signal
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..config import ModelConfig
from ..features import mfcc_features
from ..ops import mu_law_encode
from ..rfield import WindowPlan
from .corpus import BadAudioError, Corpus, CorpusError, load_audio, load_or_skip, warn_skip
from .windows import valid_starts, window_slices

STATE_VERSION = 3          # 2: + bad files (1 is read as having none); 3: + next, explicit files


@dataclass
class Batch:
    """Raw windows: the features and mu-law classes are computed where the model runs (`to`), as
    batched tensor ops on its device, so the loader only cuts samples out of decoded files."""
    enc_wav: np.ndarray        # (B, enc_len) float32: each window's encoder samples
    dec_wav: np.ndarray        # (B, N + R) float32: its decoder samples; the targets are [:, R:]
    speaker_ids: np.ndarray    # (B,) int64
    files: list[int]           # corpus index of each window's file
    starts: list[int]          # first target sample of each window in its file
    position: dict             # the position *after* this batch (what a checkpoint stores)
    m: ModelConfig
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) found bad meanwhile

    def to(self, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B, n_in, n_frames) float32, mu-law classes (B, N + R) int64, speakers (B,) int64),
        computed on `device`."""
        enc = torch.from_numpy(self.enc_wav).to(device, non_blocking=True)
        dec = torch.from_numpy(self.dec_wav).to(device, non_blocking=True)
        return (mfcc_features(enc, self.m), mu_law_encode(dec, self.m.n_quant),
                torch.from_numpy(self.speaker_ids).to(device, non_blocking=True))

    @property
    def feats(self) -> torch.Tensor:       # on the CPU, as `to("cpu")` computes them
        return mfcc_features(torch.from_numpy(self.enc_wav), self.m)

    @property
    def dec_q(self) -> torch.Tensor:
        return mu_law_encode(torch.from_numpy(self.dec_wav), self.m.n_quant)

    @property
    def speaker(self) -> torch.Tensor:
        return torch.from_numpy(self.speaker_ids)


def make_batch(chunks: list[tuple[int, np.ndarray, int]], picks: list[tuple[int, int]],
               p: WindowPlan, m: ModelConfig, position: dict) -> Batch:
    """Cut windows (chunk index, t0) out of loaded (file index, wav, speaker id) triples."""
    cuts = [(chunks[c][1], window_slices(t0, p)) for c, t0 in picks]
    return Batch(enc_wav=np.stack([wav[e] for wav, (e, _) in cuts]),
                 dec_wav=np.stack([wav[d] for wav, (_, d) in cuts]),
                 speaker_ids=np.array([chunks[c][2] for c, _ in picks], dtype=np.int64),
                 files=[chunks[c][0] for c, _ in picks], starts=[t0 for _, t0 in picks],
                 position=position, m=m)


class SliceBuffer:
    def __init__(self, corpus: Corpus, m: ModelConfig, p: WindowPlan, n_batch: int,
                 buffer_seconds: float, fraction: float = 1.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, prefetch: int = 4, loader: str = "thread"):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must lie in (0, 1]")
        if loader not in ("thread", "process"):
            raise ValueError(f"loader={loader!r}: expected 'thread' or 'process'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.corpus, self.m, self.p, self.B = corpus, m, p, n_batch
        self.budget = int(buffer_seconds * m.sample_rate)
        self.fraction, self.seed, self.rank, self.world = fraction, seed, rank, world_size
        self.prefetch, self.loader = prefetch, loader     # prefetch 0: batches made by the caller
        self.usable = [i for i, u in enumerate(corpus.utterances) if u.n_samples >= p.total_len]
        if len(self.usable) < world_size:
            raise CorpusError(f"{len(self.usable)} files hold a full window "
                              f"({p.total_len} samples); {world_size} ranks need at least one each")
        self.digest = hashlib.sha1("\n".join(f"{u.path}\t{u.speaker}" for u in corpus.utterances)
                                   .encode()).hexdigest()[:16]
        self.bad: set[int] = set()                 # corpus indices found bad (by the generator)
        self._skipped: list[tuple[str, str]] = []  # found bad since the last batch was cut
        self._position = {"epoch": 0, "cursor": 0, "drawn": 0, "next": 0, "bad": [], "epoch_bad": []}
        self._explicit: tuple[int, list[int]] | None = None   # (epoch, this rank's files) after a re-shard
        self._thread = None        # the loader thread / process (the caller's thread with prefetch 0)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()

    # --- position ---------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able position after the last batch handed out."""
        out = {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world,
               "corpus": self.digest, **self._position}
        files = self._explicit_files(self._position["epoch"])
        if files is not None:
            out["files"] = files
        return out

    def _check(self, state: dict, keys=("seed", "corpus", "world_size", "rank")) -> None:
        if state.get("version") not in (1, 2, STATE_VERSION):
            raise ValueError(f"data position does not match this run: version is {state.get('version')!r} "
                             f"in the checkpoint, {STATE_VERSION} now")
        mine = {"seed": self.seed, "corpus": self.digest, "world_size": self.world, "rank": self.rank}
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(f"data position does not match this run: {key} is {state.get(key)!r} "
                                 f"in the checkpoint, {mine[key]!r} now")

    def restore(self, state: dict) -> None:
        """Continue exactly from `state` (this rank's position, same world size)."""
        self._check(state)
        self.close()
        self._position = {k: int(state[k]) for k in ("epoch", "cursor", "drawn")}
        self._position["next"] = int(state.get("next", -1))      # -1: not recorded (versions 1, 2)
        self._position.update({k: sorted(int(i) for i in state.get(k, [])) for k in ("bad", "epoch_bad")})
        self.bad, self._skipped = set(self._position["bad"]), []
        files = state.get("files")
        self._explicit = None if files is None else (self._position["epoch"], [int(f) for f in files])

    def restore_all(self, states: list[dict]) -> str | None:
        """Continue from the positions of every rank of the run that saved them: exactly (`restore`) if
        it had this world size, else re-sharded (module docstring). Returns what a re-shard did, for
        the log (None when exact)."""
        if len(states) == self.world:
            self.restore(states[self.rank])
            return None
        for s in states:
            self._check(s, keys=("seed", "corpus"))
        last = max(int(s["epoch"]) for s in states)
        rests = []
        for r, s in enumerate(states):
            epoch, cursor = int(s["epoch"]), int(s["cursor"])
            files = [int(f) for f in s["files"]] if "files" in s else self._shard(epoch, r, len(states))
            # a chunk that windows were drawn from counts as done; its end is `next` (if recorded)
            begun = max(cursor, int(s.get("next", -1))) if int(s["drawn"]) > 0 else cursor
            rest = files[begun:]
            for e in range(epoch + 1, last + 1):      # a rank behind the furthest one: its later epochs
                rest += self._shard(e, r, len(states))
            rests.append(rest)
        dealt = [f for group in itertools.zip_longest(*rests) for f in group if f is not None]
        bad = sorted({int(i) for s in states for i in s.get("bad", [])})
        self.close()
        self._explicit = (last, dealt[self.rank:: self.world])
        self._position = {"epoch": last, "cursor": 0, "drawn": 0, "next": 0, "bad": bad, "epoch_bad": bad}
        self.bad, self._skipped = set(bad), []
        return (f"re-sharded the data position of {len(states)} ranks onto {self.world}: {len(dealt)} files "
                f"left in epoch {last}, {len(self._explicit[1])} for rank {self.rank}; from epoch {last + 1} "
                f"on, files are sharded for {self.world} ranks")

    # --- the deterministic stream -------------------------------------------------------------
    def _shard(self, epoch: int, rank: int, world: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))
        return [self.usable[i] for i in order[rank:: world]]

    def _explicit_files(self, epoch: int) -> list[int] | None:
        """This rank's files of `epoch` when a re-shard dealt them, else None (the epoch is sharded)."""
        return self._explicit[1] if self._explicit is not None and self._explicit[0] == epoch else None

    def _epoch_files(self, epoch: int) -> list[int]:
        files = self._explicit_files(epoch)
        return self._shard(epoch, self.rank, self.world) if files is None else files

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
            except BadAudioError as e:
                self._skip(idx, e.reason)
                continue
            n_starts = len(valid_starts(len(wav), self.p))
            if n_starts <= 0:
                self._skip(idx, f"{len(wav)} samples once decoded, shorter than one window "
                                f"({self.p.total_len})")
                continue
            chunks.append((idx, wav, self.corpus.speaker_id(utt.speaker)))
            counts.append(n_starts)
            total += n_starts
            n_samples += len(wav)
        return chunks, i, np.asarray(counts, dtype=np.int64)

    def _skip(self, idx: int, reason: str) -> None:
        self.bad.add(idx)
        self._skipped.append((self.corpus.utterances[idx].path, reason))

    def _tail_starts(self, files: list[int], bad: set[int]) -> np.ndarray:
        """tail[i] = window starts (by header lengths) in files[i:], for keeping tails whole."""
        n = [0 if f in bad else self.corpus.utterances[f].n_samples - self.p.total_len + 1
             for f in files]
        return np.concatenate([np.cumsum(n[::-1])[::-1], [0]])

    def _generate(self, position: dict) -> Iterator[Batch]:
        epoch, cursor, drawn = position["epoch"], position["cursor"], position["drawn"]
        # the tail rule of an epoch sees the files known bad when the epoch began: carried by positions
        epoch_bad, files_epoch = set(position["epoch_bad"]), None
        while True:
            if files_epoch != epoch:
                files, files_epoch = self._epoch_files(epoch), epoch
                explicit = self._explicit_files(epoch) is not None
                tail = self._tail_starts(files, epoch_bad)
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
                    after = {"epoch": epoch, "cursor": cursor, "drawn": drawn, "next": next_cursor}
                    if drawn + self.B > n_take:       # chunk exhausted: next batch starts a new one
                        after = self._advance(epoch, next_cursor, len(files))
                    after["bad"] = sorted(self.bad)
                    after["epoch_bad"] = sorted(epoch_bad if after["epoch"] == epoch else self.bad)
                    batch = make_batch(chunks, picks, self.p, self.m, after)
                    batch.skipped, self._skipped = self._skipped, []
                    yield batch
            elif not explicit and (next_cursor == cursor or (cursor == 0 and next_cursor >= len(files))):
                # (a re-shard's share that cannot fill a batch just ends its epoch)
                for path, reason in self._skipped:
                    warn_skip(path, reason)
                self._skipped = []
                raise CorpusError(f"rank {self.rank}: its files hold fewer than {self.B} valid windows"
                                  + (f" ({len(self.bad)} skipped as bad)" if self.bad else ""))
            pos = self._advance(epoch, next_cursor, len(files))
            if pos["epoch"] != epoch:
                epoch_bad = set(self.bad)
            epoch, cursor, drawn = pos["epoch"], pos["cursor"], pos["drawn"]

    @staticmethod
    def _advance(epoch: int, next_cursor: int, n_files: int) -> dict:
        if next_cursor >= n_files:
            return {"epoch": epoch + 1, "cursor": 0, "drawn": 0, "next": 0}
        return {"epoch": epoch, "cursor": next_cursor, "drawn": 0, "next": next_cursor}

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
            item = self._get()
            if isinstance(item, BaseException):
                raise item
            batch = item
        for path, reason in batch.skipped:     # warned here: warning filters belong to this thread
            warn_skip(path, reason)
        self._position = dict(batch.position)
        return batch

    def _start(self) -> None:
        start = dict(self._position)
        if self.loader == "process":
            # a pipe of our own, not a multiprocessing.Queue: once the parent has closed its write end, a
            # loader that dies (even mid-message) reads as end-of-file instead of a reader waiting forever
            ctx = multiprocessing.get_context("spawn")     # fork is unsafe once CUDA or threads started
            self._queue, writer = ctx.Pipe(duplex=False)
            self._thread = ctx.Process(target=_loader_process, name="wavenet_ae-loader", daemon=True,
                                       args=(self, start, writer))
            self._thread.start()
            writer.close()
            return
        self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=_produce, args=(self, start, self._queue, self._stop), daemon=True)
        self._thread.start()

    def _get(self):
        if self.loader != "process":
            return self._queue.get()
        try:
            return self._queue.recv()
        except (EOFError, OSError):      # OSError: "got end of file during message"
            self._thread.join(timeout=5)
            raise RuntimeError(f"the data loader process died (exit code {self._thread.exitcode})") from None

    def close(self) -> None:
        if isinstance(self._thread, threading.Thread):
            if self._thread is not threading.current_thread():     # (prefetch 0: the caller's own)
                self._stop.set()
                self._thread.join()
        elif self._thread is not None:            # the loader process
            self._queue.close()                   # its next send fails: it ends
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self._thread.kill()
                self._thread.join()
        self._thread = None

    def __getstate__(self) -> dict:
        """What a loader process needs: the stream's definition and position, not its machinery."""
        state = dict(self.__dict__)
        for key in ("_thread", "_stop", "_queue", "_gen"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread, self._stop, self._queue = None, threading.Event(), queue.Queue()


def _produce(buf: SliceBuffer, start: dict, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: put `buf`'s batches from `start` on `q` until `stop` is set; an error is put
    on `q` for the consumer, unless it has gone."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in buf._generate(start):
            if not put(batch):
                return
    except BaseException as e:  # handed to the consumer, unless it has gone (close())
        put(e)


def _loader_process(buf: SliceBuffer, start: dict, pipe) -> None:
    """Body of the loader process: one thread, batches sent one at a time (the pipe's send blocks until
    the training process takes the batch: one batch is ready ahead). Signals are the training
    process's to handle; a closed or broken pipe (the parent closed it, or died) ends the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        for batch in buf._generate(start):
            pipe.send(batch)
    except (BrokenPipeError, ConnectionResetError):     # the parent closed the pipe, or died
        return
    except BaseException as e:      # handed to the consumer
        try:
            pickle.dumps(e)
        except Exception:           # not every exception survives the trip to another process
            e = RuntimeError(f"data loader: {type(e).__name__}: {e}")
        try:
            pipe.send(e)
        except OSError:
            return


def speakers_in_turn(corpus: Corpus) -> list[int]:
    """Corpus indices with the speakers taking turns (each speaker's files in corpus order): any first k
    of them span min(k, number of speakers) speakers."""
    by_speaker: dict[str, list[int]] = {}
    for i, u in enumerate(corpus.utterances):
        by_speaker.setdefault(u.speaker, []).append(i)
    queues = [by_speaker[s] for s in sorted(by_speaker)]
    return [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]


def fixed_batches(corpus: Corpus, m: ModelConfig, p: WindowPlan, n_batch: int,
                  max_batches: int) -> list[Batch]:
    """Deterministic held-out batches: evenly spaced windows of each file, files interleaved so
    that neighbours in a batch come from different utterances (for shuffled-latent diagnostics).

    Only the files the batches can use are loaded: at most n_batch * max_batches, chosen with the
    speakers taking turns (`speakers_in_turn`), so memory and start-up time are bounded whatever the
    corpus size and the batches span as many speakers as they can; the chosen files are then used in
    corpus order."""
    per_file = []
    for idx in speakers_in_turn(corpus):
        if len(per_file) >= n_batch * max_batches:
            break
        utt = corpus.utterances[idx]
        wav = load_or_skip(utt.path, m.sample_rate)
        if wav is None:
            continue
        starts = valid_starts(len(wav), p)
        if not starts:
            continue
        k = max(1, min(len(starts) // p.n_win, n_batch * max_batches))
        picks = [starts[i * (len(starts) - 1) // max(1, k - 1)] for i in range(k)]
        per_file.append(((idx, wav, corpus.speaker_id(utt.speaker)), picks))
    per_file.sort(key=lambda f: f[0][0])
    chunks = [c for c, _ in per_file]
    order = []                                     # round-robin over files
    for j in range(max((len(ps) for _, ps in per_file), default=0)):
        order += [(c, ps[j]) for c, (_, ps) in enumerate(per_file) if j < len(ps)]
    n = min(max_batches, len(order) // n_batch)
    return [make_batch(chunks, order[i * n_batch:(i + 1) * n_batch], p, m, {}) for i in range(n)]
