"""Train a WaveNet autoencoder: `python -m wavenet_ae.train --run-dir DIR [...]`.

A new DIR starts a run (config.json, speakers.json); a DIR with a checkpoint resumes it exactly.
One step = fetch batch t -> forward/backward -> update -> data position t + 1. SIGINT/SIGTERM only
set a flag, so a step is never cut in half: the loop notices the flag between steps, writes a
checkpoint and exits 0. Multi-GPU / multi-process: the same command under `torchrun`.

A step makes one host sync (the non-finite guard, which every rank votes on together with the stop
flag, so all ranks stop at the same step and before a bad update); logging intervals add the
scalars. Checkpoints are written by a background thread from a CPU copy of the state.

World size: each rank draws `data.n_batch` windows a step, so the global batch is n_batch x world.
The learning-rate schedule (warm-up, cosine decay) is defined in optimizer steps and does not follow
the world size: a run resumed on another number of ranks keeps its step count and schedule and its
steps then average over the new global batch (the data position is re-sharded, see slice_buffer).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, cli, malloc
from .checkpoint import rng_state, set_rng_state
from .config import PRESETS, Config, preset
from .data.corpus import INDEX_CACHE_NAME, Corpus, CorpusError, load_or_skip
from .data.slice_buffer import SliceBuffer, fixed_batches
from .data.splits import load_corpora
from .diagnostics import ProbeTracker, held_out_diagnostics
from .features import mfcc_features
from .model import WaveNetAE
from .runlog import Logger

# keys that may differ between a run's config.json and a resume command
# (not data.buffer_seconds: the buffer's size decides which files make up a chunk, i.e. the batch stream)
SAFE_TO_CHANGE = {"train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.validate_every", "train.log_every", "train.probe_files", "data.loader"}


class StopFlag:
    """SIGINT/SIGTERM set a flag; the training loop acts on it between steps."""

    def __init__(self):
        self.signum: int | None = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then checkpointing",
                  file=sys.stderr, flush=True)
        self.signum = signum


# --- run directory ---------------------------------------------------------------------------------

def feature_stats(corpus: Corpus, cfg: Config, max_files: int = 64):
    """Per-coefficient mean/std of the features over (a deterministic sample of) training files;
    files with bad content are skipped with the corpus warning."""
    step = max(1, len(corpus.utterances) // max_files)
    wavs = [load_or_skip(u.path, cfg.model.sample_rate) for u in corpus.utterances[::step]]
    feats = [mfcc_features(w, cfg.model) for w in wavs if w is not None]
    if not feats:
        raise CorpusError(f"none of the {len(wavs)} training files sampled for feature statistics "
                          f"could be loaded (see the warnings above)")
    cat = np.concatenate(feats, axis=1)
    return torch.from_numpy(cat.mean(1)), torch.from_numpy(cat.std(1))


def write_text_once(path: Path, text: str) -> None:
    """Write `path` atomically (temp file, fsync, rename), and only when its content changes."""
    if path.is_file() and path.read_text() == text:
        return
    checkpoint.atomic_write(path, text.encode())


def config_for_run(run_dir: Path, args) -> tuple[Config, bool]:
    """(config, is_new). Resume: the stored config, with only safe keys changeable."""
    path = run_dir / "config.json"
    overrides = list(args.set or [])
    for flag, key in ((args.max_steps, "train.max_steps"), (args.checkpoint_every, "train.checkpoint_every"),
                      (args.seed, "train.seed")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if not path.exists():
        cfg = preset(args.preset).with_overrides(overrides)
        return cfg, True
    stored = Config.from_json(path.read_text())
    wanted = stored.with_overrides(overrides)
    a, b = stored.to_dict(), wanted.to_dict()
    changed = [f"{s}.{k}" for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]]
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe:
        raise SystemExit(f"error: {path} exists and these settings differ from it: {', '.join(unsafe)}. "
                         f"Resume with the original settings or use a new --run-dir.")
    if args.preset and args.preset != stored.preset and args.preset_given:
        raise SystemExit(f"error: {path} was made with --preset {stored.preset}, not {args.preset}")
    return wanted, False


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.lr_warmup_steps:
            return (step + 1) / t.lr_warmup_steps
        frac = min(1.0, (step - t.lr_warmup_steps) / max(1, t.lr_decay_steps - t.lr_warmup_steps))
        return t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Adam:
    """Adam with torch's fused kernel (CPU and CUDA): one pass over all parameters instead of a loop
    of small ops per parameter (tiny preset on 2 CPU cores: 1.3 ms a step instead of 4-9 ms)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            fused=True)


