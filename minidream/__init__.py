"""minidream: Stable Diffusion and DreamBooth in plain PyTorch. The folders are the layers; each imports only the
layers before it (tests/test_structure.py reads every folder's "May import" line and enforces it):

    kernels    the fused Triton attention kernels (forward and backward, as torch.library custom ops); they import
               nothing of minidream
    models     the networks (CLIP text encoder, tokenizer, UNet, VAE, attention), the StableDiffusion container with
               its families and forward process, and the transforms that add to a model (LoRA, a new token)
    sampling   the samplers (one table) and text → image
    formats    files and layouts: the diffusers folder, the original single file, LoRA and embedding files, loading
               any model a user names, the export formats (one table)
    training   DreamBooth: the settings, the data, what trains, the step, the loop, checkpoints, exports
    inspect    tools that study a model: what fine-tuning changed, where a prompt's tokens look
    demo       the toy world, its embedded model, and DreamBooth's demo and evaluation on it

Shared by all of them, importing none of them: progress (bars), plots (pictures drawn with Pillow), image_files (PNG
files and grids), options (an option declared once, and its command-line form). The command line (cli.py, with every
command's options declared in cli_options.py and the steps they share in cli_common.py) sits on top. The benchmarks
live at the repository's root (they compare against diffusers, which nothing here may use) and install as
minidream.benchmarks, for `minidream bench`.
"""
