"""The demo model: where it ships (minidream/demo/weights, package data in both installs) and its tiny architecture,
the same classes as the real models (CLIPTextModel, UNet2DConditionModel, AutoencoderKL) at toy sizes.
"""
from minidream.formats.files import SHIPPED
from minidream.models.noise_schedule import SchedulerConfig
from minidream.models.unet import UNetConfig
from minidream.models.vae import VAEConfig

DEMO_DIR = SHIPPED["demo"]  # package data: a folder on disk in every install pip makes (`--model demo`)
MAX_TOKENS = 16  # the world's captions are short; fewer positions make every step cheaper

# Cross-attention at every stage, the 8×8 latent's too: the finest maps place a word best (the base model's attribute
# words read from the 8×8 layers alone localise at 5.0, from the 4×4 at 3.6, the 2×2 at 1.4; demo-attention-cpu.json).
UNET = UNetConfig(channels=(32, 64, 128), attention=(True, True, True), heads=(4, 4, 4), layers_per_block=1,
                  context_dim=64, groups=16, sample_size=8)
VAE = VAEConfig(channels=(32, 64, 64), layers_per_block=1, groups=16, sample_size=32)
# ε-prediction, DDIM from t = 951 (SD 1.x's schedule). A v-prediction model sampled from t = 999 (Lin et al. 2024)
# was tried for the demo's colour failures and bound the subject worse (benchmarks/results/demo-seeds-cpu.json).
SCHEDULER = SchedulerConfig()
# The weight of pretraining's grounding term (demo/grounding.py: the words naming a toy asked to look at it).
GROUNDING = 0.05
