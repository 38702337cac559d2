"""The embedded demo: a procedural toy world (world), a tiny text-to-image model of it shipped as package data in
demo/weights (model; pretrained from nothing by pretrain), the recogniser that reads samples (recognizer), and
DreamBooth run and measured on it (run, evaluation).

May import: minidream.training, minidream.inspect, minidream.formats, minidream.sampling, minidream.models and the
shared modules.
"""
