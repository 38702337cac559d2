"""What one training step is fed: the latents of random picks from the instance and class examples
(`LatentSource`: encoded once and cached, or encoded every step) with their prompts, and the prompts' conditioning
(`TextConditioning`: recomputed while the text encoder or a new token trains). Every random draw comes from the
run's one CPU generator, in a fixed order, so a resumed run is exact.
"""
import math
import random

import torch
import torch.nn.functional as F

from minidream.models.stable_diffusion import StableDiffusion, encode_text, image_conditioning
from minidream.training.distributed import ProcessGroup
from minidream.training.photos import view
from minidream.training.trainable import Trainable


def weighted(pool: list, idx) -> list[int]:
    """The examples `idx` of `pool`, each listed as often as its repeats, over their common divisor: a uniform draw
    from the list draws each in proportion to its repeats (equal repeats: the list is `idx`, the draws of a run
    without repeats)."""
    idx = list(idx)
    common = math.gcd(*(pool[i].repeats for i in idx)) if idx else 1
    return [i for i in idx for _ in range(pool[i].repeats // common)]


def varied(prompts: list[str], cfg, g: torch.Generator) -> list[str]:
    """The instance rows' prompts as the run varies them: --shuffle-tags (kohya's shuffle_caption: the
    comma-separated tags after the first --keep-tokens in a random order), then --caption-dropout (an empty
    prompt). Drawn from the run's generator, only when asked for: a run without them draws what it always drew."""
    if cfg.shuffle_tags:
        shuffled = []
        for p in prompts:
            tags = [t.strip() for t in p.split(",") if t.strip()]
            keep, rest = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
            shuffled.append(", ".join(keep + [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]))
        prompts = shuffled
    if cfg.caption_dropout:
        dropped = (torch.rand(len(prompts), generator=g) < cfg.caption_dropout).tolist()
        prompts = ["" if d else p for p, d in zip(prompts, dropped)]
    return prompts


class LatentSource:
    """Latents of random picks from the instance examples (pool 0) and the class examples (pool 1), with their
    prompts (and for SDXL each view's size ids: the real photo size and crop). With --cache-latents the VAE runs
    once per image (and per mirrored view) and only q(z|x)'s mean and log-variance are kept: each step still draws a
    fresh z, as encoding anew would. With several buckets a step first picks one (in proportion to its instance
    images); each class row is of its instance row's concept."""

    def __init__(self, model: StableDiffusion, cfg, pools: list[list], device, g: torch.Generator,
                 group: ProcessGroup = ProcessGroup(), class_prompts: list[str] | None = None):
        """`class_prompts` (each concept's), when the prior's target is the model's own (--prior-source model): a
        class row is then its instance row's latents with its concept's class prompt."""
        self.model, self.cfg, self.pools, self.device, self.g, self.group = model, cfg, pools, device, g, group
        self.class_prompts = class_prompts
        self.vae_dtype = next(model.vae.parameters()).dtype
        self.buckets = sorted({e.bucket for e in pools[0]})
        self.masked = any(e.mask is not None for e in pools[0])  # --mask-dir, --alpha-mask: the instance loss's
        self.cache = None
        if cfg.cache_latents:
            views = (False, True) if cfg.flip > 0 else (False,)
            self.cache, self.cache_ids, self.cache_masks = [], [], []
            with torch.no_grad():
                for pool in pools:
                    x = [[view(e.image, e.bucket, True, f, None, e.mask) for f in views] for e in pool]
                    self.cache.append([model.vae.encode(torch.stack([v[0] for v in ex]).to(device, self.vae_dtype))
                                       for ex in x])
                    self.cache_ids.append([torch.stack([v[1] for v in ex]) for ex in x])
                    self.cache_masks.append([[v[2] for v in ex] for ex in x])

    def draw_step(self, n_inst: int, n_class: int) -> tuple[torch.Tensor, list[str], dict, torch.Tensor | None]:
        """(n_inst + n_class, 4, h, w) fp32 latents, their prompts, the denoiser's other per-row conditioning
        (SDXL: time_ids (B, 6), each view's size ids), and with masked loss the (B, 1, h, w) weight of each latent
        cell (the class rows': 1): this process's rows of a global draw."""
        g = self.g
        bucket = self.buckets[0]
        if len(self.buckets) > 1:
            every = weighted(self.pools[0], range(len(self.pools[0])))
            bucket = self.pools[0][every[int(torch.randint(0, len(every), (1,), generator=g))]].bucket
        inst = weighted(self.pools[0], [i for i, e in enumerate(self.pools[0]) if e.bucket == bucket])
        picked = [inst[i] for i in torch.randint(0, len(inst), (n_inst * self.group.size,), generator=g).tolist()]
        latents, inst_ids, masks = self._latents(0, picked, n_inst)
        rows, ids = [latents], [inst_ids]
        prompts = varied([self.pools[0][i].prompt for i in picked], self.cfg, g)[self.group.rows(n_inst)]
        if n_class and self.class_prompts is not None:  # each instance row again, under its class prompt
            mine = picked[self.group.rows(n_inst)]
            prompts += [self.class_prompts[self.pools[0][i].concept] for i in mine]
            rows.append(latents)
            ids.append(inst_ids)
            masks = None if masks is None else torch.cat([masks, torch.ones_like(masks)])
        elif n_class:  # each instance row's partner: a class image of its concept, in its bucket
            concept = [self.pools[0][i].concept for i in picked][: n_class * self.group.size]
            choice = {}
            for c in sorted(set(concept)):
                own = weighted(self.pools[1], [i for i, e in enumerate(self.pools[1])
                                               if e.concept == c and e.bucket == bucket])
                choice[c] = [own[i] for i in torch.randint(0, len(own), (len(concept),), generator=g).tolist()]
            klass = [choice[c][r] for r, c in enumerate(concept)]
            latents, class_ids, _ = self._latents(1, klass, n_class)
            rows.append(latents)
            ids.append(class_ids)
            prompts += [self.pools[1][i].prompt for i in klass][self.group.rows(n_class)]
            if masks is not None:  # the prior loss is over the whole image
                masks = torch.cat([masks, torch.ones(len(latents), *masks.shape[1:], device=masks.device)])
        return torch.cat(rows), prompts, image_conditioning(self.model, torch.cat(ids).to(self.device)), masks

    def _latents(self, pool: int, idx: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(n, 4, h, w) latents scaled for the UNet of this process's n of the globally drawn examples `idx`,
        their size ids (n, 6), and with masked loss their masks on the latent grid (n, 1, h, w)."""
        cfg, g, rows = self.cfg, self.g, self.group.rows(n)
        N = len(idx)
        flips = (torch.rand(N, generator=g) < cfg.flip).tolist()
        if self.cache is not None:
            which = [int(f) if cfg.flip > 0 else 0 for f in flips][rows]
            mean = torch.stack([self.cache[pool][i][0][v] for i, v in zip(idx[rows], which)])
            logvar = torch.stack([self.cache[pool][i][1][v] for i, v in zip(idx[rows], which)])
            ids = torch.stack([self.cache_ids[pool][i][v] for i, v in zip(idx[rows], which)])
            masks = [self.cache_masks[pool][i][v] for i, v in zip(idx[rows], which)]
        else:  # the crops are drawn for every example in order (cheap), then each process keeps its own
            py = random.Random(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            ex = self.pools[pool]
            views = [view(ex[i].image, ex[i].bucket, cfg.center_crop, f, py, ex[i].mask)
                     for i, f in zip(idx, flips)][rows]
            ids = torch.stack([v[1] for v in views])
            masks = [v[2] for v in views]
            with torch.no_grad():
                mean, logvar = self.model.vae.encode(torch.stack([v[0] for v in views]).to(self.device, self.vae_dtype))
        eps = torch.randn((N, *mean.shape[1:]), generator=g)[rows].to(self.device, mean.dtype)
        grid = None
        if pool == 0 and self.masked:  # each latent cell weighs the share of its pixels that show the subject
            grid = F.avg_pool2d(torch.stack(masks), self.model.latent_scale).to(self.device)
        return self.model.vae.latents(mean, logvar, eps).float(), ids, grid


class RowMemo(torch.nn.Module):
    """A frozen encoder made to encode each distinct input row (a prompt's token ids) once: SD3's T5 (never
    trained) then runs once per prompt while the CLIPs or a new token train and run every step. A row is encoded
    alone, so its states never depend on which rows shared its batch (a resumed run stays exact)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.rows = encoder, {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keys = [tuple(row.tolist()) for row in ids]
        with torch.no_grad():
            for key in dict.fromkeys(k for k in keys if k not in self.rows):
                self.rows[key] = self.encoder(torch.tensor([key], device=ids.device))[0]
        return torch.stack([self.rows[k] for k in keys])


class TextConditioning:
    """The denoiser's conditioning for each row's prompt. Recomputed each step while the text encoder (or a new
    token) trains, else computed once per prompt (SD3's T5, always frozen, once per prompt either way: RowMemo;
    unless it learns the token's row, --train-token-t5).
    The run's own prompts (each concept's instance and class prompt) are always encoded together, in that order,
    captions after them. --text-encoder-steps N (kohya's --stop_text_encoder_training) freezes the text encoder
    from step N on."""

    def __init__(self, model: StableDiffusion, cfg, trainable: Trainable, prompts: list[str],
                 every: list[str] = ()):
        """`prompts`: the run's own; `every`: every prompt a step may draw (captions too)."""
        self.model, self.cfg, self.base, self.every = model, cfg, list(dict.fromkeys(prompts)), list(every)
        self.te_params = [p for _, p in trainable.text_encoder]
        self.token_trains = bool(trainable.token)
        self.t5_learns = trainable.t5_row
        self.fixed = {}
        # --shuffle-tags: a step's prompts are new orders of the tags, encoded then and not kept (kept, they would
        # fill the memory and depend on which prompts came first)
        self.shuffled = getattr(cfg, "shuffle_tags", False)
        if not self.frozen and model.text_encoder_3 is not None and not isinstance(model.text_encoder_3, RowMemo) \
                and not self.t5_learns and not self.shuffled:
            model.text_encoder_3 = RowMemo(model.text_encoder_3)

    @property
    def frozen(self) -> bool:
        """Neither the text encoder nor a new token trains: each prompt's conditioning is computed once."""
        return not (self.token_trains or (self.te_params and self.te_params[0].requires_grad))

    def encode_t5(self):
        """Every prompt the run will draw, through T5 now (RowMemo): the step then no longer needs T5."""
        memo, L = self.model.text_encoder_3, self.model.max_sequence_length
        if isinstance(memo, RowMemo):
            prompts = list(dict.fromkeys(self.base + self.every))
            memo(self.model.tokenizer_3(prompts, L).to(next(memo.parameters()).device))

    def unwrap(self):
        """The model's own T5 back in its place (the RowMemo's states go with it)."""
        if isinstance(self.model.text_encoder_3, RowMemo):
            self.model.text_encoder_3 = self.model.text_encoder_3.encoder

    def encode_all(self):
        """Every prompt the run will draw, encoded now (frozen): the text encoders are then no longer needed. (Under
        --fsdp a trained encoder is sharded: every process must encode the same prompts together.)"""
        self(0, self.every)

    def __call__(self, step: int, prompts: list[str]) -> dict[str, torch.Tensor]:
        te = self.te_params
        if te and te[0].requires_grad and self.cfg.text_encoder_steps and step >= self.cfg.text_encoder_steps:
            for p in te:
                p.requires_grad_(False)
            self.fixed = {}
            self.encode_all()
        wanted = self.base + [p for p in dict.fromkeys(prompts) if p not in self.base]
        if self.token_trains or (te and te[0].requires_grad):
            cond = encode_text(self.model, wanted)
        else:  # frozen: each prompt encoded once (the first time with the run's own prompts, as one batch)
            missing = [p for p in (self.base if self.shuffled else wanted) if p not in self.fixed]
            if missing:
                with torch.no_grad():
                    got = encode_text(self.model, missing)
                self.fixed.update({p: {key: v[k:k + 1] for key, v in got.items()} for k, p in enumerate(missing)})
            rows = {p: self.fixed.get(p) or self.alone(p) for p in wanted}
            cond = {key: torch.cat([rows[p][key] for p in wanted]) for key in rows[wanted[0]]}
        at = {p: k for k, p in enumerate(wanted)}
        return {key: v[[at[p] for p in prompts]] for key, v in cond.items()}

    @torch.no_grad()
    def alone(self, prompt: str) -> dict[str, torch.Tensor]:
        """A shuffled prompt's conditioning, encoded by itself (the same whatever else the step drew)."""
        return encode_text(self.model, [prompt])
