"""The embedded digits benchmark: sample a class-conditional pipeline, score it against held-out digits.

FD: Fréchet distance in the shipped classifier's 128-d penultimate features between generated
samples and the 360 held-out real digits; KID: the unbiased kernel distance in the same features (no small-sample
bias); precision / recall: fidelity and coverage of the held-out digits' feature manifold (k = 3).
Accuracy: classifier agreement with the requested class.
Diversity: within-class mean pairwise feature distance, divided by that of real digits (1.0 = as
varied as real data). Wall time: seconds per 1,000 samples (median over `repeats` timed passes).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from .classifier import load_digits_classifier
from .digits_data import load_digits_arrays
from .metrics import classify, evaluate_images, within_class_diversity


class DigitsReference:
    """Held-out features and diversity, computed once."""

    def __init__(self):
        self.classifier = load_digits_classifier()
        held_x, held_y = load_digits_arrays("held_out")
        self.features, _ = classify(self.classifier, torch.from_numpy(held_x))
        self.diversity = within_class_diversity(self.features, held_y)

    def score(self, images: torch.Tensor, labels) -> dict:
        return evaluate_images(self.classifier, images, labels, self.features, self.diversity)

    def reference_rows(self, seed: int = 0) -> list[dict]:
        """FD of real train digits and of pure noise against held-out: the scale of the metric."""
        train_x, train_y = load_digits_arrays("train")
        rows = [{"model": "real train digits", **self.score(torch.from_numpy(train_x), train_y)}]
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(1000, 1, 8, 8, generator=g).clamp(-1, 1)
        rows.append({"model": "Gaussian noise", **self.score(noise, np.arange(1000) % 10)})
        return rows


METRICS = ("fd", "kid", "precision", "recall", "accuracy", "diversity")


def real_floor(reference: DigitsReference, num_samples: int, seed: int) -> dict:
    """The scores of `num_samples` real training digits against the held-out digits, class-balanced like the
    generated sets (sample i has class i % 10, a seeded random choice within the class): the floor every
    generated set of that size is measured against."""
    train_x, train_y = load_digits_arrays("train")
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(num_samples) % 10
    pools = {c: np.flatnonzero(train_y == c) for c in range(10)}
    picks = {c: pools[c][torch.randperm(len(pools[c]), generator=g).numpy()] for c in range(10)}
    counts = {c: 0 for c in range(10)}
    idx = []
    for c in labels:  # without replacement inside a class while it lasts
        idx.append(picks[c][counts[c] % len(picks[c])])
        counts[c] += 1
    return reference.score(torch.from_numpy(train_x[np.array(idx)]), labels)


def seeded_scores(score_fn, seeds) -> dict:
    """{metric: (mean, std)} of `score_fn(seed)` over `seeds` (std 0 for one seed)."""
    rows = [score_fn(seed) for seed in seeds]
    return {m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows]))) for m in METRICS}


@torch.no_grad()
def sample_pipeline(pipe, num_samples: int, *, num_inference_steps: int, guidance_scale: float, seed: int = 0,
                    batch_size: int = 500) -> tuple[torch.Tensor, np.ndarray, float]:
    """(images (N, 1, 8, 8) in [-1, 1], labels, seconds) with balanced classes 0..9."""
    labels = np.arange(num_samples) % 10
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # for schedulers that re-noise without the generator
    out, start = [], time.perf_counter()
    for chunk in np.array_split(labels, max(1, int(np.ceil(num_samples / batch_size)))):
        out.append(pipe(chunk.tolist(), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=generator, output_type="latent").images.float())
    return torch.cat(out), labels, time.perf_counter() - start


def benchmark_row(pipe, reference: DigitsReference, *, name: str, num_inference_steps: int, guidance_scale: float,
                  num_samples: int = 1000, seed: int = 0, repeats: int = 1) -> dict:
    """One table row. Timing repeats reuse the same seed; the metrics come from the first pass."""
    pipe.set_progress_bar_config(disable=True)
    images, labels, seconds = sample_pipeline(pipe, num_samples, num_inference_steps=num_inference_steps,
                                              guidance_scale=guidance_scale, seed=seed)
    times = [seconds] + [sample_pipeline(pipe, num_samples, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, seed=seed)[2] for _ in range(repeats - 1)]
    nfe = num_inference_steps * (2 if guidance_scale != 1.0 else 1)
    return {"model": name, "steps": num_inference_steps, "cfg": guidance_scale, "nfe": nfe,
            "s_per_1k": statistics.median(times) * 1000 / num_samples, **reference.score(images, labels)}


def markdown_table(rows: list[dict]) -> str:
    """Rows of `benchmark_row` / `DigitsReference.score` (KID in units of 1e-3; precision / recall against the
    held-out digits, k = 3)."""
    head = ("| model | steps | CFG | NFE | s / 1k samples | FD ↓ | KID ×1e3 ↓ | precision | recall | accuracy | "
            "diversity (real = 1) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append("| {model} | {steps} | {cfg} | {nfe} | {time} | {fd:.2f} | {kid} | {p} | {rc} | {acc:.1%} | {div:.2f} |"
                     .format(model=r["model"], steps=r.get("steps", "–"), cfg=r.get("cfg", "–"), nfe=r.get("nfe", "–"),
                             time=f"{r['s_per_1k']:.2f}" if "s_per_1k" in r else "–", fd=r["fd"],
                             kid=f"{1e3 * r['kid']:.2f}" if "kid" in r else "–",
                             p=f"{r['precision']:.2f}" if "precision" in r else "–",
                             rc=f"{r['recall']:.2f}" if "recall" in r else "–", acc=r["accuracy"], div=r["diversity"]))
    return head + "\n".join(lines)


def write_benchmark(pipe, output_dir: str, *, name: str, step_counts, num_samples: int = 1000,
                    guidance_scale: float = 1.0) -> str:
    """Benchmark rows of a freshly trained student at `step_counts`, written to <output_dir>/benchmark.md."""

    reference = DigitsReference()
    rows = [benchmark_row(pipe, reference, name=name, num_inference_steps=n, guidance_scale=guidance_scale,
                          num_samples=num_samples) for n in sorted(set(step_counts))]
    table = markdown_table(rows)
    with open(os.path.join(output_dir, "benchmark.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    return table
