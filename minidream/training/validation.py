"""What a run shows of itself while it trains, so that overfitting and drift are seen, not guessed:

- validation grids: the model being trained, sampled for each validation row from fixed seeds, so grids are
  comparable across steps (OUT/samples/step-NNNNNN.png; step 0 is the base model, final.png after training). A row
  is a --validation-prompt (the run's --validation-steps, sampler and size), or an entry of --validation-file with
  its own negative prompt, guidance, size, seed and steps;
- the validation loss (`HeldOutLoss`): the ε-loss on fixed (image, timestep, noise) triples, for the subject's
  photos (how well it fits) and for a fixed set of class images (how far the class drifts from the prior).
"""
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from minidream.image_files import save_png
from minidream.plots import labelled_grid
from minidream.models.stable_diffusion import StableDiffusion, encode_text, image_conditioning
from minidream.options import first_problem, text
from minidream.sampling.pipeline import SamplingParams, generate
from minidream.training import json_rows

ROW_KEYS = {"prompt": str, "negative_prompt": str, "guidance": (int, float), "guidance_rescale": (int, float),
            "height": int, "width": int, "seed": int, "steps": int}


# ---------------------------------------------------------------------------------------------
# The rows of a grid

def row_problem(k: int, row) -> str | None:
    """What is wrong with a --validation-file entry, or None."""
    if not isinstance(row, dict):
        return f"entry {k} is not an object"
    unknown = set(row) - set(ROW_KEYS)
    if unknown:
        return f"entry {k} has unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(ROW_KEYS)})"
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip() or text(row["prompt"]):
        return f"entry {k} needs \"prompt\", UTF-8 text"
    for key, kind in ROW_KEYS.items():
        if key in row and (not isinstance(row[key], kind) or isinstance(row[key], bool)):
            named = "number" if isinstance(kind, tuple) else kind.__name__
            return f"entry {k}: {key} must be a {named} (got {row[key]!r})"
    if not 0 <= row.get("seed", 0) < 2 ** 63:
        return f"entry {k}: seed must be in [0, 2^63) (got {row['seed']})"
    wrong = first_problem(row_params(SamplingParams(), row))
    return f"entry {k}: {wrong[0]} {wrong[1]}" if wrong else None


def check_validation_set(rows: tuple) -> str | None:
    return next((row_problem(k, r) for k, r in enumerate(rows) if row_problem(k, r)), None)


def validation_file(path) -> tuple[dict, ...]:
    """--validation-file FILE.json: a list of rows, stored in the run's settings (a resume needs no file)."""
    return json_rows(path, "--validation-file", "grid row", check_validation_set, objects=False)


def row_params(base: SamplingParams, row: dict) -> SamplingParams:
    """A file row's sampling settings: the run's validation settings with the row's own."""
    own = {k: row.get(k) for k in ("negative_prompt", "guidance", "guidance_rescale", "height", "width", "steps")}
    return replace(base, **{k: v for k, v in own.items() if v is not None})


def has_grid(cfg) -> bool:
    return bool(cfg.validation_prompts or cfg.validation_set)


def grid_rows(cfg) -> list[tuple[str, SamplingParams, int]]:
    """(prompt, sampling settings, seed) of each row of the run's grids: --validation-prompt, then the file's."""
    base = cfg.validation_sampling
    return [(p, base, cfg.seed) for p in cfg.validation_prompts] + \
        [(r["prompt"], row_params(base, r), r.get("seed", cfg.seed)) for r in cfg.validation_set]


