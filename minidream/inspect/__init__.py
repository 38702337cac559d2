"""Studying a model: what fine-tuning changed, tensor by tensor (weight_diff), and where each prompt token looks in
cross-attention (attention_maps, a transform that hooks a model).

May import: minidream.models, minidream.sampling, minidream.formats and the shared modules.
"""
