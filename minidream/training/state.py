"""The training state: everything a run changes as it trains, as one object with `state_dict` / `load_state_dict`
(the way torch's own optimizers and modules are saved), which is what a checkpoint holds and restores exactly.
"""
import math
from dataclasses import dataclass

import torch

from minidream.models.stable_diffusion import StableDiffusion
from minidream.training import TrainError
from minidream.training.optim import OPTIMIZERS, make_optimizer
from minidream.training.trainable import Trainable, print_summary, select_trainable


@dataclass
class TrainState:
    model: StableDiffusion
    trainable: Trainable  # what trains, by group
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler
    generator: torch.Generator  # every random draw of the loop: data, noise, timesteps (on the CPU: the same
    # numbers on any device, so a resumed run is bit-exact)
    param_shaped: tuple[str, ...] = ()  # the optimizer's state entries shaped like their parameter

    @classmethod
    def create(cls, cfg, model: StableDiffusion, device: torch.device) -> "TrainState":
        """Select what trains (the rest frozen), the optimizer over it, and the run's generator."""
        trainable = select_trainable(model, cfg.mode, cfg.lora_rank, cfg.lora_alpha, cfg.train_text_encoder,
                                     cfg.token, cfg.init_word)
        print_summary(trainable, model)
        opt, sched, scaler = make_optimizer(cfg, trainable, device)
        return cls(model, trainable, opt, sched, scaler, torch.Generator().manual_seed(cfg.seed),
                   OPTIMIZERS[cfg.optimizer].param_shaped)

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return {"params": {name: p.detach() for name, p in self.trainable.named()},
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng}

    def load_state_dict(self, sd: dict):
        """Put a checkpoint's weights, optimizer, schedule and RNG states back; a crafted or damaged one is a
        one-line TrainError, not a crash in torch (nor a run that fails mid-step)."""
        try:
            with torch.no_grad():
                for name, p in self.trainable.named():
                    if name not in sd["params"]:
                        raise TrainError(f"checkpoint has no tensor {name!r}; it was made with other --train settings")
                    p.copy_(sd["params"][name])
            built = [dict(pg) for pg in self.optimizer.param_groups]  # what each setting's type is
            self.optimizer.load_state_dict(sd["optimizer"])
            self._check_optimizer(built)
            self.lr_schedule.load_state_dict(sd["lr_schedule"])
            if self.scaler is not None and sd["scaler"]:
                self.scaler.load_state_dict(sd["scaler"])
            torch.set_rng_state(sd["rng"]["torch"])
            self.generator.set_state(sd["rng"]["data"])
            if "cuda" in sd["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(sd["rng"]["cuda"]))
        except TrainError:
            raise
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise TrainError(f"the checkpoint's optimizer, schedule or RNG state is not usable ({type(e).__name__}: "
                             f"{first}); resume from another checkpoint") from None

    def _check_optimizer(self, built: list[dict]):
        """torch takes any values here; a crafted file would fail mid-step instead. Every setting that is a number
        (or numbers: AdamW's betas) in the optimizer as built must be a number as loaded, not NaN, and the rates,
        betas, epsilon and weight decay finite and not negative (Adafactor's beta2 decay is negative, Prodigy's
        running sums may be, its growth rate is infinite by default)."""
        def numbers(v):
            return list(v) if isinstance(v, (tuple, list)) else [v]

        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)
        for pg, fresh in zip(self.optimizer.param_groups, built):
            keys = [k for k, v in fresh.items() if k != "params" and numbers(v) and all(map(number, numbers(v)))]
            nums = {k: numbers(pg.get(k)) for k in keys}
            if not all(number(x) and not math.isnan(x) for xs in nums.values() for x in xs):
                raise ValueError(f"optimizer hyperparameters {nums} are not numbers")
            if not all(0 <= x < math.inf for k in NOT_NEGATIVE if k in nums for x in nums[k]):
                raise ValueError(f"optimizer hyperparameters {nums} are negative or infinite")
            for p in pg["params"]:
                state = self.optimizer.state[p]
                if any(torch.is_tensor(state.get(k)) and state[k].shape != p.shape for k in self.param_shaped):
                    raise ValueError("optimizer moments do not match the parameters' shapes")


NOT_NEGATIVE = ("lr", "initial_lr", "betas", "eps", "weight_decay", "d", "d0", "d_coef")
