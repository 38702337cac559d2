"""The attention shapes of SD's UNets at 512 px, batch 2 (instance + prior): what the kernels in
attention.py are written for, what `minidream.kernels.compile_check` compiles and `benchmarks.attention` times.
No triton import here, so the benchmarks can read it before choosing a device."""

SD_SHAPES = {  # name: (B, H, N, M, D)
    "sd1-self-4096-d40": (2, 8, 4096, 4096, 40), "sd1-cross-4096-d40": (2, 8, 4096, 77, 40),
    "sd1-self-1024-d80": (2, 8, 1024, 1024, 80), "sd1-cross-1024-d80": (2, 8, 1024, 77, 80),
    "sd1-self-256-d160": (2, 8, 256, 256, 160), "sd1-cross-256-d160": (2, 8, 256, 77, 160),
    "sd1-self-64-d160": (2, 8, 64, 64, 160),
    "sd2-self-4096-d64": (2, 5, 4096, 4096, 64), "sd2-self-1024-d64": (2, 10, 1024, 1024, 64),
    "sd2-cross-1024-d64": (2, 10, 1024, 77, 64),
}
