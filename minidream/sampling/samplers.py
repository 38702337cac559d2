"""Every sampler `--scheduler` offers, in one table: a row carries the implementation and its options, the diffusers
class it reproduces, that class's constructor defaults (what a key missing from scheduler_config.json becomes, as
`<Class>.from_config(config)` reads it) and the scheduler options it does not implement. The CLI's choices, the
model's default sampler and both parity tests (step by step and end to end) follow from the rows.
"""
from dataclasses import dataclass, replace

from minidream.models.flow_matching import FlowConfig
from minidream.models.noise_schedule import SchedulerConfig
from minidream.sampling.flow_samplers import FlowDPMSolverPP, FlowEuler, FlowHeun, FlowUniPC
from minidream.sampling.timestep_samplers import DDIM, DDPM, PNDM, Sampler
from minidream.sampling.sigma_samplers import DPMSolverPP, Euler, EulerAncestral, Heun, UniPC


@dataclass(frozen=True)
class SamplerRow:
    cls: type  # the implementation, timestep_samplers.py or sigma_samplers.py
    options: dict  # its constructor options
    reference: str  # the diffusers scheduler class it reproduces
    defaults: dict  # that class's constructor defaults for the SchedulerConfig fields
    refuses: dict  # scheduler_config.json options it does not implement: key -> the values it does implement


# diffusers' constructor defaults for the fields we read
_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
             prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False)
_LINSPACE = {**_BASE, "timestep_spacing": "linspace"}
# options of scheduler_config.json that change what a sampler computes and that ours do not implement
_ANY = {"use_exponential_sigmas": (False,), "use_beta_sigmas": (False,)}  # σ schedules other than Karras'
_THRESHOLD = {"thresholding": (False,)}  # dynamic thresholding (Imagen), read by the ε/x̂_0 samplers
_FINAL_ZERO = {"final_sigmas_type": ("zero",)}  # the last step to σ = 0
_MULTISTEP = {**_ANY, **_THRESHOLD, **_FINAL_ZERO}  # DPM-Solver++, UniPC
_NO_ZERO_SNR = {"rescale_betas_zero_snr": (False,)}  # diffusers' PNDM and Heun ignore it (ᾱ_T would not be 0)

