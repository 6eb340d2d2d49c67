"""Tiny, randomly initialised diffusers components built from config, for offline tests and smoke runs.

Nothing here downloads: tokenizers are `tokenizers` WordLevel vocabularies built in memory and
wrapped in transformers' PreTrainedTokenizerFast; text encoders are 1-layer CLIP / T5 / UMT5 configs.
Every factory takes a `seed` so components are reproducible.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    CogVideoXTransformer3DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

WORDS = ("a photo of an astronaut riding horse cat dog digit zero one two three four five six seven eight nine "
         "red blue green big small the on in").split()
TEXT_DIM = 32


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_tokenizer(model_max_length: int = 16, bos_eos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace WordLevel tokenizer over WORDS ([PAD]=0, [UNK]=1, optional [BOS]/[EOS])."""
    specials = ["[PAD]", "[UNK]"] + (["[BOS]", "[EOS]"] if bos_eos else [])
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = dict(bos_token="[BOS]", eos_token="[EOS]") if bos_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=model_max_length, **extra)


def vocab_size(tokenizer) -> int:
    return len(tokenizer.get_vocab())


def tiny_clip_text_encoder(tokenizer, *, with_projection: bool = False, seed: int = 0, hidden_size: int = TEXT_DIM):
    _seeded(seed)
    config = CLIPTextConfig(vocab_size=vocab_size(tokenizer), hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                            projection_dim=hidden_size, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_t5_text_encoder(tokenizer, *, seed: int = 0, umt5: bool = False):
    _seeded(seed)
    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = cfg_cls(vocab_size=vocab_size(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)
    return model_cls(config).eval()


def tiny_unet2d(*, seed: int = 0, num_class_embeds: int | None = 10, in_channels: int = 1, sample_size: int = 8):
    _seeded(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=8, num_class_embeds=num_class_embeds)


def tiny_unet2d_condition(*, seed: int = 0, sdxl: bool = False, num_class_embeds: int | None = None,
                          cross_attention_dim: int = TEXT_DIM, **config):
    """SD1.5-style (cross-attention on 32-d text) or SDXL-style (+ text_time added conditioning)."""
    _seeded(seed)
    extra = dict(config)
    if sdxl:
        extra.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                num_class_embeds=num_class_embeds, **extra)


def tiny_sd3_transformer(*, seed: int = 0):
    _seeded(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                 caption_projection_dim=16, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16)


def tiny_flux_transformer(*, seed: int = 0, guidance_embeds: bool = False):
    _seeded(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 4, 8))


def tiny_wan_transformer(*, seed: int = 0, num_layers: int = 2):
    _seeded(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=num_layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def tiny_cogvideox_transformer(*, seed: int = 0):
    _seeded(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=1, sample_width=8,
                                       sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=5)


def tiny_vae(*, seed: int = 0, latent_channels: int = 4, **extra):
    _seeded(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         **extra)


def tiny_qwen_text_encoder(tokenizer, *, seed: int = 0):
    """A 1-layer Qwen2.5-VL (the Qwen-Image text encoder; its vision tower is built but never used)."""
    _seeded(seed)
    n = vocab_size(tokenizer)
    text = {"hidden_size": TEXT_DIM, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": n, "rope_theta": 1e6, "bos_token_id": 0, "eos_token_id": 0,
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}}
    config = Qwen2_5_VLConfig(text_config=text, hidden_size=TEXT_DIM, vocab_size=n, bos_token_id=0, eos_token_id=0,
                              vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                                             "out_hidden_size": TEXT_DIM},
                              vision_start_token_id=n + 1, vision_end_token_id=n + 2, vision_token_id=n + 3,
                              image_token_id=n + 4, video_token_id=n + 5)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_transformer(*, seed: int = 0):
    _seeded(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def tiny_qwen_image_vae(*, seed: int = 0):
    """Qwen-Image's causal 3-D VAE at 4x spatial compression, 4 latent channels, with per-channel latent stats."""
    _seeded(seed)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                                  latents_std=[1.5, 0.8, 1.2, 1.0])


