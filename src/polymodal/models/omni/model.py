"""The omni model itself (:class:`OmniModel`): the network, its training loss, and the family's
entry points (build, validate, evaluate, save, load); its generation of text, images and
interleaved output is :mod:`polymodal.models.omni.generation`'s. The design: :mod:`polymodal.models.omni`."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.data.dataset import DEFAULT_COLUMNS
from polymodal.errors import InputError
from polymodal.modalities.text import TextTokenizer
from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
from polymodal.models.family import (
    DEFAULT_SPLITS,
    BuildContext,
    EvalOptions,
    Validator,
    evaluate_splits,
    load_saved,
    saved_config,
)
from polymodal.models.folder import read_tokenizer, write_model_folder
from polymodal.models.omni.blocks import OmniBlock, Routing, modulate_images
from polymodal.models.omni.generation import AsCaptioner, OmniGeneration
from polymodal.models.omni.sequence import (
    AUTOENCODER_FOLDER,
    IMAGE,
    TEXT,
    TOKEN_CACHE_LIMIT,
    VALIDATION_LOSS_ITEMS,
    VALIDATION_WRITTEN_ITEMS,
    Interleaved,
    OmniCache,
    OmniConfig,
    OmniExample,
    Segment,
    examples_from_rows,
    pair_positions,
)
from polymodal.nn.diffusion import Diffusion
from polymodal.nn.dit import sincos_2d
from polymodal.nn.layers import segment_mask
from polymodal.nn.unet import timestep_embedding

log = logging.getLogger("polymodal.models")


# ---- the model -----------------------------------------------------------------------------


class OmniModel(OmniGeneration, nn.Module):
    """``autoencoder``: the trained autoencoder whose codes or latents are the image tokens (the
    config's ``autoencoder`` names where it came from; the model keeps it frozen and saves it in
    its folder). Without one the model works on tokens only (``image_tokens`` / ``decode_images``
    need it). ``teacher``: for training with ``align_encoder``, the frozen model (with a
    ``feature_map``) whose features of the clean images the image tokens learn to predict; a
    saved model keeps neither it nor the small MLP that predicts them."""

    def __init__(self, config: OmniConfig, tokenizer: TextTokenizer, autoencoder: Autoencoder | None = None,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        self.tokenizer = tokenizer
        if c.vocab_size is not None and tokenizer.vocab_size != c.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens; the config says vocab_size {c.vocab_size}")
        if (autoencoder is None) != (c.autoencoder is None):
            raise ValueError("config.autoencoder names an autoencoder folder exactly when one is passed in")
        if autoencoder is not None:
            check_autoencoder(c, autoencoder.config, c.autoencoder)
        self.autoencoder = autoencoder.requires_grad_(False).eval() if autoencoder is not None else None
        self.text_vocab = tokenizer.vocab_size
        self.vocab = self.text_vocab + (c.codebook_size if c.image == "vq" else 0)  # codes follow the text
        experts = 2 if c.layout == "mot" else 1
        self.token_embedding = nn.Embedding(self.vocab, c.width)
        self.image_position = nn.Parameter(  # the 2-D place of a cell, learned
            sincos_2d(c.token_grid, c.width) if c.image_positions == "sincos" else torch.randn(c.image_tokens, c.width) * 0.02)
        self.modulated = c.image == "latent" and c.time_conditioning == "adaln"
        self.blocks = nn.ModuleList(OmniBlock(c.width, c.heads, c.mlp_ratio, c.qk_norm, experts, c.rotary_base,
                                              self.modulated) for _ in range(c.depth))
        self.norms = nn.ModuleList(nn.LayerNorm(c.width) for _ in range(experts))  # final, per modality in mot
        self.final_modulation = None
        if self.modulated:  # the last norm's scale and shift on image tokens, from the timestep; starts at 0
            self.final_modulation = nn.Linear(c.width, 2 * c.width)
            nn.init.zeros_(self.final_modulation.weight)
            nn.init.zeros_(self.final_modulation.bias)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.diffusion = None
        if c.image == "latent":
            self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
            self.text_to_condition = nn.Linear(c.width, c.width) if c.text_condition else None
            if c.patch == "conv":  # over the (C, g, g) grid of an image; the hidden width half the model's
                inner = max(c.width // 2, c.token_channels)
                self.latent_in = nn.Sequential(nn.Conv2d(c.token_channels, inner, 3, padding=1), nn.SiLU(),
                                               nn.Conv2d(inner, c.width, 3, padding=1))
                self.latent_out = nn.Sequential(nn.Conv2d(c.width, inner, 3, padding=1), nn.SiLU(),
                                                nn.Conv2d(inner, c.token_channels, 3, padding=1))
            else:
                self.latent_in = nn.Linear(c.token_channels, c.width)
                self.latent_out = nn.Linear(c.width, c.token_channels)
            last = self.latent_out[-1] if c.patch == "conv" else self.latent_out
            nn.init.zeros_(last.weight)  # the prediction starts at 0
            nn.init.zeros_(last.bias)
            self.diffusion = Diffusion(c.diffusion_config())
        self.parameter_sets = experts  # per block: 1 (dense) or one per modality (mot)
        self._token_cache: dict[str, torch.Tensor] = {}  # training image file -> its codes or latents
        self.teacher = self.aligner = None
        if teacher is not None:
            if c.align_encoder is None or c.image != "latent":
                raise ValueError("a teacher is for latent images with config.align_encoder set")
            if not callable(getattr(teacher, "feature_map", None)):
                raise ValueError(f"model.align_encoder: {c.align_encoder} is a {type(teacher).__name__}, which has "
                                 f"no image feature map (a detector has)")
            self.teacher = teacher.requires_grad_(False).eval()
            with torch.no_grad():
                channels = teacher.feature_map(torch.zeros(1, 3, c.image_size, c.image_size)).shape[1]
            self.aligner = nn.Sequential(nn.Linear(c.width, 2 * c.width), nn.SiLU(), nn.Linear(2 * c.width, channels))
        self._target_cache: dict[str, torch.Tensor] = {}  # training image file -> the teacher's cell features

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.autoencoder, self.teacher):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def latent_scale(self) -> float:
        return 1.0 if self.config.latent_scale is None else self.config.latent_scale

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # ---- images <-> image tokens ----

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] -> codes ``(B, g, g)`` (vq) or scaled latents ``(B, C, g, g)``
        (with ``patch_size`` p: each p x p block of cells as one cell of C p^2 channels, ``(B, C p^2, g/p, g/p)``)."""
        if self.autoencoder is None:
            raise ValueError("this model has no autoencoder: pass image tokens, not images")
        side = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"images are {tuple(images.shape)}; this model reads (B, 3, {side}, {side}) "
                             f"(set data.image_size: {side})")
        if self.config.image == "vq":
            return self.autoencoder.encode_codes(images)
        latents = self.autoencoder.encode(images) * self.latent_scale
        p = self.config.patch_size
        return F.pixel_unshuffle(latents, p) if p > 1 else latents

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes or latents from :meth:`generate_image` -> images ``(B, 3, S, S)`` in [-1, 1]."""
        if self.autoencoder is None:
            raise ValueError("this model has no autoencoder to draw its image tokens with")
        if self.config.image == "vq":
            return self.autoencoder.decode_codes(tokens).clamp(-1, 1)
        p = self.config.patch_size
        latents = F.pixel_shuffle(tokens, p) if p > 1 else tokens
        return self.autoencoder.decode(latents / self.latent_scale).clamp(-1, 1)

    @torch.no_grad()
    def training_tokens(self, images: torch.Tensor, rows: Sequence[dict] | None) -> torch.Tensor:
        """:meth:`image_tokens` of a training batch, each image file encoded once: the autoencoder is
        frozen and images are not augmented, so a file's codes or latents are the same every
        epoch, and encoding them every step cost the autoencoder's forward pass per image. Kept
        by the file each row's image came from (at most :data:`TOKEN_CACHE_LIMIT` of them); rows
        that name no file are encoded as they come."""
        return self._per_file(self._token_cache, images, rows, self.image_tokens)

    @torch.no_grad()
    def alignment_targets(self, images: torch.Tensor, rows: Sequence[dict] | None) -> torch.Tensor:
        """The teacher's features of each training image on the latent grid ``(B, cells, C)`` (its
        feature map averaged over each token's pixels), cached by file as :meth:`training_tokens`."""
        g = self.config.token_grid

        def cells(x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool2d(self.teacher.feature_map(x).float(), g).flatten(2).transpose(1, 2)

        return self._per_file(self._target_cache, images, rows, cells)

    def _per_file(self, cache: dict[str, torch.Tensor], images: torch.Tensor, rows: Sequence[dict] | None,
                  encode) -> torch.Tensor:
        """``encode(images)``, each image file's result kept in ``cache`` (see :meth:`training_tokens`)."""
        spec = self.fields().get(self.config.image_field, "image")
        column = spec.partition(":")[2] or DEFAULT_COLUMNS["image"]
        keys = [row.get(column) for row in rows] if rows is not None else [None] * len(images)
        if len(keys) != len(images) or any(not isinstance(k, str) for k in keys):
            return encode(images)
        found = {i: cache[k] for i, k in enumerate(keys) if k in cache}
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            fresh = encode(images[missing]).cpu()
            for i, value in zip(missing, fresh, strict=True):
                found[i] = value
                if len(cache) < TOKEN_CACHE_LIMIT:
                    cache[keys[i]] = value
        return torch.stack([found[i] for i in range(len(keys))]).to(images.device)

    # ---- packing ----

    def _image_tokens_of(self, image: torch.Tensor, where: str) -> torch.Tensor:
        """An image segment as its tokens: code ids ``(cells,)`` (vq) or latents ``(cells, C)``."""
        c = self.config
        g = c.token_grid
        if c.image == "vq":
            if image.shape != (g, g) or image.dtype != torch.long:
                raise ValueError(f"{where}: a vq image is a ({g}, {g}) grid of integer codes, got "
                                 f"{tuple(image.shape)} {image.dtype}")
            if image.min() < 0 or image.max() >= c.codebook_size:
                raise ValueError(f"{where}: codes must be in 0..{c.codebook_size - 1}")
            return image.flatten() + self.text_vocab
        if image.shape != (c.token_channels, g, g) or not image.is_floating_point():
            raise ValueError(f"{where}: a latent image is a ({c.token_channels}, {g}, {g}) float grid, got "
                             f"{tuple(image.shape)} {image.dtype}")
        return image.flatten(1).T.float()  # (cells, C), row-major cells

    def pack(self, examples: Sequence[OmniExample | Sequence[Segment]], side: str = "right",
             open_image: bool = False) -> Interleaved:
        """Examples (or plain lists of segments) as one batch, padded on the ``right`` (training)
        or the ``left`` (generation);
        each image framed by ``<boi>`` and ``<eoi>``, latent images clean (timestep 0). With
        ``open_image`` every row ends with a ``<boi>``: the prompt of an image to draw."""
        c, tok = self.config, self.tokenizer
        latent = c.image == "latent"
        cells = c.image_tokens
        framing = {tok.boi_id, tok.eoi_id}
        rows = []
        for n, example in enumerate(examples):
            if not isinstance(example, OmniExample):
                example = OmniExample(list(example))
            ids, modality, segment, cell, images = [], [], [], [], []
            for s, part in enumerate(example.segments):
                where = f"example {n} segment {s}"
                if isinstance(part, torch.Tensor):
                    tokens = self._image_tokens_of(part, where)
                    start = len(ids) + 1
                    ids += [tok.boi_id, *(tokens.tolist() if not latent else [tok.pad_id] * cells), tok.eoi_id]
                    modality += [TEXT, *[IMAGE] * cells, TEXT]
                    segment += [0, *[len(images) + 1] * cells, 0]
                    cell += [0, *range(cells), 0]
                    images.append((start, tokens if latent else None, example.max_timestep))
                else:
                    part = list(part)
                    bad = [i for i in part if not isinstance(i, int) or not 0 <= i < self.text_vocab or i in framing]
                    if bad:
                        raise ValueError(f"{where}: {bad[0]!r} is not a text token id (0..{self.text_vocab - 1}, "
                                         f"without <boi>/<eoi>, which frame image segments)")
                    ids += part
                    modality += [TEXT] * len(part)
                    segment += [0] * len(part)
                    cell += [0] * len(part)
            if open_image:
                ids, modality, segment, cell = ids + [tok.boi_id], modality + [TEXT], segment + [0], cell + [0]
            if len(ids) > c.context_length:
                raise ValueError(f"example {n} has {len(ids)} tokens; context_length is {c.context_length}")
            rows.append((ids, modality, segment, cell, images))
        if not rows:
            raise ValueError("no examples to pack")
        b, t = len(rows), max(len(r[0]) for r in rows)

        def table(fill, dtype):
            return torch.full((b, t), fill, dtype=dtype)

        ids, modality, segment, cell = (table(tok.pad_id, torch.long), table(TEXT, torch.long),
                                        table(0, torch.long), table(0, torch.long))
        key_mask = table(False, torch.bool)
        latents = torch.zeros(b, t, c.token_channels) if latent else None
        image_index, clean, caps = [], [], []
        for i, (r_ids, r_modality, r_segment, r_cell, r_images) in enumerate(rows):
            lo = 0 if side == "right" else t - len(r_ids)
            span = slice(lo, lo + len(r_ids))
            ids[i, span], modality[i, span] = torch.tensor(r_ids), torch.tensor(r_modality)
            segment[i, span], cell[i, span] = torch.tensor(r_segment), torch.tensor(r_cell)
            key_mask[i, span] = True
            for start, tokens, cap in r_images:
                if latent:
                    latents[i, lo + start : lo + start + cells] = tokens
                    clean.append(tokens)
                    caps.append(self.diffusion.config.train_steps - 1 if cap is None else cap)
                image_index.append(i * t + lo + start + torch.arange(cells))
        seq = Interleaved(ids, modality, segment, cell, key_mask, latents,
                          table(0, torch.long) if latent else None,
                          torch.stack(image_index) if image_index else torch.zeros(0, cells, dtype=torch.long),
                          torch.stack(clean) if clean else None, torch.tensor(caps, dtype=torch.long) if latent else None)
        return Interleaved(*(None if x is None else x.to(self.device) for x in
                             (getattr(seq, f) for f in seq.__dataclass_fields__)))

    def _tokens(self, ids: torch.Tensor, modality: int, segment: int = 0, first_cell: int = 0) -> Interleaved:
        """New positions of one modality after a batch: text ids (``<pad>`` masked) or image codes."""
        b, t = ids.shape
        cells = first_cell + torch.arange(t, device=ids.device).expand(b, t) if modality == IMAGE else torch.zeros_like(ids)
        latent = self.config.image == "latent"
        return Interleaved(ids, torch.full_like(ids, modality), torch.full_like(ids, segment), cells,
                           ids != self.tokenizer.pad_id if modality == TEXT else torch.ones_like(ids, dtype=torch.bool),
                           ids.new_zeros(b, t, self.config.token_channels, dtype=torch.float) if latent else None,
                           torch.zeros_like(ids) if latent else None)

    def _latent_block(self, x: torch.Tensor, t: int, segment: int) -> Interleaved:
        """A latent image block ``x`` ``(B, cells, C)`` at noise level ``t``, as new positions."""
        b, cells, _ = x.shape
        ids = torch.full((b, cells), self.tokenizer.pad_id, dtype=torch.long, device=x.device)
        block = self._tokens(ids, IMAGE, segment)
        return replace(block, latents=x, timesteps=torch.full_like(ids, int(t)))

    # ---- the Transformer ----

    def embed(self, seq: Interleaved, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors ``(B, T, width)``: text (and vq code) embeddings; latent cells projected
        in with their image's timestep condition ``condition`` ``(N images, width)`` added (see
        :meth:`image_condition`); every image token plus its cell's position."""
        x = self.token_embedding(seq.ids)  # (B, T, W)
        image = seq.modality == IMAGE
        if not image.any():
            return x
        place = self.image_position[seq.cell[image]]  # (N, W)
        if self.config.image == "latent":
            if condition is None:
                condition = self.image_condition(seq)
            time = condition.repeat_interleave(self.config.image_tokens, 0)  # each image's, on all its cells
            return x.index_put((image,), self.patch_in(seq.latents[image], seq.cell[image]) + time + place)
        return x.index_put((image,), x[image] + place)

    def patch_in(self, cells: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Latent cells ``(N, C)`` -> token vectors ``(N, width)``. With ``patch: conv`` the cells
        must be whole images in cell order (``where``: each one's cell), as every packed or
        sampled block is."""
        if self.config.patch == "linear":
            return self.latent_in(cells)
        n = self.config.image_tokens
        if len(cells) % n or not torch.equal(where.view(-1, n), torch.arange(n, device=where.device).expand(len(cells) // n, n)):
            raise ValueError(f"conv patch layers need whole images of {n} cells in order")
        return self._over_grid(self.latent_in, cells.view(-1, n, cells.shape[-1])).reshape(len(cells), -1)

    def patch_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """The diffusion prediction ``(N, cells, C)`` from the final hidden states of ``N`` images
        ``(N, cells, width)``."""
        if self.config.patch == "linear":
            return self.latent_out(hidden)
        return self._over_grid(self.latent_out, hidden)

    def _over_grid(self, layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layers`` (convolutions) over images given as their cells ``(N, cells, D)``, laid out
        on the grid of tokens: ``(N, cells, D')``."""
        g = self.config.token_grid
        grids = x.reshape(len(x), g, g, -1).permute(0, 3, 1, 2)
        return layers(grids).permute(0, 2, 3, 1).reshape(len(x), g * g, -1)

    def forward(self, seq: Interleaved, cache: OmniCache | None = None, keep: int | None = None):
        """Final hidden states ``(B, T, width)`` of the positions of ``seq`` (with a ``cache``:
        the positions after those it holds, attending to them too). With ``keep``, also those
        after the first ``keep`` blocks: ``(final, kept)``."""
        before = cache.key_mask.long().sum(1, keepdim=True) if cache is not None and len(cache) else 0
        positions = (before + seq.key_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T); padding does not shift them
        if self.config.rotary == "2d":
            positions = pair_positions(positions, seq, self.config.token_grid, self.config.width // self.config.heads)
        key_mask, segments = seq.key_mask, seq.segment
        if cache is not None:
            key_mask, segments = cache.add(key_mask, segments)
        mask = self.attention_mask(segments, key_mask, seq.ids.shape[1])  # (B, 1, T, S)
        routing = Routing(seq.modality, self.parameter_sets, 2 if self.modulated else None, skip=~seq.key_mask)
        condition = self.image_condition(seq, cache) if self.config.image == "latent" else None  # once an image
        rows = routing.sort(self.embed(seq, condition))  # (B*T, W), grouped by modality between blocks
        kept = None
        for i, block in enumerate(self.blocks):
            rows = block(rows, routing, mask, positions, cache.blocks[i].self_attn if cache is not None else None,
                         condition if self.modulated else None)
            if keep == i + 1:
                kept = routing.unsort(rows)
        final = routing.unsort(routing.each(self.norms, lambda norm, y, m: self._final(norm(y), m, condition), rows))
        return final if keep is None else (final, kept)

    def image_condition(self, seq: Interleaved, cache: OmniCache | None = None) -> torch.Tensor:
        """Each image's condition ``(N, width)``, the images in the order of their tokens (every
        image of a batch whole: all its cells, one after the other): its timestep's, and with
        ``text_condition`` its text context's (:meth:`text_context`)."""
        steps = seq.timesteps[seq.modality == IMAGE].view(-1, self.config.image_tokens)[:, 0]
        condition = self.time_mlp(timestep_embedding(steps, self.config.width))
        if self.text_to_condition is not None:
            condition = condition + self.text_to_condition(self.text_context(seq, cache))
        return condition

    def text_context(self, seq: Interleaved, cache: OmniCache | None = None) -> torch.Tensor:
        """The mean input embedding of the real text tokens before each image in its row ``(N, width)``
        (the cached ones too, whose running sum the ``cache`` keeps): for a drawing, its prompt;
        for an image read first, ``<bos>`` alone, as for a prompt dropped for guidance."""
        text = ((seq.modality == TEXT) & seq.key_mask).unsqueeze(-1).to(self.token_embedding.weight.dtype)
        sums = (self.token_embedding(seq.ids) * text).cumsum(1)  # (B, T, W)
        counts = text.cumsum(1)  # (B, T, 1)
        if cache is not None:
            if cache.text_sum is not None:
                sums, counts = sums + cache.text_sum[:, None], counts + cache.text_count[:, None]
            cache.text_sum, cache.text_count = sums[:, -1], counts[:, -1]
        first = (seq.modality == IMAGE) & (seq.cell == 0)  # each image's first token, in token order
        return sums[first] / counts[first].clamp(min=1)

    def _final(self, y: torch.Tensor, modality: int, condition: torch.Tensor | None) -> torch.Tensor:
        if self.final_modulation is None or modality != IMAGE or condition is None or not len(condition):
            return y
        shift, scale = self.final_modulation(F.silu(condition)).chunk(2, -1)
        return modulate_images(y, scale, shift)

    def attention_mask(self, segments: torch.Tensor, key_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        """Who may attend to whom ``(B, 1, Tq, S)`` for keys with ``segments`` and ``key_mask`` ``(B, S)``,
        the queries being the last ``query_len``: causal across the sequence; for latent images
        bidirectional inside each image (vq codes are generated one after the other: causal
        everywhere). A padding query sees itself, so no row is empty."""
        if self.config.image == "vq":
            segments = torch.zeros_like(segments)
        return segment_mask(segments, key_mask=key_mask, query_len=query_len)

    def new_cache(self) -> OmniCache:
        return OmniCache(len(self.blocks))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(..., vocab)`` (text, and codes for vq): the embedding, tied."""
        return hidden @ self.token_embedding.weight.T

    def targets(self, seq: Interleaved) -> torch.Tensor:
        """The next-token label of each position ``(B, T)``, -100 where none is scored: padding;
        for latent images also every image position and ``<boi>`` (its next token is an image
        token, scored by the diffusion loss), so ``<eoi>`` is never predicted either (it follows
        an image by construction)."""
        keep = seq.key_mask[:, 1:] & seq.key_mask[:, :-1]
        if self.config.image == "latent":
            keep = keep & (seq.modality[:, 1:] == TEXT) & (seq.modality[:, :-1] == TEXT)
        labels = torch.full_like(seq.ids, -100)
        labels[:, :-1] = torch.where(keep, seq.ids[:, 1:], -100)
        return labels

    # ---- training ----

    def examples(self, batch: dict, rng: random.Random | None = None) -> list[OmniExample]:
        """The training examples of a data batch (``image`` and ``rows``): see :func:`examples_from_rows`;
        the images' tokens from the cache of :meth:`training_tokens`."""
        tokens = self.training_tokens(batch[self.config.image_field], batch["rows"])
        return examples_from_rows(batch["rows"], list(tokens), self.tokenizer, self.config, rng)

    def loss(self, batch: Sequence[OmniExample] | dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Next-token loss (with z-loss) and, for latent images, ``diffusion_weight`` times the
        diffusion loss. ``batch``: examples, or a data batch (images and rows, made into examples
        by :meth:`examples`). ``generator`` fixes the noise and timesteps (and the examples drawn)."""
        targets = None
        if isinstance(batch, dict):
            rng = random.Random(None if generator is None else generator.initial_seed())
            if self.aligner is not None:
                targets = self.alignment_targets(batch[self.config.image_field], batch["rows"])
            batch = self.examples(batch, rng)  # one example a row, each with its row's image
        c = self.config
        seq = self.pack(batch)
        images = seq.clean is not None and len(seq.clean) > 0
        if images:  # each image at its own timestep, up to its cap
            n, device = len(seq.clean), seq.clean.device
            t = self.diffusion.sample_timesteps(n, device, generator, cap=seq.max_timestep)
            noise = torch.randn(seq.clean.shape, device=device, generator=generator)
            seq = seq.with_images(self.diffusion.add_noise(seq.clean, noise, t), t)
        align = targets is not None and images
        if align:
            hidden, kept = self.forward(seq, keep=c.align_depth)  # (B, T, W) each
        else:
            hidden = self.forward(seq)  # (B, T, W)
        labels = self.targets(seq)
        scored = labels != -100
        logits = self.logits(hidden[scored]).float()  # (N, V): only positions with a label
        target = labels[scored]
        ce = F.cross_entropy(logits, target, reduction="none")
        next_token = ce.mean() if len(ce) else hidden.sum() * 0.0
        z = torch.logsumexp(logits, -1).pow(2).mean() if len(ce) else next_token
        out = {"loss": next_token + c.z_loss * z}
        is_text = target < self.text_vocab
        out["text_loss"] = ce[is_text].mean().detach() if is_text.any() else torch.tensor(float("nan"))
        out["token_accuracy"] = ((logits.argmax(-1) == target) & is_text).sum().detach() / is_text.sum().clamp(min=1)
        if c.image == "vq":
            out["image_loss"] = ce[~is_text].mean().detach() if (~is_text).any() else torch.tensor(float("nan"))
        elif images:
            prediction = self.patch_out(hidden.flatten(0, 1)[seq.image_index])  # (N, cells, C)
            diffusion = self.diffusion.loss(prediction, seq.clean, noise, t)
            out["loss"] = out["loss"] + c.diffusion_weight * diffusion
            out["diffusion_loss"] = diffusion.detach()
        if align:
            if len(targets) != len(seq.clean):
                raise ValueError(f"{len(targets)} alignment targets for {len(seq.clean)} images")
            predicted = self.aligner(kept.flatten(0, 1)[seq.image_index])  # (N, cells, C)
            similarity = F.cosine_similarity(predicted.float(), targets.to(predicted.device, torch.float), dim=-1)
            aligned = (1 - similarity).mean()
            out["loss"] = out["loss"] + c.align_weight * aligned
            out["align_loss"] = aligned.detach()
        out["z_loss"] = z.detach()
        return out

    # ---- the family (see polymodal.models.family) ----

    tasks = ("caption", "answer", "generate image")
    config_class = OmniConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = DEFAULT_SPLITS

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> OmniModel:
        """A tokenizer trained on the training split's captions, questions and answers; the
        autoencoder the recipe names (required), the image-token settings read from it and, for
        latent images, the scale that gives the training latents unit variance (unless set)."""
        spec = dict(spec)
        if spec.pop("init_from", None):
            raise ValueError("model.init_from: an omni model starts from its autoencoder and a new tokenizer")
        if spec.get("autoencoder") is None:
            raise ValueError("model.autoencoder: an omni model needs a saved autoencoder (vq for image: vq, "
                             "kl for image: latent)")
        autoencoder = Autoencoder.from_pretrained(spec["autoencoder"])
        a = autoencoder.config
        if build.image_size != a.image_size:
            raise ValueError(f"data.image_size is {build.image_size} but the autoencoder reads {a.image_size}x"
                             f"{a.image_size} images; set data.image_size: {a.image_size}")
        derived = {"latent_channels": a.latent_channels, "codebook_size": a.codebook_size,
                   "latent_grid": a.image_size // autoencoder.downsample, "image_size": a.image_size}
        for name, value in derived.items():
            if name in spec and spec[name] != value:
                raise ValueError(f"model.{name} is {spec[name]} but the autoencoder gives {value}; leave it out")
        # the image-token settings come from the autoencoder before the config checks what fits them
        config = OmniConfig.from_spec({**spec, **derived, "fields": spec.get("fields") or build.field_map()})
        if config.image == "latent" and config.latent_scale is None:  # unit-variance latents for diffusion
            with torch.no_grad():
                spread = autoencoder.encode(build.images(512)).std().clamp(min=1e-6)
            config = replace(config, latent_scale=float(1.0 / spread))
        tokenizer = build.tokenizer(config.caption_column, questions=config.qa_column)
        teacher = None
        if config.align_encoder is not None:
            # the registry of families, which holds this one
            from polymodal.models import load_model

            teacher = load_model(config.align_encoder)  # the model checks that it has a feature map
        return cls(replace(config, vocab_size=tokenizer.vocab_size), tokenizer, autoencoder, teacher)

    def fields(self) -> dict[str, str]:
        return dict(self.config.fields) or {self.config.image_field: "image"}

    def input_size(self) -> int:
        return self.config.image_size

    def validator(self, items: list[dict], fields) -> Validator:
        """Cheap scores of held-out items while training: the losses of (at most
        :data:`VALIDATION_LOSS_ITEMS`) validation items, their examples, noise and timesteps drawn
        from a fixed seed so one validation compares with the next (``text loss``, and ``image
        loss`` or ``diffusion loss``); and captions and answers of the first
        :data:`VALIDATION_WRITTEN_ITEMS` of them, scored as the captioner's validation scores its
        own (on the shapes world by the scene-graph judge too). Drawing is left to ``polymodal eval``."""
        from polymodal.data.dataset import Collator
        from polymodal.eval.datasets import dataset_metrics_of_rows
        from polymodal.eval.understanding import captioner_metrics

        scored, written = items[:VALIDATION_LOSS_ITEMS], items[:VALIDATION_WRITTEN_ITEMS]
        dataset = dataset_metrics_of_rows([item["row"] for item in written])
        names = {"text_loss": "text loss", "image_loss": "image loss", "diffusion_loss": "diffusion loss"}

        def validate(model: OmniModel) -> dict[str, float]:
            collate, sums, counts = Collator(fields), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
            for start in range(0, len(scored), 100):
                batch = collate(scored[start : start + 100])
                out = model.loss(batch, generator=torch.Generator().manual_seed(start))
                for key in names:
                    value = out.get(key)
                    if value is not None and torch.isfinite(value):
                        sums[key] += float(value) * len(batch["rows"])
                        counts[key] += len(batch["rows"])
            metrics = {names[k]: sums[k] / counts[k] for k in names if counts[k]}
            if written:
                metrics.update(captioner_metrics(AsCaptioner(model), written, fields, references=1, dataset=dataset))
            return metrics

        return validate

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """Every metric of the captioner (BLEU-4, CIDEr-D, VQA accuracy per question type, and on
        the shapes world the scene-graph judge of captions: :meth:`Captioner.evaluate
        <polymodal.models.captioner.Captioner.evaluate>`'s :func:`~polymodal.eval.understanding.captioner_metrics`)
        and, with ``options.judge``, every metric of the text-to-image family on the same splits
        (GenEval-style scores per category, ``overall``, the judge's accuracy on real images,
        Fréchet distance, CLIP score with ``options.clip``: :meth:`TextToImage.evaluate
        <polymodal.models.text_to_image.TextToImage.evaluate>` itself, which draws through
        :meth:`generate`), under the same keys. Without a judge images are not scored."""
        from polymodal.eval.datasets import dataset_metrics
        from polymodal.eval.understanding import captioner_metrics
        from polymodal.models.text_to_image import TextToImage

        if options.image_size not in (None, self.input_size()):
            raise ValueError(f"an omni model reads {self.input_size()}-pixel images (its autoencoder's), "
                             f"not {options.image_size}")
        fields, dataset, writer = self.fields(), dataset_metrics(data), AsCaptioner(self)
        results = evaluate_splits(
            data, splits, fields, self.input_size(),
            lambda items: captioner_metrics(writer, items, fields, decoding=options.decoding, beams=options.beams,
                                            examples=options.examples, dataset=dataset),
            limit=options.limit, progress=options.progress)
        if options.judge is None:
            log.info("no judge given (--judge): the images it draws are not scored")
            return results
        for split, metrics in TextToImage.evaluate(self, data, splits, options).items():
            results.setdefault(split, {}).update(metrics)
        return results

    # ---- saving ----

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The Transformer's weights: not the autoencoder's (saved in its own folder), nor the
        align encoder's and its predictor's (training only)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("autoencoder.", "teacher.", "aligner."))}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """``config.json``, the Transformer's weights, the tokenizer, and the autoencoder in
        ``autoencoder/``: the folder draws on its own, wherever it is moved."""
        def parts(folder: Path) -> None:
            self.tokenizer.save_pretrained(folder)
            if self.autoencoder is not None:
                self.autoencoder.save_pretrained(folder / AUTOENCODER_FOLDER)

        return write_model_folder(directory, {"model_type": "omni", **asdict(self.config)}, self.state_to_save(),
                                  extra=parts)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> OmniModel:
        """The model and its autoencoder, every config checked and the whole sized and matched with
        its weight files before anything is allocated (see :func:`~polymodal.models.family.load_saved`)."""
        directory = Path(directory)
        config = saved_config(directory, "omni", OmniConfig)
        tokenizer = read_tokenizer(directory)
        autoencoder_config, parts = None, {}
        if config.autoencoder is not None:
            if not (directory / AUTOENCODER_FOLDER).is_dir():
                raise InputError(directory, f"the model names an autoencoder but its {AUTOENCODER_FOLDER}/ folder is missing")
            autoencoder_config = saved_config(directory / AUTOENCODER_FOLDER, "autoencoder", AutoencoderConfig)
            try:
                check_autoencoder(config, autoencoder_config, directory / AUTOENCODER_FOLDER)
            except ValueError as e:
                raise InputError(directory / AUTOENCODER_FOLDER / "config.json", str(e)) from None
            parts[AUTOENCODER_FOLDER] = lambda m: m.autoencoder

        def build() -> OmniModel:
            return cls(config, tokenizer, Autoencoder(autoencoder_config) if autoencoder_config is not None else None)

        return load_saved(directory, build, parts=parts, saved=lambda m: m.state_to_save())


def check_autoencoder(config: OmniConfig, autoencoder: AutoencoderConfig, source: object) -> None:
    """The autoencoder gives the image tokens ``config`` expects: its kind, code or latent channels,
    and grid side. A ValueError naming ``source`` otherwise."""
    kind = "vq" if config.image == "vq" else "kl"
    grid = autoencoder.image_size // 2 ** (len(autoencoder.channels) - 1)
    problems = []
    if autoencoder.kind != kind:
        problems.append(f"image: {config.image} needs a {kind} autoencoder, not {autoencoder.kind}")
    if config.image == "vq" and autoencoder.codebook_size != config.codebook_size:
        problems.append(f"codebook_size {config.codebook_size} but the autoencoder has {autoencoder.codebook_size} codes")
    if config.image == "latent" and autoencoder.latent_channels != config.latent_channels:
        problems.append(f"latent_channels {config.latent_channels} but the autoencoder gives {autoencoder.latent_channels}")
    if grid != config.latent_grid:
        problems.append(f"latent_grid {config.latent_grid} but the autoencoder gives a {grid}x{grid} grid")
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}")
