"""What LoRA adapts in each kind of denoiser (--lora-targets; "attn" is also what --train attention trains): one
table per denoiser, each family's row (models/stable_diffusion.FAMILIES) names its own."""
import re

from minidream.models.lora import TargetSet, ending

# The UNet's: Q, K, V and out of every self- (attn1) and cross-attention (attn2) layer; kohya's networks adapt every
# Linear and Conv2d of the transformer blocks (attention, feed-forward, the 1×1 or linear proj_in/proj_out), and with
# LoCon those of the resnets and the up/downsamplers too (3×3 convs at --conv-rank); the time embedding, conv_in and
# conv_out stay out, as there.
UNET_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
UNET_FF = r"ff\.net\.(0\.proj|2)|attentions\.\d+\.(proj_in|proj_out)"
LOCON = r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(downsamplers|upsamplers)\.0\.conv"
UNET_TARGETS = {
    "attn": TargetSet(ending(UNET_ATTN), "Q/K/V/out of every attention layer"),
    "attn-ff": TargetSet(ending(UNET_ATTN, UNET_FF),
                         "and the feed-forward layers and proj_in/proj_out of every transformer"),
    "all": TargetSet(ending(UNET_ATTN, UNET_FF, LOCON),
                     "and the resnets' convolutions and time projections and the up/downsamplers (LoCon; 3x3 "
                     "kernels at --conv-rank/--conv-alpha)"),
}
# The MMDiT's: both streams' Q/K/V/out of the joint attention (diffusers' SD3 LoRA targets); then MMDiT-X's
# image-only attention and both streams' MLPs; then the adaLN modulations too (every Linear of the blocks).
MMDIT_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
MMDIT_FF = r"attn2\.(to_q|to_k|to_v|to_out\.0)|ff(_context)?\.net\.(0\.proj|2)"
MMDIT_TARGETS = {
    "attn": TargetSet(ending(MMDIT_ATTN), "Q/K/V/out of both streams of every joint attention"),
    "attn-ff": TargetSet(ending(MMDIT_ATTN, MMDIT_FF), "and SD3.5 Medium's attn2 and both streams' feed-forward"),
    "all": TargetSet(ending(MMDIT_ATTN, MMDIT_FF, r"norm1(_context)?\.linear"),
                     "and the adaLN modulation of every block"),
}
# Flux's: diffusers' train_dreambooth_lora_flux.py targets (both streams' attention and feed-forward; the single
# blocks' Q/K/V), then every Linear of the blocks (the single blocks' MLP input and joined output, BFL's linear1 and
# linear2, and every modulation) and the embedders of the input, the text and the conditioning vector.
FLUX_FF = r"ff(_context)?\.net\.(0\.proj|2)"
FLUX_ALL = (r"proj_mlp|proj_out|norm1(_context)?\.linear|norm\.linear|x_embedder|context_embedder|"
            r"time_text_embed\.\w+\.linear_[12]|norm_out\.linear")
FLUX_TARGETS = {
    "attn": TargetSet(ending(MMDIT_ATTN), "Q/K/V/out of both streams of every attention, and the single blocks' Q/K/V"),
    "attn-ff": TargetSet(ending(MMDIT_ATTN, FLUX_FF), "and both streams' feed-forward (diffusers' Flux targets)"),
    "all": TargetSet(re.compile(rf"(.*\.)?({MMDIT_ATTN}|{FLUX_FF}|{FLUX_ALL})$"),
                     "and the single blocks' MLP and output (BFL's linear1/linear2), every modulation, the embedders"),
}
