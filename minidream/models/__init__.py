"""The models: one file per network, attribute names = the diffusers checkpoint keys (clip, tokenizer, unet, vae,
attention), the StableDiffusion container with its named parts and one row per model family (stable_diffusion),
the noise schedule a model was trained with (noise_schedule), where it runs (device), and the transforms that add to
a loaded model without the model files knowing (lora, new_token, compile: torch.compile and CUDA graphs).

May import: minidream.kernels (the Triton attention backend) and the shared modules (minidream.progress,
minidream.plots, minidream.image_files, minidream.options).
"""
