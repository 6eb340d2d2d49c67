"""The digits teacher architecture: a ~0.9 M-parameter class-conditional UNet2DConditionModel.

UNet2DConditionModel (not UNet2DModel) because it takes class labels *and* peft adapters
(PeftAdapterMixin), which LoRA distillation needs. No cross-attention: conditioning is the class
embedding only; label NULL_CLASS (= 10) is the unconditional class used for CFG.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

NULL_CLASS = 10


def digits_unet(block_out_channels=(32, 64), layers_per_block: int = 2) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
        num_class_embeds=NULL_CLASS + 1, norm_num_groups=16, attention_head_dim=16)


def digits_cond(labels):
    """Denoiser cond for the digits UNet."""
    return {"class_labels": labels, "encoder_hidden_states": None}