# --- distributed -----------------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --- the loop --------------------------------------------------------------------------------------

def train(args) -> int:
    run_dir = Path(args.run_dir)
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    malloc.retain_freed_memory()  # no page faults in steady-state steps (see malloc.py)
    cfg, is_new = config_for_run(run_dir, args)
    barrier(world)                     # every rank has read the run directory before rank 0 writes to it
    try:
        ckpt = None if is_new else checkpoint.load_latest(run_dir)
    except checkpoint.CheckpointError as e:       # checkpoints exist but none verifies: never restart
        raise SystemExit(f"error: {e}") from None
    if ckpt is not None and len(ckpt["data_position"]) != world and is_main:
        print(f"the checkpoint was written by {len(ckpt['data_position'])} processes, now {world}: the data "
              f"position is re-sharded: no file of the current epoch is skipped or repeated, but the batch "
              f"sequence is not the one an uninterrupted run would have drawn", flush=True)
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    # rank 0 indexes the corpus (reading only the headers of files new or changed since the cached index),
    # the others take its index: every rank gets the same one
    cache = run_dir / INDEX_CACHE_NAME
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        splits = load_corpora(args.data, cfg, cache=cache, speaker_level=args.speaker_level)
    barrier(world)
    if not is_main:
        splits = load_corpora(args.data, cfg, cache=cache, trust_cache=True, speaker_level=args.speaker_level)
    train_set, valid_set = splits["train"], splits["valid"]
    speakers_path = run_dir / "speakers.json"
    if speakers_path.exists():
        speakers = json.loads(speakers_path.read_text())
        if speakers != train_set.speakers:
            raise SystemExit(f"error: the corpus speakers {train_set.speakers} differ from "
                             f"{speakers_path} {speakers}")
    speakers = train_set.speakers
    if len(speakers) > cfg.model.n_speakers:
        if not is_new:
            raise SystemExit(f"error: {len(speakers)} speakers but the run has n_speakers="
                             f"{cfg.model.n_speakers}")
        cfg.model.n_speakers = len(speakers)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_once(run_dir / "config.json", cfg.to_json())
        write_text_once(speakers_path, json.dumps(speakers, indent=1))
        print(f"data: train {train_set.summary()}; valid {len(valid_set.utterances)} files", flush=True)
    barrier(world)

    model = WaveNetAE(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    p = model.plan(cfg.data.n_win)
    buf = SliceBuffer(train_set, cfg.model, p, cfg.data.n_batch, cfg.data.buffer_seconds,
                      cfg.data.fraction, seed=cfg.train.seed, rank=rank, world_size=world,
                      loader=cfg.data.loader)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])      # older formats were upgraded by load_latest
        sched.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        resharded = buf.restore_all([json.loads(p) for p in ckpt["data_position"]])
        if rank < len(ckpt["rng"]):        # a rank the old run did not have keeps its seed (seed + rank)
            set_rng_state(ckpt["rng"][rank], device)
        if is_main:
            print(f"resumed {run_dir} at step {step}" + (f"; {resharded}" if resharded else ""), flush=True)
    else:
        mean, std = feature_stats(train_set, cfg)
        model.encoder.set_feature_stats(mean, std)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    valid_batches = fixed_batches(valid_set, cfg.model, p, cfg.data.n_batch, 8) if is_main else []
    probes = None
    if is_main and valid_batches and cfg.train.probe_files > 0:
        every = max(1, len(train_set.utterances) // cfg.train.probe_files)
        probes = ProbeTracker(train_set.utterances[::every][: cfg.train.probe_files], valid_set.utterances,
                              cfg.model)

    stop = StopFlag()
    log = Logger(run_dir, enabled=is_main)
    use_bf16 = device.startswith("cuda")
    t_last, n_last = time.time(), 0
    max_steps = cfg.train.max_steps
    from tqdm import tqdm
    bar = tqdm(total=max_steps, initial=step, disable=None if is_main else True, dynamic_ncols=True)
    exit_code = 0

    saver = checkpoint.BackgroundSaver()

    def save() -> None:
        positions = gather(json.dumps(buf.state()), world)
        rngs = gather(rng_state(device), world)
        if is_main:
            saver.submit(run_dir, step, {
                "format": checkpoint.FORMAT, "step": step, "config": cfg.to_dict(), "speakers": speakers,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "data_position": positions, "rng": rngs,
            }, keep=cfg.train.keep_checkpoints)

    stopping = False
    try:
        while step < max_steps:
            if stopping or (world == 1 and stop.signum is not None):
                save()
                log.close_message(f"stopped by signal at step {step}; checkpoint written")
                break
            batch = next(buf)                                         # fetch t
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss, terms = _loss(ddp, model, batch, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            # the step's one host sync: a finite loss can still overflow a gradient
            bad_loss, bad_grad, stopping = _vote(loss, grad_norm, stop.signum is not None, world, device)
            if bad_loss or bad_grad:
                bad = (f"non-finite loss {loss.item()}" if not torch.isfinite(loss) else
                       f"non-finite gradient norm {grad_norm.item()}" if not torch.isfinite(grad_norm) else
                       "a non-finite loss or gradient on another rank")
                msg = (f"{bad} at step {step + 1}; stopping before the update. The last good "
                       f"checkpoint is intact: lower train.lr or check the data of this batch: "
                       f"{sorted({train_set.utterances[i].path for i in batch.files})}")
                log.close_message(msg)
                print(f"error: {msg}", file=sys.stderr)
                exit_code = 3
                break
            opt.step()
            sched.step()
            step += 1                                                  # data position is t + 1 now
            n_last += len(batch.files) * p.n_win
            if step % cfg.train.log_every == 0 or step == max_steps:
                now = time.time()
                scalars = {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                           "samples_per_s": n_last * world / (now - t_last)}
                scalars.update({k: float(v.detach()) for k, v in terms.items() if v.dim() == 0})
                t_last, n_last = now, 0
                log.scalars(step, "train", scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.3f}", **log.alerts)
            bar.update(1)
            if is_main and valid_batches and (step % cfg.train.validate_every == 0 or step == max_steps):
                t_valid = time.time()
                record = held_out_diagnostics(model, valid_batches, device)
                if probes is not None:
                    record.update(probes(model))
                record["valid_seconds"] = time.time() - t_valid      # what validation costs the run
                log.validation(step, record, warn=step > cfg.train.lr_warmup_steps)
            if step % cfg.train.checkpoint_every == 0 or step == max_steps:
                save()
    finally:
        bar.close()
        buf.close()
        saver.wait()              # the last checkpoint is on disk before the process ends
        log.close()
        if world > 1:
            dist.destroy_process_group()
    return exit_code


def _loss(ddp, model, batch, device):
    feats, dec_q, spk = batch.to(device)
    h, terms = ddp(feats, dec_q, spk, head=False)  # through the DDP wrapper, if any: it syncs gradients
    return model.loss_from(h, terms, dec_q)


def _vote(loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool, world: int, device: str):
    """(non-finite loss, non-finite gradient norm, stop) agreed by all ranks (any rank's flag counts),
    with one host sync. The tensors live on the training device: NCCL serves CUDA tensors only."""
    flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm.detach()),
                         torch.tensor(stop, device=loss.device)]).to(torch.int32)
    if world > 1:
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return tuple(bool(f) for f in flags.tolist())


def parse_args(argv=None):
    ap = cli.parser("train", __doc__.split("\n")[0])
    cli.add_run_dir(ap, help="run directory: a new one starts a run, one with a checkpoint resumes it")
    ap.add_argument("--data", help="corpus directory (speaker = first-level folder) or path<TAB>speaker "
                                   "manifest; default: the bundled demo corpus")
    ap.add_argument("--speaker-level", type=int, default=1, metavar="N",
                    help="with a corpus directory: the speaker is the folder N levels below it (1: the "
                         "first-level folder; 2 for the LibriSpeech root, subset/speaker/chapter)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="hyper-parameters of a new run (default: paper, the paper's model: hours per "
                         "thousand steps on a CPU; small: its structure, ~30 minutes on one CPU core; "
                         "tiny trains visibly in minutes there)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--seed", type=int)
    cli.add_device(ap)
    args = ap.parse_args(argv)
    args.device = args.device or cli.default_device()      # checked in main: parsing stays GPU-free
    args.preset_given = args.preset is not None
    args.preset = args.preset or "paper"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    try:
        code = train(args)
    except CorpusError as e:      # nothing to train on: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    sys.exit(code)


if __name__ == "__main__":
    main()
