"""Block-causal Wan with a KV cache, over the stock diffusers `WanTransformer3DModel`.

Nothing in the model is forked and its state dict is untouched: `CausalWan(transformer, ...)` installs

1. a self-attention processor (`set_attn_processor`) that applies the block-causal mask over frames
   (blocks of `num_frames_per_block` latent frames; a query frame sees every frame of its own and of
   earlier blocks, optionally only the last `local_attn_size` frames plus the first `sink_size`
   "attention sink" frames), and, given a `KVCache`, attends to the cached keys/values of earlier
   frames and appends its own;
2. a cross-attention processor that computes each layer's text keys/values once per cache;
3. a forward hook on `transformer.rope` that starts the temporal RoPE at `frame_offset`, so a chunk of
   frames gets the positions it has in the whole video;

and takes per-frame timesteps (B, F) (diffusion forcing), which it hands to Wan as its per-token
timesteps (B, F * tokens_per_frame). Keys are cached after RoPE, so a rolling window only drops frames.

Shapes: latents (B, C, F, H, W); tokens per frame P = (H / p_h) (W / p_w); attention tensors
(B, S, heads, head_dim) with S = frames * P.

Equality that the tests check: a chunk-by-chunk pass with the cache equals one masked pass over the
whole sequence, since under a block-causal mask earlier tokens never depend on later ones.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from .unwrap import unwrap_model


def as_layout(num_frames_per_block) -> tuple[int, ...]:
    """A block layout: the sizes of the first blocks, the last size repeating for ever after. An int N is the
    uniform layout (N,); [1, 4] is an independent first frame, then blocks of 4."""
    return (num_frames_per_block,) if isinstance(num_frames_per_block, int) else tuple(num_frames_per_block)


def frame_blocks(frames: torch.Tensor, layout: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, end frame of that block) of each absolute frame index under `layout`."""
    ends = torch.tensor(layout).cumsum(0)
    total, last = int(ends[-1]), layout[-1]
    inside = torch.searchsorted(ends, frames, right=True).clamp(max=len(layout) - 1)
    beyond = (frames - total).clamp(min=0) // last
    block = torch.where(frames < total, inside, len(layout) + beyond)
    end = torch.where(frames < total, ends[inside], total + (beyond + 1) * last)
    return block, end


def block_bounds(layout: tuple[int, ...], num_frames: int) -> list[tuple[int, int]]:
    """[(start, end)] of the blocks covering frames [0, num_frames); ValueError unless num_frames ends a block."""
    bounds, start, i = [], 0, 0
    while start < num_frames:
        size = layout[min(i, len(layout) - 1)]
        bounds.append((start, start + size))
        start, i = start + size, i + 1
    if start != num_frames:
        raise ValueError(f"`num_frames` ({num_frames}) must end on a block boundary of the layout {list(layout)} "
                         f"(the last size repeating); the blocks end at {[e for _, e in bounds]}.")
    return bounds


def _frame_visibility(q_frames: torch.Tensor, k_frames: torch.Tensor, num_frames_per_block,
                      local_attn_size: int, sink_size: int) -> torch.Tensor:
    """(Fq, Fk) bool: may a query at absolute frame q see a key at absolute frame k.

    visible = block(k) <= block(q) and (local_attn_size < 0 or k >= end(block(q)) - local_attn_size or k < sink_size),
    block(f) = f // N and end(b) = (b + 1) N for a uniform layout (`frame_blocks` for others)."""
    layout = as_layout(num_frames_per_block)
    q_block, q_end = frame_blocks(q_frames, layout)
    k_block, _ = frame_blocks(k_frames, layout)
    visible = k_block[None, :] <= q_block[:, None]
    if local_attn_size > 0:
        window_start = q_end[:, None] - local_attn_size
        visible &= (k_frames[None, :] >= window_start) | (k_frames[None, :] < sink_size)
    return visible


