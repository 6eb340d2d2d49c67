"""Moving digits: a tiny real video benchmark for causal students.

A video is one real 8x8 digit (the scikit-learn digits) pasted on a 16x16 canvas (background -1) at
integer positions p(k) = bounce(p0 + v k), k = 0..7, v in {-1, +1}^2 pixels per frame, reflected at the
canvas edge (positions 0..8). Videos are (B, 1, 8, 16, 16) in [-1, 1]; the model works in pixels.

Conditioning is text-like: three tokens (class, vx, vy), each a fixed random 32-d vector from a seeded
table (`moving_digits_cond`), fed as Wan's encoder_hidden_states. The start position is the model's own
choice: Wan has no absolute position embedding (3-D RoPE is relative only), so from pure noise a stock Wan
cannot know where "x = 2" is — a benchmark that asked for a start position would measure that, not
generation or motion (the first teachers, conditioned on the start, moved their digits no better than
noise does; docs/results.md). What it must get right is the class, a rigid digit, the requested velocity
and the bounce at the walls.

Metrics (`MovingDigitsReference.score`), from the shipped digits classifier:
  accuracy        per-frame class accuracy against the requested class, on the 8x8 window that holds the
                  most ink in that frame (`locate`; ties go to the window whose ink is best centred);
  fd              Fréchet distance of those windows' features to the held-out real digits' (all frames);
  identity        per video, the fraction of frames whose predicted class is the video's majority class
                  (1 = the digit never changes identity), averaged;
  motion_error    the video's path is fitted as the start p0 whose trajectory bounce(p0, v) with the
                  requested v holds the most ink (`fit_start`); then mean |(c_k - c_0) - (p_k - p_0)| in
                  pixels per axis, c the frame's ink centroid (0 for a rigid digit moving as asked,
                  about 2-3 px for a static digit);
  flicker         mean |w_{k+1} - w_k| of the windows w_k along the fitted path (appearance change frame
                  to frame; 0 for real videos).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from .classifier import load_digits_classifier
from .digits_data import load_digits_arrays
from .metrics import classify, frechet_distance

NUM_FRAMES = 8
CANVAS = 16
DIGIT = 8
TEXT_DIM = 32
NUM_TOKENS = 3
_MAX_POS = CANVAS - DIGIT  # 8
# the bidirectional moving-digits teacher (train_causal_sft --num_frames_per_block 8), the video scripts'
# default --teacher: 13,000 steps x 32 (the last 3,000 with cond_dropout 0.1), sampled with CFG 3 (docs/results.md)
MOVING_DIGITS_TEACHER_PATH = os.path.join(os.path.dirname(__file__), "assets", "moving_digits_teacher")
# the same teacher fine-tuned on any-phase clips (`sample_motion(any_phase=True)`), for students that stream past
# 8 frames: every window of a long video is one of its clips (docs/results.md, long streams)
MOVING_DIGITS_ANY_PHASE_TEACHER_PATH = os.path.join(os.path.dirname(__file__), "assets",
                                                    "moving_digits_teacher_any_phase")


def _token_table() -> torch.Tensor:
    """(10 + 2 + 2, TEXT_DIM) fixed token vectors: class 0-9, vx -/+, vy -/+."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(10 + 2 + 2, TEXT_DIM, generator=g)


_TABLE = _token_table()


