"""What a weight change in an adapter file is, per module: the plain LoRA pair and LyCORIS' LoHa and LoKr, each a
`Delta` that says whether it fits a weight, bounds its entries (before anything is formed: a crafted file could
ask for terabytes) and forms ΔW. Applied as the programs these files are made for apply them (A1111's and
ComfyUI's LyCORIS support), at strength s: W' = W + s·ΔW.

- LoRA (Hu et al. 2021): ΔW = (α/r)·B A (a convolution's down (r, in, kh, kw) and 1×1 up (out, r)).
- LoHa (Hyeon-Woo et al. 2022, FedPara): ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b), the Hadamard product of two low-rank
  matrices (rank up to r², at the parameters of rank 2r); r = hada_w1_b's rows. With Tucker factors (hada_t1,
  hada_t2, a convolution's kernel core) each side is t ×₁ W_a ×₂ W_b. The LyCORIS package's own `merge_to` (4.1.3)
  scales LoHa by (α/r)², not α/r: the files are made for A1111 and ComfyUI, which scale by α/r, so we do.
- LoKr (Yeh et al. 2023): ΔW = γ·W1 ⊗ W2, a Kronecker product (W1, W2 given whole or as a·b factors; W2 as a Tucker
  core for a convolution); γ = α/r when a factor is low-rank (r: lokr_w2_b's rows, else lokr_w1_b's), else 1.
- DoRA (Liu et al. 2024) on any of these: W' = m ⊙ (W + ΔW) / ||W + ΔW||, the norm per output row where m has one
  entry per output (PEFT's lora_magnitude_vector, LyCORIS' dora_scale with wd_on_out), per input column where it has
  one per input (LyCORIS' older default, the one A1111 reads); at strength s, W + s·(W' − W), as ComfyUI applies it
  (a diffusers-layout file: ΔW scaled by s inside the norm, as diffusers' adapter weights scale it).
  (ComfyUI's output-axis branch divides by the norm of the base W instead of W + ΔW; we follow the definition, which
  is what LyCORIS and PEFT, the writers, train and merge.)
"""
import re
from dataclasses import dataclass

import torch

from minidream.models.lora import row_norm

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
         "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# kohya's key prefixes -> our components: lora_unet_ is the denoiser whatever the family calls it (SD3's MMDiT too),
# lora_te_ / lora_te1_ the first CLIP, lora_te2_ the second, lora_te3_ SD3's T5 (which kohya's SD3 network may train)
KOHYA_COMPONENTS = {"unet": "denoiser", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
                    "te3": "text_encoder_3"}
KEY = re.compile(rf"lora_({'|'.join(KOHYA_COMPONENTS)})_(.+)\.({'|'.join(PARTS)})")


def kohya_module(prefix: str, name: str) -> tuple[str, str]:
    """(component, module name) of a kohya key's prefix and name (a CLIP's without `text_model_`)."""
    comp = KOHYA_COMPONENTS[prefix]
    return comp, name if comp == "denoiser" else name.removeprefix("text_model_")


