"""Text-to-image diffusion guided by text, with classifier-free guidance.

Three parts, trained or kept apart as diffusers does: a **text encoder** (trained with the
denoiser, taken frozen from a trained polymodal contrastive model, or the locked MiniLM), a
**denoiser** (a UNet with cross-attention, or a DiT) that reads the text's token states, and
the **diffusion** (schedule, objective, samplers; :mod:`polymodal.nn.diffusion`). Optionally an
**autoencoder** (:mod:`polymodal.models.autoencoder`) moves the diffusion into a smaller latent
space; by default it runs on 32x32 pixels.

Training: each caption is dropped (replaced by a learned "no text" token) with chance
``condition_dropout``, so the same denoiser also learns the unconditional distribution; the
loss is the diffusion loss at a random timestep. Sampling starts from Gaussian noise and, at
every step, mixes the conditional and unconditional predictions:
``uncond + guidance * (cond - uncond)`` (guidance 1.0 is no guidance). With ``compose``, a
prompt that joins parts with "and" is drawn as the conjunction of its parts (Liu et al. 2022,
composable diffusion): each part is a condition of its own and every part's guidance direction
is added, ``uncond + guidance * sum_i (cond_i - uncond)``, so "a red circle and a blue star"
asks for a red circle and for a blue star rather than for one mixture of the four words.

The recipes train it with a moving average of the weights (``trainer.ema_decay``, kept by the
trainer: :mod:`polymodal.train.ema`), so a saved model holds the averaged weights and samples
with them.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from polymodal.errors import InputError
from polymodal.modalities.text import TextTokenizer
from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
from polymodal.models.family import (
    BuildContext,
    EvalOptions,
    Validator,
    check_denoiser_spec,
    check_diffusion_settings,
    check_drawing_settings,
    check_text_encoder_spec,
    drawing_settings,
    load_saved,
    pretrained_standin,
    saved_config,
    saved_encoder_spec,
)
from polymodal.models.folder import read_tokenizer, write_model_folder
from polymodal.nn.diffusion import Diffusion, DiffusionConfig, Guidance
from polymodal.nn.encoders import build_encoder, config_from_spec
from polymodal.nn.tower import Tower

TEXT_ENCODERS = ("text", "clip", "minilm")
AUTOENCODER_FOLDER = "autoencoder"  # subfolder of a saved model holding its autoencoder
TEXT_ENCODER_FOLDER = "text_encoder"  # subfolder holding a frozen text tower taken from a contrastive model

log = logging.getLogger("polymodal.models")


@dataclass
class TextToImageConfig:
    denoiser: dict = field(default_factory=lambda: {"type": "unet", "preset": "small"},
                           metadata={"check": check_denoiser_spec})  # unet | dit spec
    text: dict = field(default_factory=lambda: {"type": "text", "width": 128, "depth": 2, "heads": 4},
                       metadata={"check": check_text_encoder_spec})
    # text encoder: {"type": "text", ...} trained with the denoiser; {"type": "clip", "path": MODEL}
    # the text tower of a saved contrastive model, frozen; {"type": "minilm"} the locked MiniLM
    diffusion: dict = field(default_factory=dict, metadata={"check": check_diffusion_settings})
    drawing: dict = field(default_factory=dict, metadata={"check": check_drawing_settings})  # how it draws when
    # not told: guidance, guidance_interval, guidance_outside, steps, best_of (DrawingSettings)
    # DiffusionConfig settings
    image_size: int = 32  # side of the generated images, in pixels
    image_field: str = "image"  # batch field of the training images
    caption_column: str = "text"  # metadata column with the caption
    condition_dropout: float = 0.1  # chance a training caption is replaced by "no text"
    autoencoder: str | None = None  # a saved autoencoder folder: diffuse in its latent space (the
    # folder the recipe names; a saved model keeps its own copy in its autoencoder/ subfolder)
    latent_scale: float | None = None  # latents are multiplied by this before diffusion; None: the
    # builder sets 1 / the standard deviation of the training images' latents (unit variance)
    vocab_size: int | None = None  # of the trained text encoder's tokenizer (the builder records it)
    fields: dict[str, str] = field(default_factory=dict)  # data fields read when training

    def __post_init__(self):
        if self.text.get("type") not in TEXT_ENCODERS:
            raise ValueError(f"text encoder type {self.text.get('type')!r}; choose from {TEXT_ENCODERS}")
        if self.denoiser.get("type") not in ("unet", "dit"):
            raise ValueError(f"denoiser type {self.denoiser.get('type')!r}; choose from ['dit', 'unet']")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if self.drawing.get("best_of", 1) > 1:
            raise ValueError(f"drawing.best_of: {self.drawing['best_of']}, but a text-to-image model draws without "
                             "reading what it draws, so it cannot choose among its drawings (an omni model can)")


def build_denoiser(spec: dict, in_channels: int, context_dim: int) -> nn.Module:
    from polymodal.nn.dit import DiT, DiTConfig
    from polymodal.nn.unet import UNet, UNetConfig

    spec = {**spec, "in_channels": in_channels, "context_dim": context_dim}
    kind = spec.pop("type")
    config_cls, model_cls = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT)}[kind]
    return model_cls(config_from_spec(config_cls, spec, kind))


class TextConditioner(Tower):
    """Text -> token states (B, T, D), their mask (B, T) and a pooled vector (B, D); and the
    learned "no text" condition used for dropped captions and guidance.

    A :class:`~polymodal.nn.tower.Tower` over raw texts: a text encoder trained with the
    denoiser (``text``), or a fixed one (``clip``: the text tower of a trained contrastive
    model, passed in as ``encoder``, see :func:`clip_text_tower`; ``minilm``) whose token states
    the tower caches per text, so each caption is encoded once.
    """

    def __init__(self, spec: dict, tokenizer: TextTokenizer | None, encoder: nn.Module | None = None):
        kind, encoder_spec = spec["type"], spec
        if kind == "clip":
            if encoder is None:
                raise ValueError("text: type clip needs the text encoder of a saved contrastive model")
            encoder_spec = asdict(encoder.config)
        elif kind == "text" and tokenizer is None:
            raise ValueError("a trained text encoder needs a tokenizer")
        super().__init__("text", encoder_spec, tokenizer=tokenizer, encoder=encoder if kind == "clip" else None,
                         frozen=kind != "text")
        self.null_token = nn.Parameter(torch.randn(self.width) * 0.02)  # the "no text" condition

    @property
    def tokenizer(self):
        return getattr(self.encoder, "tokenizer", None)

    def forward(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states, mask = self.encoder_tokens({self.name: list(texts)})  # a frozen encoder's from the cache
        states, mask = states.to(device), mask.to(device)
        m = mask[:, :, None].to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        return states, mask, pooled

    def null(self, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The "no text" condition for ``batch`` samples, padded to ``length`` tokens."""
        states = torch.zeros(batch, length, self.width, device=device)
        states[:, 0] = self.null_token
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, 0] = True
        return states, mask, self.null_token.expand(batch, -1)


