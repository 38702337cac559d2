"""Formats: finding and reading weight files, safely and strictly (files); what config.json files say, read and
written (configs); the diffusers folder layout (diffusers_layout) and the original single file (single_file), both
ways, each reading its architecture through configs; any model a user names (loading); LoRA
files and textual-inversion embeddings, ours written and others' read (lora_files, embeddings); the export formats,
one table (exports).

May import: minidream.models, minidream.sampling and the shared modules.
"""