@torch.no_grad()
@contextmanager
def evaluating(model: StableDiffusion):
    """Every network in eval mode for the block (no adapter dropout in a trained text encoder either), then each
    back in its own mode."""
    modes = {m: m.training for net in model.networks() for m in net.modules()}
    for net in model.networks():
        net.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def validation_grid(model: StableDiffusion, cfg, path: Path, write: bool = True):
    """One row per validation row, one column per fixed seed (written where `write`: under --fsdp every process
    samples, rank 0 writes), each row labelled with its prompt. Rows of other sizes are drawn on cells of the
    largest."""
    weight = next(model.denoiser.parameters())
    rows, wanted = [], grid_rows(cfg)
    with evaluating(model), torch.autocast(weight.device.type, dtype=weight.dtype,
                                           enabled=weight.dtype != torch.float32):
        for prompt, params, seed in wanted:
            try:
                rows.append(generate(model, [prompt] * cfg.validation_images, params, progress=False,
                                     generator=torch.Generator("cpu").manual_seed(seed)))
            except ValueError as e:  # its sampling overflowed (fp16, a large guidance): training goes on without it
                print(f"warning: the validation grid {path.name} was skipped: the row {prompt!r}: {e}",
                      file=sys.stderr)
                return
    if write:
        when = "after the last step" if path.stem == "final" else f"at step {int(path.stem.split('-')[-1])}"
        picture, layout = labelled_grid([(prompt, r) for (prompt, _, _), r in zip(wanted, rows)],
                                        f"validation images {when} (a row per prompt, a column per fixed seed)")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(picture, path, {"prompts": [r[0] for r in wanted], "layout": layout})


# ---------------------------------------------------------------------------------------------
# The validation loss

class HeldOutLoss:
    """The ε-loss (the training objective, eq. 2 of DreamBooth without the weighting) on fixed triples: each of the
    subject's photos and up to `classes` class images, centre-cropped and unmirrored, at `timesteps` fixed timesteps
    spread over the schedule, with fixed noise. The training loss is noisy (a random timestep per image); this one
    changes only with the weights, so a falling instance loss shows the fit and a rising prior loss the drift."""

    def __init__(self, pools: list[list], seed: int, loss, timesteps: int = 4, classes: int = 8, process=None):
        """`loss`: the training loss (step.dreambooth_loss), here on one part at a time (masked where masked);
        `process`: the forward process as the run trains it (None: the model's own)."""
        self.sets = {"instance": pools[0], "prior": pools[1][:classes]}
        self.seed, self.loss, self.k, self.fixed, self.process = seed, loss, timesteps, None, process

    def _fix(self, model: StableDiffusion):
        """The latents (the VAE's mean), timesteps and noise, drawn once from their own generator."""
        from minidream.training.photos import view
        g = torch.Generator().manual_seed(self.seed + 1)  # not the run's generator: training draws are untouched
        vae = model.vae
        p = next(vae.parameters())
        self.fixed = {}
        for name, pool in self.sets.items():
            rows = []
            for e in pool:
                x, ids, mask = view(e.image, e.bucket, True, False, None, e.mask)
                mean, _ = vae.encode(x[None].to(p.device, p.dtype))
                z = model.vae.latents(mean, torch.zeros_like(mean), torch.zeros_like(mean)).float()
                noise = torch.randn((self.k, *z.shape[1:]), generator=g)
                if mask is not None:
                    mask = F.avg_pool2d(mask[None], model.latent_scale).expand(self.k, -1, -1, -1)
                rows.append((z.expand(self.k, -1, -1, -1), noise, e.prompt, ids, mask))
            self.fixed[name] = rows

    @torch.no_grad()
    def __call__(self, model: StableDiffusion, autocast) -> dict[str, float]:
        """{"val_loss_instance": ..., "val_loss_prior": ...} (the prior only with class images)."""
        process = self.process or model.forward_process
        if self.fixed is None:
            self._fix(model)
        dev = next(model.denoiser.parameters()).device
        T = process.config.num_train_timesteps
        t = torch.tensor([int((i + 0.5) * T / self.k) for i in range(self.k)], device=dev)  # mid-points of k bands
        with evaluating(model):
            return self._losses(model, autocast, t, dev)

    def _losses(self, model: StableDiffusion, autocast, t: torch.Tensor, dev) -> dict[str, float]:
        process, out = self.process or model.forward_process, {}
        for name, rows in self.fixed.items():
            losses = []
            for z, noise, prompt, ids, mask in rows:
                z, noise = z.to(dev), noise.to(dev)
                sizes = image_conditioning(model, ids[None].expand(self.k, -1).to(dev))
                cond = {**encode_text(model, [prompt] * self.k), **sizes}
                noisy = process.add_noise(z, noise, t)
                with autocast():
                    pred = process.output(model.denoiser(noisy, t, **cond), noisy, t)
                loss, _, _ = self.loss(pred, process.target(z, noise, t), self.k, 0.0,
                                       mask=None if mask is None else mask.to(dev))
                losses.append(loss.item())
            if losses:
                out[f"val_loss_{name}"] = sum(losses) / len(losses)
        return out