def bounce(p0: torch.Tensor, v: torch.Tensor, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """(B, 2) start, (B, 2) velocity -> (B, T, 2) integer positions reflected into [0, 8]."""
    k = torch.arange(num_frames, device=p0.device)[None, :, None]
    raw = (p0[:, None] + v[:, None] * k) % (2 * _MAX_POS)  # (B, T, 2) on the unfolded circle
    return torch.where(raw > _MAX_POS, 2 * _MAX_POS - raw, raw)


def render(digits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) digits in [-1, 1], (B, T, 2) (x, y) positions -> (B, 1, T, 16, 16) videos."""
    b, t = positions.shape[:2]
    video = torch.full((b, 1, t, CANVAS, CANVAS), -1.0)
    for i in range(b):
        for k in range(t):
            x, y = (int(c) for c in positions[i, k])
            video[i, 0, k, y:y + DIGIT, x:x + DIGIT] = digits[i, 0]
    return video


def sample_motion(b: int, generator: torch.Generator | None = None, *, any_phase: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) start positions uniform in 0..8 and (B, 2) velocities in {-1, +1}: the digit first moves along v.
    any_phase: starts uniform on the whole bounce cycle (0..15 on the unfolded circle, `bounce`), so a video may
    begin moving against v on an axis. That distribution is stationary under the motion: every window of a
    long video is distributed as a fresh clip, which the forward starts are not (v is then only the initial
    direction, and a window cut later starts against it about half the time)."""
    p0 = torch.randint(0, 2 * _MAX_POS if any_phase else _MAX_POS + 1, (b, 2), generator=generator)
    v = torch.randint(0, 2, (b, 2), generator=generator) * 2 - 1
    return p0, v


def moving_digits_cond(labels: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B,) classes, (B, 2) velocities in {-1, +1} -> (B, 3, TEXT_DIM) text-like conditioning."""
    labels, v = (torch.as_tensor(a).long().cpu() for a in (labels, v))
    if labels.ndim != 1 or v.shape != (labels.shape[0], 2):
        raise ValueError(f"`labels` must be (B,) and `v` (B, 2), got {tuple(labels.shape)} and {tuple(v.shape)}.")
    if labels.min() < 0 or labels.max() > 9 or not bool((v.abs() == 1).all()):
        raise ValueError("`labels` must be classes 0-9 and `v` velocities in {-1, +1}.")
    idx = torch.stack([labels, 10 + (v[:, 0] > 0).long(), 12 + (v[:, 1] > 0).long()], 1)
    return _TABLE[idx]  # (B, 3, TEXT_DIM)


def moving_digits_null_cond(b: int) -> torch.Tensor:
    """(B, 3, TEXT_DIM) zeros: the unconditional input ("empty prompt") for classifier-free guidance; a
    teacher trained with `cond_dropout` > 0 has learnt it."""
    if b < 1:
        raise ValueError(f"`b` must be >= 1, got {b}.")
    return torch.zeros(b, NUM_TOKENS, TEXT_DIM)


def drop_cond(cond: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each sample's (B, 3, TEXT_DIM) conditioning by the null one with probability p (CFG training)."""
    if not 0 <= p < 1:
        raise ValueError(f"`p` (cond_dropout) must be in [0, 1), got {p}.")
    keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= p
    return cond * keep[:, None, None].to(cond.dtype)


class MovingDigits:
    """Random moving-digit videos from one split of the digits (a fresh motion per draw)."""

    def __init__(self, split: str = "train", *, any_phase: bool = False):
        images, labels = load_digits_arrays(split)
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.any_phase = bool(any_phase)

    def sample(self, b: int, generator: torch.Generator | None = None) -> dict:
        """{'video' (B, 1, 8, 16, 16), 'labels', 'p0', 'v', 'cond' (B, 3, 32)}; starts as `sample_motion`'s."""
        idx = torch.randint(0, len(self.labels), (b,), generator=generator)
        p0, v = sample_motion(b, generator, any_phase=self.any_phase)
        labels = self.labels[idx]
        return {"video": render(self.images[idx], bounce(p0, v)), "labels": labels, "p0": p0, "v": v,
                "cond": moving_digits_cond(labels, v)}


def ink_centroid(frames: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) frames in [-1, 1] -> (N, 2) (x, y) centroid of the ink (pixel + 1)."""
    ink = (frames.float()[:, 0] + 1).clamp(min=0)  # (N, H, W)
    mass = ink.flatten(1).sum(1).clamp(min=1e-6)
    xs, ys = torch.arange(ink.shape[2], dtype=ink.dtype), torch.arange(ink.shape[1], dtype=ink.dtype)
    return torch.stack([(ink.sum(1) * xs).sum(1) / mass, (ink.sum(2) * ys).sum(1) / mass], 1)


def crop(frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16, 16), (N, 2) -> (N, 1, 8, 8) windows."""
    return torch.stack([f[:, int(y):int(y) + DIGIT, int(x):int(x) + DIGIT] for f, (x, y) in zip(frames, positions)])


_TIE = 0.01  # ink units per pixel of off-centre ink centroid: breaks ties between windows holding equal ink


def window_scores(frames: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16, 16) frames in [-1, 1] -> (N, 9, 9) score of the 8x8 window at each (y, x): the ink it
    holds, minus _TIE x the L1 distance of its ink centroid from `centre` (the real digits' mean (x, y)
    centroid in their own box)."""
    ink = ((frames.float() + 1) / 2).clamp(0, 1)  # (N, 1, H, W)
    ramp = torch.arange(DIGIT, dtype=ink.dtype)
    kernels = torch.stack([torch.ones(DIGIT, DIGIT), ramp.expand(DIGIT, DIGIT), ramp[:, None].expand(DIGIT, DIGIT)])
    mass, mx, my = torch.nn.functional.conv2d(ink, kernels[:, None]).unbind(1)  # (N, 9, 9) each
    safe = mass.clamp(min=1e-6)
    off = (mx / safe - centre[0]).abs() + (my / safe - centre[1]).abs()
    return mass - _TIE * off


def locate(frames: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(N, 1, 16, 16) -> (N, 2) (x, y) of the best-scoring 8x8 window (window_scores) of each frame."""
    return _best_window(window_scores(frames, centre))


def _best_window(scores: torch.Tensor) -> torch.Tensor:
    """(N, 9, 9) window scores -> (N, 2) (x, y) of each frame's best window."""
    flat = scores.flatten(1).argmax(1)
    side = _MAX_POS + 1
    return torch.stack([flat % side, flat // side], 1)


def fit_start(videos: torch.Tensor, v: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, 16, 16) videos and their requested (B, 2) velocities -> (B, 2) the start p0 whose path
    bounce(p0, v) has the best summed window score over the frames (the path that holds the most ink)."""
    b, _, t = videos.shape[:3]
    return _best_start(window_scores(videos.permute(0, 2, 1, 3, 4).reshape(b * t, 1, CANVAS, CANVAS), centre), v, b, t)


def _best_start(scores: torch.Tensor, v: torch.Tensor, b: int, t: int, any_phase: bool = False) -> torch.Tensor:
    """(B*T, 9, 9) window scores, (B, 2) velocities -> (B, 2) the start whose bounce path scores best.
    any_phase: starts on the whole unfolded circle (0..15 per axis), i.e. a path may begin moving against
    v on an axis, as a window cut from the middle of a bouncing video does."""
    side = _MAX_POS + 1
    scores = scores.reshape(b, t, side * side)
    starts = 2 * _MAX_POS if any_phase else side
    grid = torch.stack(torch.meshgrid(torch.arange(starts), torch.arange(starts), indexing="xy"), -1).reshape(-1, 2)
    n = grid.shape[0]  # 81 candidate starts (x, y); 256 with any_phase
    paths = bounce(grid.repeat(b, 1), torch.as_tensor(v).long().repeat_interleave(n, 0), t).reshape(b, n, t, 2)
    index = (paths[..., 1] * side + paths[..., 0]).permute(0, 2, 1)  # (B, T, 81) window index per frame
    best = scores.gather(2, index).sum(1).argmax(1)  # (B,)
    return grid[best]


class MovingDigitsReference:
    """Held-out real digits' classifier features and mean ink centroid, computed once; scores videos."""

    def __init__(self):
        self.classifier = load_digits_classifier()
        held_x, _ = load_digits_arrays("held_out")
        held = torch.from_numpy(held_x)
        self.features, _ = classify(self.classifier, held)
        self.centre = ink_centroid(held).mean(0)  # (x, y) of the real digits' ink in their own 8x8 box

    @torch.no_grad()
    def score(self, videos: torch.Tensor, labels, v, *, any_phase: bool = False) -> dict:
        """videos (B, 1, T, 16, 16) in [-1, 1] with the (B,) classes and (B, 2) velocities they were asked for.
        any_phase: the fitted path may start moving against v on an axis (`_best_start`), for windows cut
        from the middle of a longer video."""
        videos = torch.as_tensor(videos).float().cpu().clamp(-1, 1)
        v = torch.as_tensor(v).long().cpu()
        if videos.ndim != 5 or videos.shape[1] != 1 or videos.shape[3:] != (CANVAS, CANVAS):
            raise ValueError(f"`videos` must be (B, 1, T, {CANVAS}, {CANVAS}), got {tuple(videos.shape)}.")
        b, _, t = videos.shape[:3]
        if v.shape != (b, 2) or len(labels) != b:
            raise ValueError(f"need (B,) labels and (B, 2) v for B = {b}, got {len(labels)} and {tuple(v.shape)}.")
        frames = videos.permute(0, 2, 1, 3, 4).reshape(b * t, 1, CANVAS, CANVAS)
        scores = window_scores(frames, self.centre)  # once, for both the per-frame windows and the path
        windows = crop(frames, _best_window(scores))  # (B*T, 1, 8, 8): each frame's digit (= locate)
        feats, preds = classify(self.classifier, windows)
        preds = preds.reshape(b, t)
        labels = np.asarray(labels)
        majority = np.array([np.bincount(p, minlength=10).argmax() for p in preds])
        path = bounce(_best_start(scores, v, b, t, any_phase), v, t)  # (B, T, 2) the fitted trajectory (= fit_start)
        c = ink_centroid(frames).reshape(b, t, 2)
        moved, path_moved = c[:, 1:] - c[:, :1], (path[:, 1:] - path[:, :1]).float()
        w = crop(frames, path.reshape(b * t, 2)).reshape(b, t, -1)
        return {
            "accuracy": float((preds == labels[:, None]).mean()),
            "fd": frechet_distance(feats, self.features),
            "identity": float((preds == majority[:, None]).mean()),
            "motion_error": float((moved - path_moved).abs().mean()),
            "flicker": float((w[:, 1:] - w[:, :-1]).abs().mean()),
        }


def score_windows(reference: MovingDigitsReference, videos: torch.Tensor, labels, v, window: int = NUM_FRAMES) -> list[dict]:
    """Scores of consecutive `window`-frame windows of long videos (B, 1, T, 16, 16), T a multiple of `window`,
    each fitted with `any_phase` (a window starts wherever the bounce has taken the digit)."""
    t = videos.shape[2]
    if t % window:
        raise ValueError(f"the video length {t} must be a multiple of `window` ({window}).")
    return [reference.score(videos[:, :, i:i + window], labels, v, any_phase=True) for i in range(0, t, window)]


def moving_digits_transformer(num_layers: int = 4, heads: int = 4, head_dim: int = 24, ffn_dim: int = 256):
    """The benchmark's tiny Wan: pixels in (1 channel), 4x4 patches -> 16 tokens per frame."""

    return WanTransformer3DModel(patch_size=(1, 4, 4), num_attention_heads=heads, attention_head_dim=head_dim,
                                 in_channels=1, out_channels=1, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=ffn_dim,
                                 num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=64)


@torch.no_grad()
def benchmark_video_pipeline(pipe, reference: MovingDigitsReference, *, num_videos: int = 500, seed: int = 0,
                             batch_size: int = 100, guidance_scale: float = 1.0, any_phase: bool = False) -> dict:
    """Sample `num_videos` videos from a CausalWanPipeline for held-out conditions (classes 0-9 in turn,
    seeded velocities), score them, and time the sampling (seconds per video). guidance_scale > 1 uses
    classifier-free guidance against `moving_digits_null_cond`. any_phase: the path fit may start anywhere on
    the bounce cycle (for models trained on `sample_motion(any_phase=True)` clips)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_videos) % 10
    _, v = sample_motion(num_videos, g)
    videos, elapsed = [], 0.0
    for start in range(0, num_videos, batch_size):
        sl = slice(start, start + batch_size)
        noise = torch.randn(len(labels[sl]), 1, NUM_FRAMES, CANVAS, CANVAS, generator=g)
        begin = time.perf_counter()
        extra = ({"guidance_scale": guidance_scale, "negative_prompt_embeds": moving_digits_null_cond(len(noise))}
                 if guidance_scale != 1.0 else {})
        videos.append(pipe(prompt_embeds=moving_digits_cond(labels[sl], v[sl]), latents=noise,
                           height=CANVAS, width=CANVAS, output_type="latent", generator=g, **extra).frames)
        elapsed += time.perf_counter() - begin
    scores = reference.score(torch.cat(videos), labels, v, any_phase=any_phase)
    return {**scores, "s_per_video": elapsed / num_videos}


def markdown_rows(rows: list[dict]) -> str:
    """| model | steps per block | accuracy | FD | identity | motion error | flicker | s / video |"""
    lines = ["| model | steps / block | per-frame acc. | FD ↓ | identity | motion err. (px) | flicker | s / video |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('steps', '')} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | "
                     f"{r['identity']:.3f} | {r['motion_error']:.3f} | {r['flicker']:.3f} | "
                     f"{r.get('s_per_video', float('nan')):.4f} |")
    return "\n".join(lines)