def peak(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def row_sum(x: torch.Tensor) -> float:
    """The largest sum of |entries| over x's rows: a bound on |(x @ y)_ij| / max|y|."""
    return float(x.abs().flatten(1).sum(1).max()) if x.numel() else 0.0


class Delta:
    """What every kind of weight change shares: its change at strength s is s·ΔW (DoRA's differs: Decomposed)."""

    def at(self, w: torch.Tensor, s: float) -> torch.Tensor:
        return s * self.delta(w)


@dataclass
class LowRank(Delta):
    """ΔW = scale·up·down: up (out, r), down (r, in·kh·kw)."""
    up: torch.Tensor
    down: torch.Tensor
    scale: float

    def fits(self, w: torch.Tensor) -> bool:
        return w.shape[0] == self.up.shape[0] and w[0].numel() == self.down.shape[1]

    def describe(self) -> str:
        return f"LoRA {[self.up.shape[0], self.down.shape[1]]}"

    def bound(self) -> float:
        return abs(self.scale) * row_sum(self.up) * peak(self.down)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        return ((self.up @ self.down) * self.scale).reshape(w.shape)


def product_bound(a: torch.Tensor, b: torch.Tensor) -> float:
    """A bound on |(a @ b)_ij|: the inner size times the largest entries."""
    return a.shape[-1] * peak(a) * peak(b)


def tucker_bound(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return t.shape[0] * t.shape[1] * peak(t) * peak(a) * peak(b)


def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored kernel: core t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, a, b)


@dataclass
class Hadamard(Delta):
    """LoHa: ΔW = scale·(W1a W1b) ⊙ (W2a W2b), or with Tucker cores (t1, t2) each side t ×₁ a ×₂ b."""
    parts: dict
    scale: float

    def describe(self) -> str:
        return "LoHa " + " x ".join(f"{list(a.shape)}·{list(b.shape)}" for _, a, b in self.sides())

    def sides(self) -> list[tuple]:
        p = self.parts
        return [(p.get(f"hada_t{i}"), p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]) for i in (1, 2)]

    def fits(self, w: torch.Tensor) -> bool:
        for t, a, b in self.sides():
            if t is None and not (a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0] and a.shape[0] == w.shape[0]
                                  and b.shape[1] == w[0].numel()):
                return False
            if t is not None and not (w.ndim == 4 and t.ndim == 4 and a.ndim == b.ndim == 2 and
                                      a.shape == (t.shape[0], w.shape[0]) and b.shape == (t.shape[1], w.shape[1])
                                      and t.shape[2:] == w.shape[2:]):
                return False
        return True

    def bound(self) -> float:
        out = abs(self.scale)
        for t, a, b in self.sides():
            out *= product_bound(a, b) if t is None else tucker_bound(t, a, b)
        return out

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        one, two = ((tucker(t, a, b) if t is not None else (a @ b).reshape(w.shape)) for t, a, b in self.sides())
        return one * two * self.scale