SAMPLERS = {
    "ddim": SamplerRow(DDIM, {}, "DDIMScheduler",
                       {**_BASE, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
                        "clip_sample_range": 1.0}, {**_ANY, **_THRESHOLD}),
    "ddpm": SamplerRow(DDPM, {}, "DDPMScheduler",
                       {**_BASE, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0},
                       {**_ANY, **_THRESHOLD, "variance_type": ("fixed_small", None)}),
    "pndm": SamplerRow(PNDM, {}, "PNDMScheduler", {**_BASE, "timestep_spacing": "leading", "set_alpha_to_one": False},
                       {**_ANY, **_NO_ZERO_SNR}),
    "euler": SamplerRow(Euler, {}, "EulerDiscreteScheduler", _LINSPACE,
                        {**_ANY, **_FINAL_ZERO, "timestep_type": ("discrete",), "interpolation_type": ("linear",)}),
    "euler-a": SamplerRow(EulerAncestral, {}, "EulerAncestralDiscreteScheduler", _LINSPACE, _ANY),
    "heun": SamplerRow(Heun, {}, "HeunDiscreteScheduler",
                       {**_LINSPACE, "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                        "clip_sample_range": 1.0}, {**_ANY, **_NO_ZERO_SNR}),
    "dpmpp-2m": SamplerRow(DPMSolverPP, {}, "DPMSolverMultistepScheduler", _LINSPACE, _MULTISTEP),
    "dpmpp-2m-karras": SamplerRow(DPMSolverPP, {"karras": True}, "DPMSolverMultistepScheduler", _LINSPACE,
                                  _MULTISTEP),
    "dpmpp-2m-sde-karras": SamplerRow(DPMSolverPP, {"karras": True, "sde": True}, "DPMSolverMultistepScheduler",
                                      _LINSPACE, _MULTISTEP),
    "unipc": SamplerRow(UniPC, {}, "UniPCMultistepScheduler", _LINSPACE, _MULTISTEP),
}

# the samplers of a rectified-flow model (SD3), under the names users know them by; FlowMatchEulerDiscreteScheduler's
# options other than the constant shift change the σ schedule or the step, and are refused
_FLOW_ONLY = {"invert_sigmas": (False,), "shift_terminal": (None,),
              "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
              "stochastic_sampling": (False,)}
# The multistep solvers are the reference as diffusers documents them for flow models (Wan, SANA) and as the SD3
# pipeline runs them: `<Class>.from_config(pipe.scheduler.config, use_flow_sigmas=True,
# prediction_type="flow_prediction", flow_shift=<the model's shift>)`, then set_timesteps(steps); a model that ships
# one of them has its shift read from flow_shift (FlowConfig.from_dict). The options below that change their σ or
# their update are refused.
_FLOW_MULTISTEP = {**_MULTISTEP, "use_dynamic_shifting": (False,), "use_karras_sigmas": (False,),
                   "solver_order": (2,), "use_flow_sigmas": (True,),
                   "prediction_type": ("flow_prediction",)}
FLOW_SAMPLERS = {
    "euler": SamplerRow(FlowEuler, {}, "FlowMatchEulerDiscreteScheduler", {}, _FLOW_ONLY),
    "heun": SamplerRow(FlowHeun, {}, "FlowMatchHeunDiscreteScheduler", {},
                       {**_FLOW_ONLY, "use_dynamic_shifting": (False,)}),
    "dpmpp-2m": SamplerRow(FlowDPMSolverPP, {}, "DPMSolverMultistepScheduler", {},
                           {**_FLOW_MULTISTEP, "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",),
                            "use_lu_lambdas": (False,)}),
    "unipc": SamplerRow(FlowUniPC, {}, "UniPCMultistepScheduler", {},
                        {**_FLOW_MULTISTEP, "solver_type": ("bh2",), "predict_x0": (True,),
                         "lower_order_final": (True,), "disable_corrector": ((),), "solver_p": (None,)}),
}


def table_of(config: SchedulerConfig | FlowConfig) -> dict[str, SamplerRow]:
    """The samplers a model's schedule takes: the flow ones for a flow model, else the DDPM ones."""
    return FLOW_SAMPLERS if isinstance(config, FlowConfig) else SAMPLERS


def default_sampler(config: SchedulerConfig | FlowConfig) -> str:
    """The sampler the checkpoint ships (its scheduler_config.json's class and options)."""
    if isinstance(config, FlowConfig):
        name = {row.reference: n for n, row in FLOW_SAMPLERS.items()}.get(config.class_name)
        if name is None:
            raise ValueError(f"the model's scheduler ({config.class_name}) is not one minidream implements; name "
                             f"one of {', '.join(FLOW_SAMPLERS)}")
        return name
    opts = dict(config.extra)
    name = {row.reference: n for n, row in reversed(SAMPLERS.items())}.get(config.class_name)
    karras = opts.get("use_karras_sigmas")
    if config.class_name == "DPMSolverMultistepScheduler":
        sde = opts.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++"
        name = "dpmpp-2m" + ("-sde" if sde else "") + ("-karras" if karras else "")
    elif karras:
        name = None
    if name not in SAMPLERS:
        raise ValueError(f"the model's scheduler ({config.class_name}{' with Karras sigmas' if karras else ''}) "
                         f"is not one minidream implements; name one of {', '.join(SAMPLERS)}")
    return name


def make_sampler(name: str | None, config: SchedulerConfig, eta: float = 0.0) -> Sampler:
    """The sampler `name` (None: the model's own) over the model's noise schedule, read as diffusers'
    `<Class>.from_config(model's config)` reads it."""
    name = name or default_sampler(config)
    table = table_of(config)
    if name not in table:
        kind = " for a flow-matching model (SD3, Flux; Flux.1 [dev]'s shift by image size: euler)" \
            if table is FLOW_SAMPLERS else ""
        raise ValueError(f"--scheduler {name!r} is not one of {', '.join(table)}{kind}")
    row = table[name]
    zero_snr = getattr(config, "rescale_betas_zero_snr", False)
    for k, v in (*config.extra, ("rescale_betas_zero_snr", zero_snr)):
        if k in row.refuses and v not in row.refuses[k]:
            raise ValueError(f"the model's scheduler config sets {k}={v!r}, which minidream's {name} sampler "
                             f"does not implement")
    return row.cls(config.for_class(row.defaults), eta, **row.options)


def zero_snr_schedule(config: SchedulerConfig) -> SchedulerConfig:
    """The schedule a model trained with --zero-terminal-snr samples by (Lin et al. 2024 §3.1-3.3): its betas
    rescaled, trailing timesteps (the first step at t = T, pure noise), and a scheduler class that takes both: the
    model's own where it can, else DDIM for v-prediction and Euler for ε (whose ᾱ_T = 2^-24 keeps ε readable)."""
    own = {row.reference: row for row in SAMPLERS.values()}.get(config.class_name)
    epsilon = config.prediction_type == "epsilon"
    keeps = own is not None and "rescale_betas_zero_snr" not in own.refuses and not (
        epsilon and own.cls.terminal_alpha is None)
    class_name = config.class_name if keeps else "EulerDiscreteScheduler" if epsilon else "DDIMScheduler"
    given = None if config.given is None else tuple(sorted({*config.given, "rescale_betas_zero_snr",
                                                              "timestep_spacing"}))
    return replace(config, rescale_betas_zero_snr=True, timestep_spacing="trailing", class_name=class_name,
                   given=given).check()