def split_conjunction(prompt: str) -> list[str]:
    """The parts of ``prompt`` joined by "and" or commas: "a red circle, a blue star and a
    green cross" -> three parts. A prompt without a conjunction is its own single part."""
    parts = [p.strip(" ,") for p in re.split(r",|\band\b", prompt)]
    parts = [p for p in parts if p]
    return parts or [prompt]


class TextToImage(nn.Module):
    """``autoencoder``: the trained autoencoder whose latent grid is diffused (the config's
    ``autoencoder`` names where it came from; the model keeps it and saves it in its folder).
    ``text_encoder``: with ``text: {type: clip}``, the text tower of a trained contrastive model
    (kept frozen and saved in the model's folder the same way)."""

    def __init__(self, config: TextToImageConfig, tokenizer: TextTokenizer | None = None,
                 autoencoder: Autoencoder | None = None, text_encoder: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        if (autoencoder is None) != (c.autoencoder is None):
            raise ValueError("config.autoencoder names an autoencoder folder exactly when one is passed in")
        if autoencoder is not None and c.latent_scale is None:
            raise ValueError("latent_scale is needed with an autoencoder (the builder measures it)")
        self.text = TextConditioner(c.text, tokenizer, text_encoder)
        self.autoencoder = None
        channels, self.latent_size = 3, c.image_size
        if autoencoder is not None:
            self.autoencoder = autoencoder.requires_grad_(False).eval()
            channels = autoencoder.config.latent_channels
            self.latent_size = c.image_size // autoencoder.downsample
        self.denoiser = build_denoiser(c.denoiser, channels, self.text.width)
        self.diffusion = Diffusion(DiffusionConfig(**{"clip_sample": c.autoencoder is None, **c.diffusion}))
        self.channels = channels
        self._latent_cache: dict[str, torch.Tensor] = {}  # training sample id -> its latent grid

    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def latent_scale(self) -> float:
        return 1.0 if self.config.latent_scale is None else self.config.latent_scale

    def train(self, mode: bool = True):
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()
        return self

    # ---- conditions ----

    def condition(self, texts: list[str | None], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token states, mask and pooled vector for each text; ``None`` is "no text"."""
        present = [i for i, t in enumerate(texts) if t is not None]
        b = len(texts)
        if not present:
            return self.text.null(b, 1, device)
        states, mask, pooled = self.text([texts[i] for i in present], device)
        if len(present) == b:
            return states, mask, pooled
        all_states, all_mask, all_pooled = self.text.null(b, states.shape[1], device)
        index = torch.tensor(present, device=device)
        all_states, all_mask, all_pooled = all_states.clone(), all_mask.clone(), all_pooled.clone()
        all_states[index], all_mask[index], all_pooled[index] = states, mask, pooled
        return all_states, all_mask, all_pooled

    # ---- latents ----

    @torch.no_grad()
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return images
        return self.autoencoder.encode(images) * self.latent_scale

    @torch.no_grad()
    def training_latents(self, images: torch.Tensor, rows: list[dict]) -> torch.Tensor:
        """:meth:`to_latent` of a training batch, each sample encoded once: the frozen encoder
        gives a sample the same latent every epoch (images are not augmented)."""
        keys = [row.get("id", row.get("file_name")) for row in rows]
        if self.autoencoder is None or any(k is None for k in keys):
            return self.to_latent(images)
        missing = [i for i, k in enumerate(keys) if k not in self._latent_cache]
        if missing:
            fresh = self.to_latent(images[missing])
            for i, latent in zip(missing, fresh, strict=True):
                self._latent_cache[keys[i]] = latent.cpu()
        return torch.stack([self._latent_cache[k] for k in keys]).to(images.device)

    @torch.no_grad()
    def from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return latents
        return self.autoencoder.decode(latents / self.latent_scale)

    # ---- training ----

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images = batch[self.config.image_field]
        if images.shape[-1] != self.config.image_size or images.shape[-2] != self.config.image_size:
            raise ValueError(f"training images are {tuple(images.shape[-2:])}; this model makes "
                             f"{self.config.image_size}x{self.config.image_size} (set data.image_size)")
        texts = [row[self.config.caption_column] for row in batch["rows"]]
        rng = random.Random(None if generator is None else generator.initial_seed())
        texts = [None if rng.random() < self.config.condition_dropout else t for t in texts]
        device = images.device
        x0 = self.training_latents(images, batch["rows"])
        context, mask, pooled = self.condition(texts, device)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        t = self.diffusion.sample_timesteps(x0.shape[0], device, generator)
        x_t = self.diffusion.add_noise(x0, noise, t)
        prediction = self.denoiser(x_t, t, context, mask, pooled)
        loss = self.diffusion.loss(prediction, x0, noise, t)
        return {"loss": loss}

    # ---- sampling ----

    @torch.no_grad()
    def generate(self, prompts: list[str], *, guidance: float = 3.0, steps: int = 50, sampler: str = "ddim",
                 seed: int | None = 0, generator: torch.Generator | None = None,
                 compose: bool = False, guidance_interval: tuple[int, int] | str | None = None,
                 guidance_outside: float = 1.0, progress=None) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] for ``prompts``: ``steps`` denoising steps from pure
        noise, conditional and unconditional predictions mixed by ``guidance``; with ``compose``,
        each prompt's "and"-joined parts are guided as a conjunction (see the module doc).
        ``guidance_interval``: ``(low, high)`` timesteps outside which the scale is
        ``guidance_outside`` (:class:`~polymodal.nn.diffusion.Guidance`; default: ``guidance`` at
        every step). The same ``seed`` gives the same images."""
        if not prompts:
            raise ValueError("no prompts to draw")
        device = next(self.parameters()).device
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        b = len(prompts)
        parts = [split_conjunction(p) if compose else [p] for p in prompts]
        owner = torch.tensor([i for i, ps in enumerate(parts) for _ in ps], device=device)  # prompt of each part
        conditions = [q for ps in parts for q in ps]
        schedule = Guidance.of(guidance, guidance_interval, guidance_outside, self.diffusion.config.train_steps)
        guided_pass = schedule.active or len(conditions) > b  # a conjunction needs the unconditional pass
        context, mask, pooled = self.condition(conditions + [None] * b * guided_pass, device)  # cond, then uncond
        scheduler = self.diffusion.sampler(sampler, steps)
        x = torch.randn((b, self.channels, self.latent_size, self.latent_size), device=device, generator=generator)
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([x[owner], x]) if guided_pass else x
            timesteps = torch.full((len(rows),), int(t), device=device, dtype=torch.long)
            out = self.denoiser(rows, timesteps, context, mask, pooled)
            if guided_pass:
                cond, uncond = out[: len(conditions)], out[len(conditions) :]
                directions = torch.zeros_like(uncond).index_add_(0, owner, cond - uncond[owner])
                out = uncond + schedule.at(t) * directions
            x = scheduler.step(out, t, x, generator=generator).prev_sample
            if progress:
                progress(i + 1)
        return self.from_latent(x).clamp(-1, 1)

    # ---- the family (see polymodal.models.family) ----

    tasks = ("generate image",)
    config_class = TextToImageConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = ("test", "test_novel")

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> TextToImage:
        """A trained text encoder gets a tokenizer trained on the training split; an autoencoder
        named by the recipe is loaded, and the scale that gives its latents of the training
        images unit variance is measured (unless the recipe sets ``latent_scale``)."""
        if spec.get("init_from"):
            raise ValueError("model.init_from: a text-to-image model starts from its parts (text, autoencoder)")
        config = TextToImageConfig(**{**spec, "fields": spec.get("fields") or build.field_map()})
        tokenizer = build.tokenizer(config.caption_column) if config.text["type"] == "text" else None
        if tokenizer is not None:
            config = replace(config, vocab_size=tokenizer.vocab_size)
        autoencoder = Autoencoder.from_pretrained(config.autoencoder) if config.autoencoder else None
        if autoencoder is not None and config.latent_scale is None:
            config = replace(config, latent_scale=latent_scale(autoencoder, build.images(512)))
            log.info("latent scale %.4f", config.latent_scale)
        text_encoder = clip_text_tower(config.text.get("path")) if config.text["type"] == "clip" else None
        return cls(config, tokenizer, autoencoder, text_encoder)

    def fields(self) -> dict[str, str]:
        return dict(self.config.fields) or {self.config.image_field: "image"}

    def input_size(self) -> int:
        return self.config.image_size

    def validator(self, items: list[dict], fields) -> Validator:
        """The denoising loss of the validation images at fixed noise (seeded): comparable from
        one validation to the next."""
        from polymodal.data.dataset import Collator

        def denoising_loss(model) -> dict[str, float]:
            generator = torch.Generator().manual_seed(0)
            collate, total, n = Collator(fields), 0.0, 0
            for start in range(0, len(items), 100):
                batch = collate(items[start : start + 100])
                total += model.loss(batch, generator=generator)["loss"].item() * len(batch["rows"])
                n += len(batch["rows"])
            return {"denoising loss": total / max(n, 1)}

        return denoising_loss

    @torch.no_grad()
    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """GenEval-style scores on prompts built from each split's scenes (see
        :mod:`polymodal.eval.geneval`), judged by a detector trained on real images
        (``options.judge``), beside the judge's own accuracy on the split's real images; a CLIP
        score with ``options.clip``. Drawn with the options' settings, else the model's own
        (:func:`~polymodal.models.family.drawing_settings`), recorded beside the scores
        (``guidance``, ``guidance interval low`` / ``high`` and ``guidance outside`` with an
        interval, ``denoising steps``, ``best of``)."""
        from polymodal.eval.geneval import evaluate_generator, generator_function
        from polymodal.models.clip import ContrastiveModel
        from polymodal.models.detector import GridDetector
        from polymodal.models.family import split_items

        if options.judge is None:
            raise InputError(data, "a text-to-image model is scored by a judge: pass --judge (a trained detector)")
        drawing = drawing_settings(self, guidance=options.guidance, guidance_interval=options.guidance_interval,
                                   guidance_outside=options.guidance_outside, steps=options.sample_steps,
                                   best_of=options.best_of)
        judge = GridDetector.load_judge(options.judge)
        contrastive = ContrastiveModel.from_pretrained(options.clip) if options.clip is not None else None
        rows, real = {}, {}
        for split in splits:
            items = split_items(data, {"image": "image"}, split, self.config.image_size)
            if items:
                rows[split] = [item["row"] for item in items]
                real[split] = torch.stack([item["image"] for item in items])
        if not rows:
            raise InputError(data, f"no samples in the splits {list(splits)}")
        if "objects" not in next(iter(rows.values()))[0]:
            raise InputError(data, "rows have no 'objects' scene graph: GenEval-style prompts need a shapes world")
        generate = generator_function(self, drawing["guidance"], drawing["steps"], progress=options.progress,
                                      compose=options.compose, guidance_interval=drawing["guidance_interval"],
                                      guidance_outside=drawing["guidance_outside"], best_of=drawing.get("best_of", 1))
        results = evaluate_generator(generate, judge, rows, per_category=options.per_category, seed=options.seed,
                                     clip=contrastive, real_images_by_split=real)
        low, high = drawing["guidance_interval"] or (None, None)
        drawn_with = {"guidance": drawing["guidance"], "guidance interval low": low, "guidance interval high": high,
                      "guidance outside": drawing["guidance_outside"] if low is not None else None,
                      "denoising steps": drawing["steps"], "best of": drawing.get("best_of", 1)}
        return {split: {**metrics, **{k: float(v) for k, v in drawn_with.items() if v is not None}}
                for split, metrics in results.items()}

    # ---- saving ----

    def state_to_save(self) -> dict[str, torch.Tensor]:
        skip = ("autoencoder.",) + (("text.encoder.",) if self.text.frozen else ())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """``config.json``, the denoiser's (and a trained text encoder's) weights, its tokenizer,
        and the autoencoder in ``autoencoder/``, as diffusers saves a pipeline's parts: the folder
        draws on its own, wherever it is moved."""
        tokenizer = self.tokenizer if self.config.text["type"] == "text" else None

        def parts(folder: Path) -> None:
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            if self.autoencoder is not None:
                self.autoencoder.save_pretrained(folder / AUTOENCODER_FOLDER)
            if self.config.text["type"] == "clip":
                save_text_tower(self.text.encoder, folder / TEXT_ENCODER_FOLDER)

        return write_model_folder(directory, {"model_type": "text_to_image", **asdict(self.config)},
                                  self.state_to_save(), extra=parts)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TextToImage:
        """The model and its parts (``autoencoder/``, ``text_encoder/``), every config checked
        and the whole sized and matched with its weight files before anything is allocated (see
        :func:`~polymodal.models.family.load_saved`)."""
        directory = Path(directory)
        config = saved_config(directory, "text_to_image", TextToImageConfig)
        kind = config.text["type"]
        tokenizer = read_tokenizer(directory) if kind == "text" else None
        autoencoder_config, parts = None, {}
        if config.autoencoder is not None:
            if not (directory / AUTOENCODER_FOLDER).is_dir():
                raise InputError(directory, f"the model diffuses latents but its {AUTOENCODER_FOLDER}/ folder is missing")
            autoencoder_config = saved_config(directory / AUTOENCODER_FOLDER, "autoencoder", AutoencoderConfig)
            parts[AUTOENCODER_FOLDER] = lambda m: m.autoencoder
        text_spec = text_tokenizer = None
        if kind == "clip":
            text_spec, text_tokenizer = read_text_tower(directory / TEXT_ENCODER_FOLDER)
            parts[TEXT_ENCODER_FOLDER] = lambda m: m.text.encoder

        def build(text_config: TextToImageConfig = config, text_encoder_spec: dict | None = text_spec):
            autoencoder = Autoencoder(autoencoder_config) if autoencoder_config is not None else None
            options = {"tokenizer": text_tokenizer} if text_tokenizer is not None else {}
            text_encoder = build_encoder(text_encoder_spec, **options) if text_encoder_spec else None
            return cls(text_config, tokenizer, autoencoder, text_encoder)

        # a locked MiniLM loads from disk: on the meta device a stand-in of its width is counted
        standin, extra = pretrained_standin(config.text)
        estimate = (lambda: build(replace(config, text={"type": "clip"}), standin)) if kind == "minilm" else build
        return load_saved(directory, build, estimate=estimate, extra_params=extra, parts=parts,
                          saved=lambda m: m.state_to_save())


@torch.no_grad()
def latent_scale(autoencoder: Autoencoder, images: torch.Tensor) -> float:
    """1 / the standard deviation of the autoencoder's latents of ``images``: the scale that
    gives diffusion unit-variance latents."""
    return float(1.0 / autoencoder.encode(images).std().clamp(min=1e-6))


def clip_text_tower(path: str | None) -> nn.Module:
    """The text encoder of the contrastive model saved in ``path`` (with its tokenizer)."""
    from polymodal.models.clip import ContrastiveModel

    if not path:
        raise ValueError("text: type clip needs path: a saved contrastive model")
    clip = ContrastiveModel.from_pretrained(path)
    tower = clip.tower_reading("text")
    if tower is None or clip.config.towers[tower]["type"] != "text":
        raise InputError(path, "has no trained text tower to condition on")
    return clip.towers[tower].encoder


def save_text_tower(encoder: nn.Module, folder: Path) -> None:
    """A text encoder's config, weights and tokenizer in ``folder`` (a part of a saved model)."""
    write_model_folder(folder, {"model_type": "text_encoder", **asdict(encoder.config)}, encoder.state_dict(),
                       extra=encoder.tokenizer.save_pretrained)


def read_text_tower(folder: Path) -> tuple[dict, TextTokenizer]:
    """The checked encoder spec and the tokenizer of the text encoder :func:`save_text_tower`
    wrote to ``folder`` (its weights are read with the model's, see ``from_pretrained``)."""
    if not folder.is_dir():
        raise InputError(folder.parent, f"the model conditions on a contrastive model's text tower but its "
                                        f"{folder.name}/ folder is missing")
    spec, tokenizer = saved_encoder_spec(folder, "text_encoder"), read_tokenizer(folder)
    if spec["type"] != "text":
        raise InputError(folder / "config.json", f"type: a text tower is of type 'text', not {spec['type']!r}")
    if spec.get("vocab_size") != tokenizer.vocab_size:
        raise InputError(folder / "config.json", f"vocab_size: {spec.get('vocab_size')} differs from the "
                                                 f"{tokenizer.vocab_size} tokens of its tokenizer")
    return spec, tokenizer