@dataclass
class Kronecker(Delta):
    """LoKr: ΔW = scale·W1 ⊗ W2 (W1 (a, c); W2 (b, d) or (b, d, kh, kw), or (b, d·kh·kw) for a convolution)."""
    parts: dict
    scale: float

    def factor(self, i: int):
        p = self.parts
        if f"lokr_w{i}" in p:
            return p[f"lokr_w{i}"]
        if i == 2 and "lokr_t2" in p:
            return tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        return p[f"lokr_w{i}_a"] @ p[f"lokr_w{i}_b"]

    def describe(self) -> str:
        shapes = self.shapes()
        return f"LoKr {' ⊗ '.join(str(list(x)) for x in shapes)}" if shapes else "LoKr factors that do not chain"

    def shapes(self) -> tuple[tuple, tuple] | None:
        """The shapes of W1 and W2 as formed, from the factors' shapes alone (None: the factors do not chain)."""
        p, got = self.parts, []
        for i in (1, 2):
            if f"lokr_w{i}" in p:
                got.append(tuple(p[f"lokr_w{i}"].shape))
                continue
            a, b = p.get(f"lokr_w{i}_a"), p.get(f"lokr_w{i}_b")
            if a is None or b is None or a.ndim != 2 or b.ndim != 2:
                return None
            t = p.get("lokr_t2") if i == 2 else None
            if t is not None:
                if t.ndim != 4 or t.shape[:2] != (a.shape[0], b.shape[0]):
                    return None
                got.append((a.shape[1], b.shape[1], *t.shape[2:]))
            elif a.shape[1] != b.shape[0]:
                return None
            else:
                got.append((a.shape[0], b.shape[1]))
        return tuple(got)

    def fits(self, w: torch.Tensor) -> bool:
        shapes = self.shapes()
        if shapes is None or len(shapes[0]) != 2 or len(shapes[1]) not in (2, 4):
            return False
        (a, c), two = shapes
        if len(two) == 4:
            return w.ndim == 4 and (a * two[0], c * two[1], *two[2:]) == tuple(w.shape)
        return a * two[0] == w.shape[0] and c * two[1] == w[0].numel()

    def bound(self) -> float:
        def most(i):
            p = self.parts
            if f"lokr_w{i}" in p:
                return peak(p[f"lokr_w{i}"])
            if i == 2 and "lokr_t2" in p:
                return tucker_bound(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            return product_bound(p[f"lokr_w{i}_a"], p[f"lokr_w{i}_b"])
        return abs(self.scale) * most(1) * most(2)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        one, two = self.factor(1), self.factor(2)
        if two.ndim == 4:
            one = one[:, :, None, None]
        return (torch.kron(one, two.contiguous()) * self.scale).reshape(w.shape)


@dataclass
class Decomposed(Delta):
    """DoRA around another Delta: the magnitude m. PEFT's (diffusers' layout, `peft`) is always per output: (out,),
    or (1, out, 1, 1) for a convolution; LyCORIS' dora_scale is per output when its first size is the weight's
    (out, 1, ...), else per input (1, in, ...): ComfyUI's rule."""
    inner: object
    magnitude: torch.Tensor
    peft: bool = False

    def describe(self) -> str:
        return f"DoRA magnitude {list(self.magnitude.shape)} on {self.inner.describe()}"

    def output_axis(self, w: torch.Tensor) -> bool:
        return self.peft or self.magnitude.shape[0] == w.shape[0]

    def fits(self, w: torch.Tensor) -> bool:
        m, size = self.magnitude, w.shape[0] if self.output_axis(w) else (w.shape[1] if w.ndim > 1 else -1)
        return self.inner.fits(w) and m.numel() == size and (self.peft or m.dim() == w.dim())

    def bound(self) -> float:
        return peak(self.magnitude) + self.inner.bound()  # |W'| <= max|m|, |W| is the model's own

    def delta(self, w: torch.Tensor, k: float = 1.0) -> torch.Tensor:
        """W' − W, with the inner ΔW at `k` times its scale (in float64: a large strength cannot overflow the norm)."""
        w = w.double()
        merged = w + k * self.inner.delta(w).double()
        if self.output_axis(w):
            norm = row_norm(merged).view(-1, *[1] * (w.dim() - 1))
        else:
            norm = row_norm(merged.transpose(0, 1)).view(1, -1, *[1] * (w.dim() - 2))
        return (merged * (self.magnitude.double().reshape(norm.shape) / norm) - w).float()

    def at(self, w: torch.Tensor, s: float) -> torch.Tensor:
        """The change at strength s: PEFT's files (diffusers' layout) scale ΔW inside the norm, as diffusers'
        adapter weights do; LyCORIS' scale the whole change, s·(W' − W), as ComfyUI applies them."""
        return self.delta(w, s) if self.peft else s * self.delta(w)


def lycoris_modules(sd: dict) -> tuple[dict, set]:
    """{(component, module): {part: tensor}} of the LoHa/LoKr modules in a kohya-named file, and the keys used."""
    modules, used = {}, set()
    for k, v in sd.items():
        m = KEY.fullmatch(k)
        if not m:
            continue
        modules.setdefault(kohya_module(m[1], m[2]), {})[m[3]] = v.float()
        used.add(k)
    return modules, used


def lycoris_delta(parts: dict, alpha: float | None) -> Hadamard | Kronecker | str:
    """The module's Delta, or what is missing from it (a one-line error's end)."""
    if any(k.startswith("hada_") for k in parts):
        if any(k.startswith("lokr_") for k in parts):
            return "mixes LoHa (hada_*) and LoKr (lokr_*) factors"
        missing = [k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in parts]
        if missing or ("hada_t1" in parts) != ("hada_t2" in parts):
            return f"is an incomplete LoHa module (missing {', '.join(missing) or 'one of hada_t1/hada_t2'})"
        r = parts["hada_w1_b"].shape[0] if parts["hada_w1_b"].ndim == 2 else 0
        if r < 1:
            return f"has hada_w1_b of shape {list(parts['hada_w1_b'].shape)}, not (rank, in)"
        return Hadamard(parts, (alpha if alpha is not None else r) / r)
    for i in (1, 2):
        whole, split = f"lokr_w{i}" in parts, f"lokr_w{i}_a" in parts and f"lokr_w{i}_b" in parts
        if whole == split:
            return f"is an incomplete LoKr module (give lokr_w{i}, or lokr_w{i}_a and lokr_w{i}_b)"
    low = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))  # A1111: the last factored side's rank
    r = low.shape[0] if low is not None and low.ndim == 2 else None
    if low is not None and not r:
        return f"has a lokr factor of shape {list(low.shape)}, not (rank, n)"
    return Kronecker(parts, alpha / r if alpha is not None and r else 1.0)