@functools.lru_cache(maxsize=32)
def block_causal_mask(num_frames: int, tokens_per_frame: int, num_frames_per_block: int | tuple[int, ...], *,
                      local_attn_size: int = -1, sink_size: int = 0, frame_offset: int = 0,
                      device: str = "cpu") -> torch.Tensor | None:
    """(S, S) bool attention mask of one pass over frames [frame_offset, frame_offset + num_frames)
    (True = attend), S = num_frames * tokens_per_frame; None when every token sees every token.
    A plain boolean tensor: SDPA's math and memory-efficient kernels take it on CPU and GPU."""
    frames = torch.arange(frame_offset, frame_offset + num_frames)  # built on the CPU, memoised, then moved
    visible = _frame_visibility(frames, frames, num_frames_per_block, local_attn_size, sink_size)
    if bool(visible.all()):
        return None
    return visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1).to(device)


class KVCache:
    """Self-attention keys/values of the frames written so far, one preallocated buffer per layer, and
    each layer's text cross-attention keys/values.

    Holds at most `capacity_frames` frames: the first `sink_size` frames of the video are kept for
    good, the rest is a rolling window of the most recent frames (older ones are dropped on write).
    Create it with `CausalWan.new_cache`; one cache serves one batch of videos (CFG: cond and uncond
    rows in one batch)."""

    def __init__(self, num_layers: int, batch_size: int, heads: int, head_dim: int, tokens_per_frame: int,
                 capacity_frames: int, *, sink_size: int = 0, device=None, dtype=torch.float32):
        if capacity_frames < 1 or not 0 <= sink_size <= capacity_frames:
            raise ValueError(f"need capacity_frames >= 1 and 0 <= sink_size <= capacity_frames, got "
                             f"capacity_frames={capacity_frames}, sink_size={sink_size}.")
        shape = (num_layers, batch_size, capacity_frames * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, capacity * P, heads, head_dim)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.tokens_per_frame, self.capacity_frames, self.sink_size = tokens_per_frame, capacity_frames, sink_size
        # Absolute frame of each held frame, ascending; bookkeeping on the CPU so that masks and eviction
        # plans never synchronise with the accelerator.
        self.frame_ids = torch.zeros(0, dtype=torch.long)
        self._keep: torch.Tensor | None = None  # token indices kept by the write in progress
        self._next_ids: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return self.frame_ids.numel()

    @property
    def next_frame(self) -> int:
        """Absolute index of the frame after the last one written."""
        return int(self.frame_ids[-1]) + 1 if self.num_frames else 0

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_frames * self.tokens_per_frame
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def plan_write(self, new_frame_ids: torch.Tensor) -> None:
        """Before a forward that writes: which held + new frames survive (all sinks, then the most recent
        capacity - sink_size frames)."""
        ids = torch.cat([self.frame_ids, new_frame_ids.cpu()])
        sink = ids < self.sink_size
        recent_rank = torch.cumsum((~sink).flip(0).long(), 0).flip(0)  # 1 = newest non-sink frame
        keep_frames = sink | (recent_rank <= self.capacity_frames - int(sink.sum()))
        p = self.tokens_per_frame
        keep = (torch.nonzero(keep_frames).flatten()[:, None] * p + torch.arange(p)).flatten()
        self._keep = keep.to(self.k.device)
        self._next_ids = ids[keep_frames]

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        k_ctx, v_ctx = self.read(layer)
        k_all, v_all = torch.cat([k_ctx, k_new], 1)[:, self._keep], torch.cat([v_ctx, v_new], 1)[:, self._keep]
        self.k[layer, :, :k_all.shape[1]] = k_all.detach()
        self.v[layer, :, :v_all.shape[1]] = v_all.detach()

    def commit(self) -> None:
        self.frame_ids, self._keep, self._next_ids = self._next_ids, None, None


class _State:
    """What the installed processors read during one forward (set by CausalWan.__call__)."""

    def __init__(self, num_frames_per_block: int, local_attn_size: int, sink_size: int):
        self.num_frames_per_block, self.local_attn_size, self.sink_size = num_frames_per_block, local_attn_size, sink_size
        self.tokens_per_frame = 1
        self.frame_offset = 0
        self.num_frames = 0
        self.cache: KVCache | None = None
        self.update_cache = False
        self.cached_mask: torch.Tensor | None = None  # (S_new, S_ctx + S_new) for the cached pass, None = all visible
        # Whether the model's last top-level forward came from CausalWan.__call__ (set by a forward pre-hook): other
        # calls run it as stock Wan. It stays set after the call, so gradient checkpointing's recomputation in the
        # backward pass sees the forward it recomputes -- unless the model was called otherwise in between, which is
        # why a shared module (LoRA adapters on one base) refuses gradient checkpointing.
        self.active = False


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding: pairs (x[2i], x[2i+1]) rotated; cos/sin (1, S, 1, head_dim)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = (x1 * c - x2 * s).to(x.dtype)
    out[..., 1::2] = (x1 * s + x2 * c).to(x.dtype)
    return out


