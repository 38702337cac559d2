"""The training state: everything a run changes as it trains, as one object with `state_dict` / `load_state_dict`
(the way torch's own optimizers and modules are saved), which is what a checkpoint holds and restores exactly.
"""
import math
from dataclasses import dataclass

import torch

from minidream.models.stable_diffusion import StableDiffusion
from minidream.training import TrainError
from minidream.training.ema import EMA
from minidream.training.fsdp import gathered, is_sharded, scattered, shard
from minidream.training.optim import OPTIMIZERS, Optimizer, make_optimizer
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
    row: Optimizer = OPTIMIZERS["adamw"]  # the optimizer's row: its state entries shaped like their parameter...
    ema: EMA | None = None  # the moving average of what trains (--ema-decay)

    @classmethod
    def create(cls, cfg, model: StableDiffusion, device: torch.device, processes: int = 1) -> "TrainState":
        """Select what trains (the rest frozen), shard it across the processes (--fsdp), the optimizer over it, and
        the run's generator."""
        def select():
            return select_trainable(model, cfg.mode, cfg.adapters, cfg.train_text_encoder,
                                    cfg.token, cfg.init_word, cfg.token_vectors, cfg.train_token_t5)
        trainable = select()
        print_summary(trainable, model)
        if cfg.fsdp:  # sharding replaces the parameters: what trains is found again, by name
            shard(model, bool(trainable.text_encoder), device, processes)
            trainable = Trainable(*(found(model, group) for group in trainable.groups().values()))
        opt, sched, scaler = make_optimizer(cfg, trainable, device)
        ema = EMA(trainable.named(), cfg.ema_decay, cfg.ema_every, cfg.ema_device) if cfg.ema_decay else None
        return cls(model, trainable, opt, sched, scaler, torch.Generator().manual_seed(cfg.seed),
                   OPTIMIZERS[cfg.optimizer], ema)

    def trained(self, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """The trained tensors, whole (under --fsdp every process must call this: they are gathered; only where
        `keep` are they kept)."""
        full = {name: gathered(p.detach(), keep) for name, p in self.trainable.named()}
        return full if keep else None

    def state_dict(self, keep: bool = True) -> dict | None:
        """Under --fsdp every process must call this (the shards are gathered, in the same order everywhere); only
        where `keep` is it built."""
        params = self.trained(keep)
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: gathered(v, keep) if torch.is_tensor(v) else v for k, v in st.items()}
                              for i, st in optimizer["state"].items()}
        if not keep:
            return None
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return {"params": params, "optimizer": optimizer, "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, sd: dict):
        """Put a checkpoint's weights, optimizer, schedule and RNG states back; a crafted or damaged one is a
        one-line TrainError, not a crash in torch (nor a run that fails mid-step)."""
        try:
            with torch.no_grad():
                for name, p in self.trainable.named():
                    if name not in sd["params"]:
                        raise TrainError(f"checkpoint has no tensor {name!r}; it was made with other --train settings")
                    p.copy_(scattered(sd["params"][name], p) if is_sharded(p) else sd["params"][name])
            built = [dict(pg) for pg in self.optimizer.param_groups]  # what each setting's type is
            self.optimizer.load_state_dict(self._sharded(sd["optimizer"]))
            self._check_optimizer(built)
            base_lrs = list(self.lr_schedule.base_lrs)
            self.lr_schedule.load_state_dict(sd["lr_schedule"])
            self._check_schedule(base_lrs)
            if self.scaler is not None and sd["scaler"]:
                self.scaler.load_state_dict(sd["scaler"])
            if self.ema is not None:
                if not sd.get("ema"):
                    raise TrainError("the checkpoint holds no moving average (--ema-decay); resume from one that does")
                self.ema.load_state_dict(sd["ema"])
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

    def _sharded(self, optimizer: dict) -> dict:
        """A checkpoint's optimizer state with the tensors shaped like a sharded parameter as its shard (--fsdp)."""
        params = [p for pg in self.optimizer.param_groups for p in pg["params"]]
        state = {}
        for i, st in optimizer["state"].items():
            p = params[int(i)] if 0 <= int(i) < len(params) else None
            state[i] = {k: scattered(v, p) if is_sharded(p) and torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in st.items()}
        return {**optimizer, "state": state}

    def _check_optimizer(self, built: list[dict]):
        """torch takes any values here; a crafted file would fail mid-step instead (or train on nonsense). A group's
        settings are the run's, so they must equal the optimizer's as built; what the optimizer changes as it trains
        (the row's `evolving`: the learning rate, Prodigy's step-size estimate) must be finite numbers in range; its
        moments must have their parameters' shapes."""
        for pg, fresh in zip(self.optimizer.param_groups, built):
            for k, v in fresh.items():
                if k == "params" or k in self.row.evolving:
                    continue
                if plain(pg.get(k)) != plain(v):
                    raise ValueError(f"optimizer setting {k} is {pg.get(k)!r}, not the run's {v!r}")
            for k in self.row.evolving:
                x = pg.get(k, fresh.get(k))
                if not (number(x) and 0 <= x < math.inf or k == "d_numerator" and number(x) and math.isfinite(x)):
                    raise ValueError(f"optimizer value {k} is {x!r}, not a finite non-negative number")
            if "k" in self.row.evolving and not (isinstance(pg.get("k"), int) and not isinstance(pg["k"], bool)):
                raise ValueError(f"optimizer step count k is {pg.get('k')!r}")
            for p in pg["params"]:
                state = self.optimizer.state[p]
                if any(torch.is_tensor(state.get(k)) and state[k].shape != p.shape for k in self.row.param_shaped):
                    raise ValueError("optimizer moments do not match the parameters' shapes")

    def _check_schedule(self, base_lrs: list[float]):
        """The schedule's base rates are the run's; each group's current rate is what the schedule gives at its
        step (so a crafted rate cannot stand in for one step: LambdaLR's own expression, bit for bit)."""
        sched = self.lr_schedule
        if plain(list(sched.base_lrs)) != plain(base_lrs):
            raise ValueError(f"LR schedule base rates {sched.base_lrs} are not the run's {base_lrs}")
        if not (isinstance(sched.last_epoch, int) and sched.last_epoch >= 0):
            raise ValueError(f"LR schedule step {sched.last_epoch!r} is not a step count")
        for pg, base, curve in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            pg["lr"] = base * curve(sched.last_epoch)


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def plain(v):
    """A setting as JSON has it (tuples as lists), to compare a checkpoint's with the run's."""
    return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def found(model: StableDiffusion, named: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters of these names in the model as it is now (after sharding replaced them)."""
    nets = [(model.family.denoiser, model.denoiser), *[(name, te) for name, _, te in model.text_encoders()]]
    if any(name.startswith("text_encoder_3.") for name, _ in named):  # a token's T5 row (--train-token-t5)
        nets.append(("text_encoder_3", model.text_encoder_3))
    now = {f"{prefix}.{n}": p for prefix, net in nets for n, p in net.named_parameters()}
    return [(name, now[name]) for name, _ in named]