def tiny_wan_vae(*, seed: int = 0):
    _seeded(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def tiny_cond(kind: str, batch_size: int, *, seed: int = 0, seq_len: int = 5) -> dict:
    """Random conditioning of the right shapes for `Denoiser` on the tiny models above."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch_size, seq_len, TEXT_DIM, generator=g)
    if kind == "unet2d":
        return {"class_labels": torch.randint(0, 10, (batch_size,), generator=g)}
    if kind == "sd":
        return {"encoder_hidden_states": text}
    if kind == "sdxl":
        return {"encoder_hidden_states": text, "added_cond_kwargs": {
            "text_embeds": torch.randn(batch_size, TEXT_DIM, generator=g),
            "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(batch_size, 1)}}
    if kind == "sd3":
        return {"encoder_hidden_states": text, "pooled_projections": torch.randn(batch_size, 2 * TEXT_DIM, generator=g)}
    if kind in ("flux", "flux_guidance"):
        cond = {"encoder_hidden_states": text, "pooled_projections": torch.randn(batch_size, TEXT_DIM, generator=g)}
        if kind == "flux_guidance":
            cond["guidance"] = torch.full((batch_size,), 3.5)
        return cond
    if kind in ("wan", "cogvideox"):
        return {"encoder_hidden_states": text}
    if kind == "qwen":  # the last two text tokens of the second row are padding
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        mask[1:, -2:] = 0
        return {"encoder_hidden_states": text, "encoder_hidden_states_mask": mask}
    raise ValueError("`kind` must be one of unet2d, sd, sdxl, sd3, flux, flux_guidance, qwen, wan, cogvideox; "
                     f"got {kind!r}.")


def tiny_pipeline(kind: str, scheduler, *, seed: int = 0, **model_config):
    """A complete tiny stock pipeline: 'sd' (StableDiffusionPipeline), 'sdxl', 'sd3', 'flux', 'qwen'
    (QwenImagePipeline) or 'wan' (`model_config`: extra config of the UNet / transformer, e.g.
    guidance_embeds=True for Flux)."""
    if kind == "sdxl":  # two CLIP encoders: hidden states concatenated (2 x 32 = 64-d cross-attention)
        tok = tiny_tokenizer(model_max_length=8)
        return StableDiffusionXLPipeline(
            vae=tiny_vae(seed=seed), text_encoder=tiny_clip_text_encoder(tok, seed=seed), tokenizer=tok,
            text_encoder_2=tiny_clip_text_encoder(tok, with_projection=True, seed=seed + 1), tokenizer_2=tok,
            unet=tiny_unet2d_condition(seed=seed, sdxl=True, cross_attention_dim=2 * TEXT_DIM, **model_config),
            scheduler=scheduler)
    if kind == "sd":
        tok = tiny_tokenizer(model_max_length=8)
        return StableDiffusionPipeline(vae=tiny_vae(seed=seed), text_encoder=tiny_clip_text_encoder(tok, seed=seed),
                                       tokenizer=tok, unet=tiny_unet2d_condition(seed=seed, **model_config),
                                       scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sd3":
        tok = tiny_tokenizer(model_max_length=8)
        return StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(seed=seed), scheduler=scheduler,
            vae=tiny_vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=tiny_clip_text_encoder(tok, with_projection=True, seed=seed), tokenizer=tok,
            text_encoder_2=tiny_clip_text_encoder(tok, with_projection=True, seed=seed + 1), tokenizer_2=tok,
            text_encoder_3=tiny_t5_text_encoder(tok, seed=seed), tokenizer_3=tok)
    if kind == "flux":
        tok = tiny_tokenizer(model_max_length=8)
        return FluxPipeline(scheduler=scheduler, vae=tiny_vae(seed=seed, shift_factor=0.1159, scaling_factor=0.3611),
                            text_encoder=tiny_clip_text_encoder(tok, seed=seed), tokenizer=tok,
                            text_encoder_2=tiny_t5_text_encoder(tok, seed=seed), tokenizer_2=tok,
                            transformer=tiny_flux_transformer(seed=seed, **model_config))
    if kind == "qwen":
        tok = tiny_tokenizer(model_max_length=8)
        return QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_image_vae(seed=seed),
                                 text_encoder=tiny_qwen_text_encoder(tok, seed=seed), tokenizer=tok,
                                 transformer=tiny_qwen_image_transformer(seed=seed, **model_config))
    if kind == "wan":
        tok = tiny_tokenizer(model_max_length=8)
        return WanPipeline(tokenizer=tok, text_encoder=tiny_t5_text_encoder(tok, seed=seed, umt5=True),
                           vae=tiny_wan_vae(seed=seed), scheduler=scheduler, transformer=tiny_wan_transformer(seed=seed))
    raise ValueError(f"`kind` must be one of 'sd', 'sdxl', 'sd3', 'flux', 'qwen', 'wan'; got {kind!r}.")
