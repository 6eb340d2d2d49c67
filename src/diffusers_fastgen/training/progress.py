"""A run's progress bar and its one end-of-run summary (logged, and written as `run_summary.json`)."""

from __future__ import annotations

import json
import logging
import os
import time

from tqdm.auto import tqdm

from .accelerate_setup import peak_rss_mb

logger = logging.getLogger("diffusers_fastgen")


class TrainingProgress:
    """Counts optimizer steps for the bar (main process) and remembers what the summary reports: the
    step the run started at (after a resume), training wall time, the last step's scalars and the
    non-finite updates the `guard` skipped. `log_and_checkpoint` drives it like a tqdm bar."""

    def __init__(self, accelerator, run, step: int, guard=None):
        self.accelerator, self.run, self.guard = accelerator, run, guard
        self.bar = tqdm(range(run.max_train_steps), initial=step, disable=not accelerator.is_local_main_process)
        self.start_step = self.step = step
        self.start = self.last_step_time = time.perf_counter()
        self.latest: dict = {}

    def update(self, n: int = 1, scalars: dict | None = None) -> None:
        """Count `n` optimizer steps; `scalars` (tensors or floats) are kept unread until the summary."""
        self.bar.update(n)
        self.step += n
        self.last_step_time = time.perf_counter()
        if scalars is not None:
            self.latest = scalars

    def set_postfix(self, **values: float) -> None:
        self.bar.set_postfix(**values)

    def summary(self, name: str, log=None) -> dict:
        """Close the bar; on the main process log one summary line and write `<output_dir>/run_summary.json`
        (replaced atomically). Returns the summary."""
        self.bar.close()
        steps = self.step - self.start_step
        last = {k: round(float(v), 6) for k, v in self.latest.items()}
        train_seconds = self.last_step_time - self.start
        summary = {
            "script": name,
            "steps": self.step,
            "started_at_step": self.start_step,
            "steps_this_run": steps,
            "training_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / steps, 4) if steps else None,
            "wall_seconds": round(time.perf_counter() - self.start, 2),  # + saving and the benchmark
            "skipped_nonfinite_updates": self.guard.skipped if self.guard is not None else 0,
            "last_scalars": last,
            "num_processes": self.accelerator.num_processes,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "output_dir": self.run.output_dir,
        }
        if self.accelerator.is_main_process:
            os.makedirs(self.run.output_dir, exist_ok=True)
            path = os.path.join(self.run.output_dir, "run_summary.json")
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(path + ".tmp", path)
            logged = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
            (log or logger).info(
                "%s finished: step %d (%d this run, from %d) in %.0f s of training (%s s/step), %.0f s in all; "
                "%d non-finite updates skipped; last step: %s; peak RSS %.0f MB; output in %s (run_summary.json)",
                name, self.step, steps, self.start_step, train_seconds, summary["seconds_per_step"],
                summary["wall_seconds"], summary["skipped_nonfinite_updates"], logged or "-", summary["peak_rss_mb"],
                self.run.output_dir)
        return summary
