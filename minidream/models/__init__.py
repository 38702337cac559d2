"""The models: one file per network, attribute names = the diffusers checkpoint keys (clip, tokenizer, unet, vae,
attention), the StableDiffusion container with its named parts and one row per model family (stable_diffusion),
the noise schedule a model was trained with (noise_schedule), where it runs (device), and the transforms that add to
a loaded model without the model files knowing (lora, tokens, compile: torch.compile and CUDA graphs).

May import: the shared modules only (minidream.progress, minidream.plots, minidream.images, minidream.options).
"""
