"""Inputs of causal students: diffusion-forcing inputs (CausVid, CausalKD) and the Self-Forcing rollout.

Time convention: RF, t = 1 noise, t = 0 data; `t_list` is the student's per-block schedule
[t_0 = 1 > t_1 > ... > t_{K-1}] (the CausalWanPipeline's denoising_timesteps / 1000).
"""

from __future__ import annotations

import torch

from ..models.causal_wan import CausalWan
from ..parametrization import RectifiedFlow, add_noise


def block_step_indices(b: int, num_frames: int, num_frames_per_block: int, num_steps: int, device=None, *,
                       include_clean: bool = False) -> torch.Tensor:
    """(B, F) index into t_list per frame, one uniform draw per block (diffusion forcing on the
    student's own schedule, CausVid sec. 4). include_clean: the draw is over num_steps + 1 points, index
    num_steps standing for t = 0 (a clean block, as the inference cache holds; CausVid's and Self-Forcing's
    step lists include 0)."""
    idx = torch.randint(0, num_steps + int(include_clean), (b, num_frames // num_frames_per_block), device=device)
    return idx.repeat_interleave(num_frames_per_block, dim=1)


def with_clean_point(t_list: torch.Tensor) -> torch.Tensor:
    """t_list with t = 0 appended (the index `len(t_list)` of `block_step_indices(include_clean=True)`)."""
    return torch.cat([t_list, t_list.new_zeros(1)])


def diffusion_forcing_inputs(x0: torch.Tensor, t_list: torch.Tensor, num_frames_per_block: int, *,
                             include_clean: bool = True):
    """CausVid's student inputs: x0 (B, C, F, H, W) noised per block at a point of the schedule (or, with
    include_clean, left clean at t = 0) -> (x_t, t (B, F))."""
    idx = block_step_indices(x0.shape[0], x0.shape[2], num_frames_per_block, len(t_list), x0.device,
                             include_clean=include_clean)
    t = with_clean_point(t_list.to(x0.device))[idx]
    return add_noise(RectifiedFlow(), x0, torch.randn_like(x0), t), t


def step_generator(seed: int, index: int, rank: int = 0) -> torch.Generator:
    """A generator that is a pure function of (seed, rank, index): the draws of step `index` on `rank`
    are the same in a resumed run, and the same on every rank when rank = 0 is passed everywhere."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + index)


def shared_exit_index(seed: int, iteration: int, num_steps: int) -> int:
    """The rollout's gradient step for `iteration`, uniform in [0, num_steps): a function of (seed,
    iteration) only, so every DDP rank picks the same one (the ranks must run the same forwards, the
    same number of them with gradient) and a resumed run picks what it would have picked."""
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be >= 1, got {num_steps}.")
    return int(torch.randint(0, num_steps, (), generator=step_generator(seed, iteration)))


def self_forcing_rollout(student, noise: torch.Tensor, cond: dict, t_list: torch.Tensor, *, exit_index: int,
                         context_noise: float = 0.0) -> torch.Tensor:
    """Self-Forcing's training rollout (Huang et al. arXiv:2506.08009, Alg. 1): the causal student
    generates the video block by block with its own KV cache, exactly as CausalWanPipeline samples:
    per block, x0 = x_t - t v, re-noised with fresh noise to the next t of `t_list`, and the finished
    block is written into the cache with one forward at `context_noise`.

    Gradient: only through each block's forward at step `exit_index` (whose x0 is the block's output);
    the earlier steps and the cache writes run without gradient, so memory stays one block deep.

    student: a Denoiser over a `CausalWan`. noise: (B, C, F, H, W). Returns x0 (B, C, F, H, W)."""
    causal = student.model
    if not isinstance(causal, CausalWan):
        raise TypeError(f"`student` must be a Denoiser over a CausalWan, got {type(causal).__name__}.")
    if not 0 <= exit_index < len(t_list):
        raise ValueError(f"`exit_index` must be in [0, {len(t_list)}), got {exit_index}.")
    b, _, f, h, w = noise.shape
    n = causal.state.num_frames_per_block
    dtype = next(causal.unwrapped.parameters()).dtype
    cache = causal.new_cache(b, f, h, w, device=noise.device, dtype=dtype)
    blocks = []
    for start in range(0, f, n):
        x = noise[:, :, start:start + n]
        block_cond = {**cond, "kv_cache": cache}
        with torch.no_grad():
            for i in range(exit_index):
                x0 = student(x, t_list[i], block_cond)
                x = add_noise(student.process, x0, torch.randn_like(x0), t_list[i + 1])
        x0 = student(x, t_list[exit_index], block_cond)  # the one step with gradient
        blocks.append(x0)
        with torch.no_grad():
            ctx = x0.detach()
            if context_noise > 0:
                ctx = add_noise(student.process, ctx, torch.randn_like(ctx), torch.tensor(context_noise))
            student(ctx, torch.tensor(context_noise), {**cond, "kv_cache": cache, "update_cache": True})
    return torch.cat(blocks, 2)


def rollout_window(seed: int, iteration: int, rollout_frames: int, window_frames: int, block: int) -> slice:
    """The frames of a long rollout the teacher and the fake score see at `iteration`: `window_frames` frames from
    a block-aligned start drawn uniformly, a function of (seed, iteration) only (so the same on every rank and
    on resume); the whole rollout when it is no longer than the window."""
    if window_frames > rollout_frames:
        raise ValueError(f"the window ({window_frames} frames) is longer than the rollout ({rollout_frames}).")
    starts = range(0, rollout_frames - window_frames + 1, block)
    start = starts[int(torch.randint(len(starts), (1,), generator=step_generator(seed, iteration, 1_000_003)))]
    return slice(start, start + window_frames)