def _attend(q, k, v, mask) -> torch.Tensor:
    """(B, Sq, H, D) x (B, Sk, H, D) -> (B, Sq, H * D); mask (Sq, Sk) bool or None."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).type_as(q)


class CausalSelfAttnProcessor:
    """Wan self-attention under the block-causal mask, reading from / writing to the state's KV cache; outside
    a CausalWan call, the processor the model had before (so one module can serve a causal student and a
    bidirectional teacher, e.g. LoRA adapters on one base)."""

    def __init__(self, state: _State, layer: int, fallback):
        self.state, self.layer, self.fallback = state, layer, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        st = self.state
        if not st.active:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (a.unflatten(2, (attn.heads, -1)) for a in (q, k, v))  # (B, S, heads, head_dim)
        q, k = _apply_rope(q, *rotary_emb), _apply_rope(k, *rotary_emb)
        if st.cache is None:
            mask = block_causal_mask(st.num_frames, st.tokens_per_frame, st.num_frames_per_block,
                                     local_attn_size=st.local_attn_size, sink_size=st.sink_size,
                                     frame_offset=st.frame_offset, device=str(q.device))
            out = _attend(q, k, v, mask)
        else:
            k_ctx, v_ctx = st.cache.read(self.layer)
            out = _attend(q, torch.cat([k_ctx.to(k.dtype), k], 1), torch.cat([v_ctx.to(v.dtype), v], 1), st.cached_mask)
            if st.update_cache:
                st.cache.write(self.layer, k, v)
        return attn.to_out[1](attn.to_out[0](out))


class CachedCrossAttnProcessor:
    """Wan text cross-attention whose keys/values are computed once per KV cache (they do not change
    across blocks and denoising steps).

    The cached copy is detached, so it is read only when no gradient is recorded: a forward with
    gradient (Self-Forcing's exit step, after no-grad steps filled the cache) recomputes them, so that
    `to_k`, `to_v` and `norm_k` get their gradient."""

    def __init__(self, state: _State, layer: int, fallback):
        self.state, self.layer, self.fallback = state, layer, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not self.state.active:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        cache = self.state.cache
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        if cache is not None and cache.cross[self.layer] is not None and not torch.is_grad_enabled():
            k, v = cache.cross[self.layer]
        else:
            if attn.fused_projections:
                k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            k, v = attn.norm_k(k).unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))
            if cache is not None and cache.cross[self.layer] is None:
                cache.cross[self.layer] = (k.detach(), v.detach())
        return attn.to_out[1](attn.to_out[0](_attend(q, k, v, None)))


def _rope_from_offset(rope, hidden_states: torch.Tensor, frame_offset: int):
    """Wan's (cos, sin), each (1, S, 1, head_dim), with temporal positions frame_offset, frame_offset + 1, ..."""
    _, _, f, h, w = hidden_states.shape
    p_t, p_h, p_w = rope.patch_size
    ppf, pph, ppw = f // p_t, h // p_h, w // p_w
    if frame_offset + ppf > rope.max_seq_len:
        raise ValueError(f"frames up to {frame_offset + ppf} exceed the model's rope_max_seq_len {rope.max_seq_len}.")
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t_part, h_part, w_part = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        parts = (t_part[frame_offset:frame_offset + ppf].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                 h_part[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                 w_part[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1))
        out.append(torch.cat(parts, dim=-1).reshape(1, ppf * pph * ppw, 1, -1))
    return tuple(out)


class CausalWan:
    """A stock `WanTransformer3DModel` run block-causally, with per-frame timesteps and a KV cache.

    Args:
        model: the Wan transformer, possibly wrapped (DDP/FSDP/compile) or peft-adapted; its weights and
            state dict are not touched.
        num_frames_per_block: N latent frames per causal block (1 = frame-causal), or a layout of block
            sizes whose last size repeats (`as_layout`; e.g. (1, 4): an independent first frame).
        local_attn_size: attend to the last `local_attn_size` frames only (counting the query's own
            block; -1 = all earlier frames). Must be >= N.
        sink_size: the first `sink_size` frames stay visible to every later frame (with a local window).
        sinks_in_window: how the window counts the sinks. False (ours): `local_attn_size` recent frames
            plus the sinks; True (Self-Forcing's and LongLive's KV-cache size): the sinks are part of the
            `local_attn_size` frames, so local_attn_size - sink_size recent frames (must be >= N).

    Call: `causal(x, timestep, encoder_hidden_states, kv_cache=None, frame_offset=0, update_cache=False)`
    -> (B, C, F, H, W) prediction; `timestep` (B,) or per-frame (B, F), native 0..1000 units (pass (B,)
    when all frames share a level: Wan's shared modulation is cheaper than its per-token one).
    Without a cache: one masked pass over frames [frame_offset, frame_offset + F). With a cache: the
    chunk attends to the cached frames and itself; `update_cache=True` appends the chunk's keys/values.
    """

    def __init__(self, model, num_frames_per_block: int = 1, *, local_attn_size: int = -1, sink_size: int = 0,
                 sinks_in_window: bool = False):
        inner = unwrap_model(model)
        if not isinstance(inner, WanTransformer3DModel):
            raise TypeError(f"`model` must be a WanTransformer3DModel, got {type(inner).__name__}.")
        self.check_layout(num_frames_per_block, local_attn_size, sink_size, sinks_in_window)
        if sinks_in_window and local_attn_size != -1:  # one convention inside: sinks outside the window
            local_attn_size -= sink_size
        if not isinstance(num_frames_per_block, int):
            num_frames_per_block = as_layout(num_frames_per_block)  # hashable, for the memoised masks
        if inner.config.patch_size[0] != 1:
            raise ValueError(f"causal blocks need a temporal patch size of 1, got patch_size={inner.config.patch_size}.")
        if any(block.attn2.add_k_proj is not None for block in inner.blocks):
            raise ValueError("image cross-attention (Wan I2V, added_kv_proj_dim) is not supported; condition on the "
                             "first frame through the KV cache instead (CausalWanPipeline(image=...)).")
        self.model = model
        self.state = _State(num_frames_per_block, local_attn_size, sink_size)
        self._previous = inner.attn_processors  # restored by remove()
        processors = {}
        for i, _ in enumerate(inner.blocks):
            processors[f"blocks.{i}.attn1.processor"] = CausalSelfAttnProcessor(
                self.state, i, self._previous[f"blocks.{i}.attn1.processor"])
            processors[f"blocks.{i}.attn2.processor"] = CachedCrossAttnProcessor(
                self.state, i, self._previous[f"blocks.{i}.attn2.processor"])
        inner.set_attn_processor(processors)
        self._calling = False
        self._active_hook = inner.register_forward_pre_hook(lambda module, args: setattr(self.state, "active", self._calling))
        self._hook = inner.rope.register_forward_hook(
            lambda rope, args, out: _rope_from_offset(rope, args[0], self.state.frame_offset)
            if self.state.active and self.state.frame_offset else out)

    @staticmethod
    def check_layout(num_frames_per_block, local_attn_size, sink_size, sinks_in_window: bool = False) -> None:
        """ValueError naming the setting unless the block / window / sink sizes fit together."""
        if not isinstance(sinks_in_window, bool):
            raise ValueError(f"`sinks_in_window` must be True or False, got {sinks_in_window!r}.")
        sizes = [num_frames_per_block] if isinstance(num_frames_per_block, (int, float, str, bool)) or \
            num_frames_per_block is None else list(num_frames_per_block)
        if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
            raise ValueError(f"`num_frames_per_block` must be an integer >= 1 or a non-empty list of them (block sizes), "
                             f"got {num_frames_per_block!r}.")
        for name, value in (("local_attn_size", local_attn_size), ("sink_size", sink_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        num_frames_per_block = max(sizes)  # the window must hold the largest block
        if local_attn_size != -1 and local_attn_size < num_frames_per_block:
            raise ValueError(f"`local_attn_size` must be -1 (global) or >= num_frames_per_block "
                             f"({num_frames_per_block}), got {local_attn_size}.")
        if sink_size < 0 or (sink_size and local_attn_size == -1):
            raise ValueError(f"`sink_size` must be >= 0 and needs a local window (local_attn_size != -1), got "
                             f"sink_size={sink_size}, local_attn_size={local_attn_size}.")
        if sinks_in_window and local_attn_size != -1 and local_attn_size - sink_size < num_frames_per_block:
            raise ValueError(f"with `sinks_in_window` the window holds the sinks: local_attn_size - sink_size must be "
                             f">= num_frames_per_block ({num_frames_per_block}), got {local_attn_size} - {sink_size}.")

    @property
    def unwrapped(self) -> WanTransformer3DModel:
        return unwrap_model(self.model)

    @property
    def config(self):
        return self.unwrapped.config

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def new_cache(self, batch_size: int, max_frames: int, height: int, width: int, *, device=None,
                  dtype=torch.float32) -> KVCache:
        """An empty cache for `batch_size` videos of latent size (height, width), up to `max_frames` frames
        (with a local window it holds only sink_size + local_attn_size - N of them)."""
        st, cfg = self.state, self.config
        capacity = max_frames if st.local_attn_size == -1 else min(  # the smallest block sees the most context
            max_frames, st.sink_size + st.local_attn_size - min(as_layout(st.num_frames_per_block)))
        return KVCache(cfg.num_layers, batch_size, cfg.num_attention_heads, cfg.attention_head_dim,
                       self.tokens_per_frame(height, width), max(capacity, 1), sink_size=st.sink_size,
                       device=device, dtype=dtype)

    def remove(self) -> None:
        """Put back the attention processors the model had before and drop the RoPE hook."""
        self.unwrapped.set_attn_processor(dict(self._previous))
        self._hook.remove()
        self._active_hook.remove()

    def __enter__(self) -> CausalWan:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *,
                 kv_cache: KVCache | None = None, frame_offset: int | None = None, update_cache: bool = False):
        b, _, f, h, w = hidden_states.shape
        st = self.state
        p = self.tokens_per_frame(h, w)
        if kv_cache is not None and kv_cache.tokens_per_frame != p:
            raise ValueError(f"the cache holds {kv_cache.tokens_per_frame} tokens per frame, the latents give {p}.")
        if kv_cache is None and update_cache:
            raise ValueError("`update_cache=True` needs a `kv_cache`.")
        if kv_cache is not None and torch.is_grad_enabled() and self.unwrapped.gradient_checkpointing:
            raise ValueError("gradient checkpointing recomputes attention after the cache has moved on: "
                             "disable it for cached passes that need gradients.")
        if frame_offset is None:
            frame_offset = kv_cache.next_frame if kv_cache is not None else 0
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if timestep.ndim == 2:  # per-frame (B, F) -> Wan's per-token (B, F * P)
            if timestep.shape != (b, f):
                raise ValueError(f"per-frame `timestep` must have shape {(b, f)}, got {tuple(timestep.shape)}.")
            timestep = timestep.repeat_interleave(p, dim=1)
        st.tokens_per_frame, st.frame_offset, st.num_frames = p, frame_offset, f
        st.cache, st.update_cache = kv_cache, update_cache
        if kv_cache is not None:
            new_ids = torch.arange(frame_offset, frame_offset + f)  # CPU, like the cache's bookkeeping
            visible = _frame_visibility(new_ids, torch.cat([kv_cache.frame_ids, new_ids]), st.num_frames_per_block,
                                        st.local_attn_size, st.sink_size)
            st.cached_mask = None if bool(visible.all()) else (
                visible.repeat_interleave(p, 0).repeat_interleave(p, 1).to(hidden_states.device))
            if update_cache:
                kv_cache.plan_write(new_ids)
        self._calling = True
        try:
            out = self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                             return_dict=False)[0]
        finally:
            self._calling = False
            st.cache, st.update_cache, st.cached_mask = None, False, None
        if update_cache:
            kv_cache.commit()
        return out
