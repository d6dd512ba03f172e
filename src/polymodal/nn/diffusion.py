"""Diffusion: noise schedules, training objectives and samplers.

The forward process noises a clean sample ``x0`` to ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``
where ``a_t`` is the cumulative product of ``1 - beta`` (DDPM, Ho et al. 2020). Schedules:
``linear`` betas from 1e-4 to 0.02 (DDPM) and ``cosine`` (Nichol & Dhariwal 2021, betas capped at
0.999). The denoiser predicts either the noise (``epsilon``) or the velocity
``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (``v``; Salimans & Ho 2022). The per-sample loss is a mean
squared error, optionally weighted by Min-SNR-gamma (Hang et al. 2023), which stops the nearly
noiseless steps (where the data's own pixel noise is all that is left to predict) from
dominating training. Stated as a weight on the error of the predicted clean sample, ``min_snr``
is ``min(SNR, gamma)``: it also fades out the noisiest steps (SNR near 0), where a text-guided
sampler decides the layout and colours of the picture, and short trainings then never learn
them. ``min_snr_plus_one`` (``min(SNR, gamma) + 1``) keeps those steps at the weight plain
v-prediction gives them (``SNR + 1``) and caps only the nearly noiseless ones.

Schedules and sampler steps are ``diffusers``' ``DDPMScheduler`` (ancestral sampling) and
``DDIMScheduler`` (deterministic, eta 0, ``trailing`` timesteps so the first step starts from
pure noise). With epsilon prediction on the cosine schedule that first step divides by
``sqrt(a_T)`` (about 5e-5): the predicted clean sample is the noise prediction's error times
20,000, so it is clamped to ``clip_sample_range`` (pixels: 1; latents: the range of their values).
The sampling loop itself, with classifier-free guidance, lives in the model
(:meth:`polymodal.models.text_to_image.TextToImage.generate`) so it stays short and visible.
Guidance may be limited to an interval of noise levels (Kynkaanniemi et al. 2024, "Applying
guidance in a limited interval"): :meth:`Guidance.at` is the scale at each sampler step,
``guidance`` inside the interval and, outside it, 1 (the conditional prediction alone) or a
weaker scale of its own: guidance that is weak while the picture's layout forms and strong
while its shapes sharpen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> diffusers' name
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
SAMPLERS = ("ddpm", "ddim")
WEIGHTINGS = ("none", "min_snr", "min_snr_plus_one")
TIMESTEPS = ("uniform", "logit_normal")


def check_guidance_interval(interval, train_steps: int = 1000) -> tuple[int, int] | None:
    """``interval`` as ``(low, high)`` timesteps (``None``: guidance at every step), checked: two
    whole numbers with ``0 <= low <= high < train_steps``. A string ``"low,high"`` is read too, and
    ``"all"``: every step, as ``None``."""
    if interval is None or (isinstance(interval, str) and interval.strip() == "all"):
        return None
    if isinstance(interval, str):
        parts = [p.strip() for p in interval.split(",")]
        try:
            interval = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"guidance interval {interval!r}: give two timesteps as LOW,HIGH, e.g. 0,500") from None
    if len(interval) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in interval):
        raise ValueError(f"guidance interval {interval!r}: give two whole timesteps (low, high)")
    low, high = interval
    if not 0 <= low <= high < train_steps:
        raise ValueError(f"guidance interval ({low}, {high}): need 0 <= low <= high < {train_steps}, the "
                         "schedule's timesteps (high noise near the top)")
    return low, high


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance over a sampler's steps: ``scale`` at the timesteps of ``interval``
    (``(low, high)``; ``None``: every step) and ``outside`` at the others (1: none)."""

    scale: float = 3.0
    interval: tuple[int, int] | None = None
    outside: float = 1.0

    @classmethod
    def of(cls, scale: float, interval=None, outside: float = 1.0, train_steps: int = 1000) -> Guidance:
        """Checked settings: ``interval`` as :func:`check_guidance_interval` reads it, and ``outside``
        only with an interval (without one, ``scale`` is used at every step)."""
        interval = check_guidance_interval(interval, train_steps)
        if interval is None and outside != 1.0:
            raise ValueError(f"a guidance scale outside the interval ({outside:g}) needs the interval too")
        return cls(float(scale), interval, float(outside))

    def at(self, t) -> float:
        """The scale at timestep ``t``."""
        if self.interval is None or self.interval[0] <= int(t) <= self.interval[1]:
            return self.scale
        return self.outside

    @property
    def active(self) -> bool:
        """Whether any step mixes in the unconditional prediction (a scale other than 1)."""
        return self.scale != 1.0 or (self.interval is not None and self.outside != 1.0)


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"  # linear | cosine
    prediction: str = "v"  # epsilon | v: what the denoiser outputs
    train_steps: int = 1000  # discrete noise levels of the forward process
    weighting: str = "min_snr_plus_one"  # none | min_snr | min_snr_plus_one: per-sample loss weight
    min_snr_gamma: float = 5.0  # the SNR at which min_snr weighting saturates
    clip_sample: bool = True  # clamp predicted x0 to [-clip_sample_range, clip_sample_range] while sampling
    clip_sample_range: float = 1.0  # 1: pixels in [-1, 1]; latents need the bound of their own values
    timesteps: str = "uniform"  # how training draws noise levels: uniform | logit_normal (the level's
    # fraction of the schedule a sigmoid of a standard normal, as Esser et al. 2024: more of the middle
    # levels, around SNR 1 on the cosine schedule, fewer nearly clean or pure-noise ones)

    def __post_init__(self):
        for name, value, known in (("schedule", self.schedule, SCHEDULES), ("prediction", self.prediction, PREDICTIONS),
                                   ("weighting", self.weighting, WEIGHTINGS), ("timesteps", self.timesteps, TIMESTEPS)):
            if value not in known:
                raise ValueError(f"diffusion {name}: unknown {value!r}; choose from {sorted(known)}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"diffusion clip_sample_range must be positive, got {self.clip_sample_range}")


class Diffusion:
    """The forward process, the training target and loss, and samplers of one configuration."""

    def __init__(self, config: DiffusionConfig):
        from diffusers import DDPMScheduler

        self.config = config
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=config.train_steps, beta_schedule=SCHEDULES[config.schedule],
            prediction_type=PREDICTIONS[config.prediction], clip_sample=config.clip_sample)
        self.alphas_cumprod = self.train_scheduler.alphas_cumprod.float()  # (T,)

    def _at(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for clean ``x0`` (B, ...), noise of the same shape and timesteps ``t`` (B,)."""
        s, n = self._at(t, x0)
        return s * x0 + n * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.config.prediction == "epsilon":
            return noise
        s, n = self._at(t, x0)
        return s * noise - n * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight (B,): Min-SNR-gamma turned into the prediction's own units."""
        if self.config.weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        x0_weight = snr.clamp(max=self.config.min_snr_gamma)  # the weight on the clean-sample error
        if self.config.weighting == "min_snr_plus_one":
            x0_weight = x0_weight + 1
        # the prediction's squared error is (SNR + 1) (v) or SNR (epsilon) times the clean-sample error
        return x0_weight / (snr + 1) if self.config.prediction == "v" else x0_weight / snr

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None,
                         cap: torch.Tensor | int | None = None) -> torch.Tensor:
        """Training noise levels ``(batch,)`` from 0 to ``cap`` (each sample's own, or one for all;
        None: the whole schedule), drawn as the config's ``timesteps`` says."""
        if cap is None and self.config.timesteps == "uniform":
            return torch.randint(0, self.config.train_steps, (batch,), device=device, generator=generator)
        top = self.config.train_steps - 1 if cap is None else cap
        if self.config.timesteps == "uniform":
            fraction = torch.rand(batch, device=device, generator=generator)
        else:
            fraction = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
        levels = (fraction * (top + 1)).long()  # fraction < 1, but a float sigmoid can round to 1
        return torch.minimum(levels, torch.as_tensor(top, device=levels.device))

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The weighted mean squared error of ``prediction`` against the target, averaged over the batch."""
        error = (prediction.float() - self.target(x0, noise, t)).pow(2).flatten(1).mean(1)  # (B,)
        return (error * self.weight(t)).mean()

    def predict_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by the denoiser's output at ``x_t``."""
        s, n = self._at(t, x_t)
        if self.config.prediction == "epsilon":
            return (x_t - n * output) / s
        return s * x_t - n * output

    def sampler(self, method: str = "ddim", steps: int = 50):
        """A ``diffusers`` scheduler set to ``steps`` steps: ``ddpm`` (ancestral) or ``ddim`` (eta 0)."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if method not in SAMPLERS:
            raise ValueError(f"unknown sampler {method!r}; choose from {SAMPLERS}")
        if not 1 <= steps <= self.config.train_steps:
            raise ValueError(f"sampling steps must be in 1..{self.config.train_steps}, got {steps}")
        common = dict(num_train_timesteps=self.config.train_steps, beta_schedule=SCHEDULES[self.config.schedule],
                      prediction_type=PREDICTIONS[self.config.prediction], clip_sample=self.config.clip_sample,
                      clip_sample_range=self.config.clip_sample_range, timestep_spacing="trailing")
        scheduler = DDPMScheduler(**common) if method == "ddpm" else DDIMScheduler(**common, set_alpha_to_one=True)
        scheduler.set_timesteps(steps)
        return scheduler
