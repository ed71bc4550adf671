"""The run log of training: `DIR/log.jsonl` (one JSON record a line) + TensorBoard scalars, with
warnings when the latent looks unused, and `DIR/loss.png` when it closes."""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

from .diagnostics import CONDITIONING_GAIN_MIN, PERPLEXITY_MIN
from .plots import plot_losses


class Logger:
    """log.jsonl + TensorBoard scalars; warnings when the latent looks unused."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.run_dir = enabled, run_dir
        self.alerts: dict[str, str] = {}
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "log.jsonl", "a")

    def _write(self, record: dict) -> None:
        # a value that could not be measured (NaN, e.g. the speaker gain of one speaker) is null: strict JSON
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def scalars(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "kind": kind, "time": time.time(), **values})
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def validation(self, step: int, values: dict, warn: bool = True) -> None:
        self.alerts.clear()
        if values["conditioning_gain"] < CONDITIONING_GAIN_MIN:
            self.alerts["latents"] = "UNUSED?"
            if warn:
                warnings.warn(f"step {step}: conditioning gain {values['conditioning_gain']:.4f} "
                              "nats/sample: the decoder barely uses the latents")
        if "perplexity" in values and values["perplexity"] < PERPLEXITY_MIN:
            self.alerts["codebook"] = "COLLAPSED"
            if warn:
                warnings.warn(f"step {step}: codebook perplexity {values['perplexity']:.2f}: collapse")
        self.scalars(step, "valid", {k: v for k, v in values.items() if not isinstance(v, list)})
        if self.enabled and "kl_per_dim" in values:
            self._write({"step": step, "kind": "valid_kl_per_dim", "kl_per_dim": values["kl_per_dim"]})

    def close_message(self, msg: str) -> None:
        if self.enabled:
            self._write({"kind": "event", "time": time.time(), "message": msg})
        print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
            plot_losses(self.run_dir)
