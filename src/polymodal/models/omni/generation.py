"""Prompts, decoding and sampling of the omni model (:class:`OmniGeneration`, a part of
:class:`~polymodal.models.omni.model.OmniModel`): text decoded greedy, by beam search or with
nucleus sampling, images sampled as codes (vq) or denoised in place (latent), interleaved output,
each task's entry point (``write``, ``draw``, ``generate``), and :class:`AsCaptioner`, the model
as the captioner's scoring reads it. It reads the network through the model's own
``pack``, ``forward``, ``logits`` and ``patch_out``. The design: :mod:`polymodal.models.omni`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from polymodal.data.scene import caption_shows
from polymodal.models.family import check_best_of
from polymodal.models.omni.sequence import IMAGE, TEXT, Interleaved, OmniCache, Segment
from polymodal.nn import decoding
from polymodal.nn.diffusion import Guidance

CHOICE_FLOOR = 0.05  # draw(best_of=N): each prompt token's probability is raised by this much when the model
# reads its candidates, so one word its captions would not use there does not outweigh the rest. Chosen on
# validation prompts of two runs, each candidate judged: the best of 8 right 0.517 and 0.51 of the time
# overall, against 0.473 and 0.46 with no floor (BENCHMARKS.md, "Reading a prompt as the start of a caption")

CAPTION_SHOWS = {True: 2, None: 1, False: 0}  # choose: candidates whose own caption shows the prompt first, then
# those it cannot tell of, then those it contradicts (data.scene.caption_shows)

DRAW_ROWS = 800  # draw: images denoised in one batch at most (twice as many rows with guidance). On CPU-2 a
# sampler step cost 2.8 ms an image in batches of 800, 3.5 in 400 and 3.6 in one of 1,600 (best of 16 for
# 100 prompts; benchmarks/omni_draw_batch.py, median of 3)


def summed_log_probs(logp: torch.Tensor, real: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Each row's summed token log-probabilities ``(B,)`` from ``logp`` and its mask of real tokens
    ``real`` (both ``(B, L)``, as :meth:`OmniGeneration.caption_token_log_probs` gives them); with
    ``floor`` > 0, of ``log(p + floor)``, so no token costs more than ``-log(floor)``."""
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor is a probability added to each token's, in [0, 1); got {floor}")
    if floor:
        logp = (logp.exp() + floor).log()
    return torch.where(real, logp, 0.0).sum(1)


class OmniGeneration:
    """The generating half of :class:`~polymodal.models.omni.model.OmniModel`."""

    # ---- prompts ----

    def text_prompt(self, text: str) -> list[Segment]:
        """``<bos> text``: a prefix to continue, or to draw (``generate_image`` adds ``<boi>``)."""
        return [[self.tokenizer.bos_id, *self.tokenizer.encode(text, add_special_tokens=False)]]

    def image_prompt(self, image: torch.Tensor, question: str | None = None) -> list[Segment]:
        """``<bos> <boi> image <eoi> question <eos>``: a prefix whose continuation is the caption
        (no question) or the answer."""
        tok = self.tokenizer
        asked = tok.encode(question, add_special_tokens=False) if question else []
        return [[tok.bos_id], image, [*asked, tok.eos_id]]

    # ---- generation ----

    def _text_bias(self, allow_images: bool) -> torch.Tensor:
        """Added to the logits of text decoding: -inf on tokens it may not write (padding, <bos>,
        <eoi>, image codes, and <boi> unless images are allowed)."""
        tok = self.tokenizer
        bias = torch.zeros(self.vocab, device=self.device)
        banned = [tok.pad_id, tok.bos_id, tok.eoi_id] + ([] if allow_images else [tok.boi_id])
        bias[banned] = float("-inf")
        bias[self.text_vocab :] = float("-inf")
        return bias

    def _decode_text(self, prefixes: Sequence[Sequence[Segment]], allow_images: bool, method: str,
                     max_new_tokens: int, top_p: float, temperature: float, generator: torch.Generator | None,
                     use_cache: bool, beams: int = 4) -> list[list[int]]:
        tok = self.tokenizer
        if method not in decoding.METHODS:
            raise ValueError(f"an omni model decodes text {', '.join(decoding.METHODS)}, not {method!r}")
        if method == "beam" and beams < 1:
            raise ValueError(f"beams must be at least 1, got {beams}")
        prompt = self.pack(prefixes, side="left")
        rows = prompt.repeat_rows(beams) if method == "beam" else prompt  # beam search: row i's beams side by side
        t0 = prompt.ids.shape[1]
        bias = self._text_bias(allow_images)
        forced_eos = torch.full_like(bias, float("-inf"))
        forced_eos[tok.eos_id] = 0.0

        def step(ids: torch.Tensor, cache: OmniCache | None) -> torch.Tensor:  # (B, t) -> (B, vocab)
            if cache is None or not len(cache):  # the prompt and everything generated so far
                seq = rows.cat(self._tokens(ids[:, t0:], TEXT))
            else:  # only the new token
                seq = self._tokens(ids, TEXT)
            logits = self.logits(self.forward(seq, cache)[:, -1]) + bias
            if allow_images:  # a <boi> ends the row's text: answer it with <eos>, so the loop closes the row
                logits[ids[:, -1] == tok.boi_id] = forced_eos
            return logits

        max_new = min(max_new_tokens, self.config.context_length - t0)
        cache = self.new_cache() if use_cache else None
        ids, common = prompt.ids, dict(max_new=max(max_new, 0), eos=tok.eos_id, pad=tok.pad_id, cache=cache)
        if method == "greedy":
            return decoding.greedy(step, ids, **common)
        if method == "nucleus":
            return decoding.nucleus(step, ids, top_p=top_p, temperature=temperature, generator=generator, **common)
        return decoding.beam(step, ids, beams=beams, **common)

    @torch.no_grad()
    def generate_text(self, prefixes: Sequence[Sequence[Segment]], *, method: str = "greedy", max_new_tokens: int = 40,
                      top_p: float = 0.9, temperature: float = 1.0, generator: torch.Generator | None = None,
                      use_cache: bool = True, beams: int = 4) -> list[list[int]]:
        """The text token ids that follow each prefix, up to ``<eos>`` (not included): greedy, beam
        search (``beams`` beams a prefix, length-normalised) or nucleus, over text tokens only.
        With ``use_cache`` each step runs the new token only."""
        return self._decode_text(prefixes, False, method, max_new_tokens, top_p, temperature, generator, use_cache,
                                 beams)

    @torch.no_grad()
    def generate_image(self, prefixes: Sequence[Sequence[Segment]], *, guidance: float = 3.0, top_p: float = 0.9,
                       temperature: float = 1.0, steps: int = 50, sampler: str = "ddim", seed: int | None = 0,
                       generator: torch.Generator | None = None, use_cache: bool = True,
                       guidance_interval: tuple[int, int] | str | None = None, guidance_outside: float = 1.0,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """An image after each prefix (``<boi>`` is added): codes ``(B, g, g)`` (vq) or scaled
        latents ``(B, C, g, g)`` (latent); :meth:`decode_images` draws them.

        Classifier-free guidance mixes each prefix's prediction with that after ``<bos>`` alone
        (a dropped caption, as trained): ``uncond + guidance * (cond - uncond)``, on the code
        logits (vq) or the predicted noise (latent); 1.0 is no guidance. vq samples every code
        with top-p (greedy codes give blank images); latent runs ``steps`` steps of ``sampler``
        on the whole image block at once, the prefix computed once into the KV cache; ``progress(i)``
        is told each finished denoising step. ``guidance_interval`` (latent): ``(low, high)``
        timesteps outside which the scale is ``guidance_outside``
        (:class:`~polymodal.nn.diffusion.Guidance`); default: ``guidance`` at every step."""
        if not prefixes:
            raise ValueError("no prefixes to draw after")
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        if self.config.image == "vq" and guidance_interval is not None:
            raise ValueError("a guidance interval is a range of diffusion timesteps: it is for latent images; "
                             "a vq model samples its codes")
        steps_of_noise = self.diffusion.config.train_steps if self.config.image == "latent" else 1000
        schedule = Guidance.of(guidance, guidance_interval, guidance_outside, steps_of_noise)
        tok, b = self.tokenizer, len(prefixes)
        guided = schedule.active
        rows = [*prefixes, *[[[tok.bos_id]]] * b * guided]  # each prefix, then as many unconditional ones
        prompt = self.pack(rows, side="left", open_image=True)
        if self.config.image == "vq":
            return self._sample_codes(prompt, b, guided, guidance, top_p, temperature, generator, use_cache)
        return self._denoise(prompt, b, schedule, steps, sampler, generator, use_cache, progress)

    def _sample_codes(self, prompt: Interleaved, b: int, guided: bool, guidance: float, top_p: float,
                      temperature: float, generator: torch.Generator, use_cache: bool) -> torch.Tensor:
        t0, offset, g = prompt.ids.shape[1], self.text_vocab, self.config.token_grid

        def step(codes: torch.Tensor, cache: OmniCache | None) -> torch.Tensor:  # (B, t) of the guided rows
            if cache is None or not len(cache):
                new = codes[:, t0:]
                rows = torch.cat([new, new]) if guided else new
                seq, first = prompt, 0
            else:
                rows = torch.cat([codes, codes]) if guided else codes
                seq, first = None, len(cache) - t0  # the cell of the first new code
            part = self._tokens(rows + offset, IMAGE, first_cell=first)
            seq = part if seq is None else seq.cat(part)
            logits = self.logits(self.forward(seq, cache)[:, -1])[:, offset:]  # (B | 2B, codebook)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            return logits

        cache = self.new_cache() if use_cache else None
        # the guided rows' prompt ids (only its length matters: the step reads the prompt itself)
        codes = decoding.nucleus(step, prompt.ids[:b], max_new=g * g, eos=None, pad=0, top_p=top_p,
                                 temperature=temperature, generator=generator, cache=cache)
        return torch.tensor(codes, dtype=torch.long, device=self.device).view(b, g, g)

    def _denoise(self, prompt: Interleaved, b: int, schedule: Guidance, steps: int, sampler: str,
                 generator: torch.Generator, use_cache: bool,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
        c, guided = self.config, schedule.active
        scheduler = self.diffusion.sampler(sampler, steps)
        segment = int(prompt.segment.max()) + 1  # a new image of every row
        cache = self.new_cache() if use_cache else None
        if cache is not None:
            self.forward(prompt, cache)  # the prefix, once
        x = torch.randn((b, c.image_tokens, c.token_channels), device=self.device, generator=generator)
        for i, t in enumerate(scheduler.timesteps):
            block = self._latent_block(torch.cat([x, x]) if guided else x, int(t), segment)
            if cache is not None:  # the block attends to the cached prefix; the cache forgets it again
                state = cache.snapshot()
                hidden = self.forward(block, cache)
                cache.restore(state)
            else:
                hidden = self.forward(prompt.cat(block))[:, prompt.ids.shape[1]:]
            noise = self.patch_out(hidden)  # (B | 2B, cells, C)
            if guided:
                cond, uncond = noise.chunk(2)
                noise = uncond + schedule.at(t) * (cond - uncond)
            x = scheduler.step(noise, t, x, generator=generator).prev_sample
            if progress:
                progress(i + 1)
        return x.transpose(1, 2).reshape(b, c.token_channels, c.token_grid, c.token_grid)

    @torch.no_grad()
    def generate_interleaved(self, prefixes: Sequence[Sequence[Segment]], *, max_new_tokens: int = 40, max_images: int = 1,
                 method: str = "greedy", top_p: float = 0.9, temperature: float = 1.0, guidance: float = 3.0,
                 steps: int = 50, seed: int | None = 0, use_cache: bool = True,
                 after_image: Sequence[int] | None = None, open_image: bool = False,
                 guidance_interval: tuple[int, int] | str | None = None,
                 guidance_outside: float = 1.0) -> list[list[Segment]]:
        """Interleaved output after each prefix: text until the model writes ``<boi>``, then an
        image drawn in place (:meth:`generate_image`, its prefix everything so far), then text
        again, until ``<eos>``, ``max_new_tokens`` text tokens or ``max_images`` images. Returns
        each row's new segments (text ids and images).

        ``after_image``: text ids put after each drawn image before the model writes again (a
        turn of the user's in the sequence): ``[<eos>]`` asks for a caption of what was drawn, as
        image-first training rows read ``<boi> image <eoi> <eos> caption``; ``question <eos>``
        asks a question about it. They are among the returned segments, and not counted in
        ``max_new_tokens``. ``open_image``: the prefix is what to draw, so the first image comes
        right after it, with no text written before it."""
        generator = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        boi = self.tokenizer.boi_id
        after = list(after_image or [])
        framed = self.config.image_tokens + 2  # an image with its <boi> and <eoi>

        def length(segments) -> int:
            return sum(framed if isinstance(s, torch.Tensor) else len(s) for s in segments)

        results = []
        for prefix in prefixes:
            context, out, written, drawn = list(prefix), [], 0, 0
            while written < max_new_tokens:
                # an image only where it, and the turn after it, still fit the context
                room = length(context) + framed + len(after) <= self.config.context_length
                may_draw = drawn < max_images and room
                if open_image and not out and may_draw:
                    ids = [boi]
                else:
                    ids = self._decode_text([context], may_draw, method, max_new_tokens - written, top_p, temperature,
                                            generator, use_cache)[0]
                image = bool(ids) and ids[-1] == boi
                text = ids[:-1] if image else ids
                written += len(text)
                if text:
                    out.append(text)
                    context.append(text)
                if not image:
                    break
                picture = self.generate_image([context], guidance=guidance, top_p=top_p, temperature=temperature,
                                              steps=steps, generator=generator, use_cache=use_cache,
                                              guidance_interval=guidance_interval,
                                              guidance_outside=guidance_outside)[0]
                out.append(picture)
                context.append(picture)
                drawn += 1
                if after:
                    out.append(list(after))
                    context.append(list(after))
            results.append(out)
        return results

    # ---- each task's entry point (as the captioner's and the text-to-image family's) ----

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, object] | Sequence[str] | Sequence[Sequence[Segment]],
                 prompts: Sequence[str | None] | None = None, **options) -> list[str] | torch.Tensor | list[list[Segment]]:
        """Whatever ``inputs`` asks for, in the form each task's callers expect:

        - a data batch (a dict with images; ``prompts``: a question per image, or None to caption
          it): the text written for each image, as :meth:`Captioner.generate
          <polymodal.models.captioner.Captioner.generate>` returns it (:meth:`write`);
        - prompt strings: images ``(B, 3, S, S)`` in [-1, 1], as :meth:`TextToImage.generate
          <polymodal.models.text_to_image.TextToImage.generate>` draws them (:meth:`draw`);
        - prefixes (lists of segments): interleaved output (:meth:`generate_interleaved`).

        The command line, the server and the evaluators call a model's ``generate`` by the task
        it was loaded for; one model that does three tasks answers all three."""
        if isinstance(inputs, Mapping):
            return self.write(inputs, prompts, **options)
        if prompts is not None:
            raise ValueError("questions (prompts) go with a batch of images; to draw, pass the prompts alone")
        if isinstance(inputs, str):
            raise ValueError("pass a list of prompts to draw, not one string")
        if inputs and all(isinstance(p, str) for p in inputs):
            return self.draw(list(inputs), **options)
        return self.generate_interleaved(inputs, **options)

    def _image_field(self) -> str:
        """The batch field holding the images the model reads."""
        return next((name for name, spec in self.fields().items() if spec.partition(":")[0] == "image"),
                    self.config.image_field)

    @torch.no_grad()
    def write(self, batch: Mapping[str, object], prompts: Sequence[str | None] | None = None, *, method: str = "greedy",
              top_p: float = 0.9, temperature: float = 1.0, max_new_tokens: int = 40,
              generator: torch.Generator | None = None, use_cache: bool = True, beams: int = 4) -> list[str]:
        """The caption of each image of ``batch`` (no prompt) or the answer to its question,
        decoded greedy, with beam search or with nucleus sampling; each sequence ``<bos> <boi>
        image <eoi> question <eos>`` as the model was trained on."""
        name = self._image_field()
        images = batch.get(name)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"the batch has no {name!r} images to write about")
        prompts = list(prompts) if prompts is not None else [None] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for a batch of {len(images)} images")
        tokens = self.image_tokens(images.to(self.device))
        prefixes = [self.image_prompt(t, q) for t, q in zip(tokens, prompts, strict=True)]
        ids = self.generate_text(prefixes, method=method, max_new_tokens=max_new_tokens, top_p=top_p,
                                 temperature=temperature, generator=generator, use_cache=use_cache, beams=beams)
        return [self.tokenizer.decode(seq) for seq in ids]

    def prompt_ids(self, prompts: Sequence[str | None], device: torch.device | str = "cpu") -> torch.Tensor:
        """The ids of each prefix :meth:`write` reads, ``<bos> <boi> image <eoi> question <eos>``,
        left-padded ``(B, T)``, the image as ``<pad>`` placeholders: what a caller measures a
        question against ``context_length`` with (the captioner's ``prompt_ids``)."""
        tok = self.tokenizer
        image = [tok.boi_id, *[tok.pad_id] * self.config.image_tokens, tok.eoi_id]
        rows = [[tok.bos_id, *image, *(tok.encode(q, add_special_tokens=False) if q else []), tok.eos_id]
                for q in prompts]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), tok.pad_id, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, longest - len(row):] = torch.tensor(row, device=device)
        return ids

    def _caption_ids(self, text: str) -> list[int]:
        """A prompt's or caption's text ids, cut as :func:`examples_from_rows` cuts captions."""
        return self.tokenizer.encode(text, add_special_tokens=False)[: self.config.caption_tokens]

    @torch.no_grad()
    def caption_token_log_probs(self, images: torch.Tensor, texts: Sequence[str], *,
                                closed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probability of each token of each text as the caption of its image, read after
        ``<bos> <boi> image <eoi> <eos>`` as image-first training rows are (over text tokens only,
        as text is decoded), and with ``closed`` of the ``<eos>`` that ends it: ``(B, L)`` and the
        mask of real tokens ``(B, L)`` (the texts' lengths differ). ``images``: image tokens as
        :meth:`generate_image` gives them, codes ``(B, g, g)`` or scaled latents ``(B, C, g, g)``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        tok = self.tokenizer
        ids = [self._caption_ids(t) + ([tok.eos_id] if closed else []) for t in texts]
        seq = self.pack([[[tok.bos_id], image, [tok.eos_id, *row]] for image, row in zip(images, ids, strict=True)])
        start = 3 + self.config.image_tokens  # the <eos> after <eoi>: where the caption's first token is predicted
        longest = max(len(row) for row in ids)
        target = torch.full((len(ids), longest), tok.pad_id, dtype=torch.long, device=self.device)
        for i, row in enumerate(ids):
            target[i, : len(row)] = torch.tensor(row, device=self.device)
        hidden = self.forward(seq)[:, start : start + longest]  # rows are packed on the right: all start at 0
        logp = (self.logits(hidden) + self._text_bias(False)).log_softmax(-1)
        real = target != tok.pad_id
        return torch.where(real, logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), 0.0), real

    @torch.no_grad()
    def caption_log_likelihood(self, images: torch.Tensor, texts: Sequence[str], *, closed: bool = True,
                               floor: float = 0.0) -> torch.Tensor:
        """How likely the model finds each text as the caption of its image ``(B,)``: the summed
        log-probability of its tokens (:meth:`caption_token_log_probs`). ``closed=False`` leaves
        out the closing ``<eos>``: how likely the text is as what the caption says, not as all it
        says (a caption names every object, so its ``<eos>`` counts against an image with anything
        more in it). ``floor`` > 0 sums ``log(p + floor)``: a word the model's own captions would
        not use there (a prompt worded unlike them) costs at most ``-log(floor)``, so one such word
        does not outweigh the rest (:func:`summed_log_probs`)."""
        return summed_log_probs(*self.caption_token_log_probs(images, texts, closed=closed), floor)

    @torch.no_grad()
    def draw(self, prompts: Sequence[str], *, guidance: float = 3.0, steps: int = 50, sampler: str = "ddim",
             seed: int | None = 0, generator: torch.Generator | None = None, compose: bool = False,
             top_p: float = 0.9, temperature: float = 1.0, guidance_interval: tuple[int, int] | str | None = None,
             guidance_outside: float = 1.0, best_of: int = 1,
             progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1], one for each prompt: :meth:`generate_image` after
        ``<bos> prompt`` (cut to the caption length of training), drawn by the autoencoder. The
        same ``seed`` draws the same images; ``steps`` and ``sampler`` concern latent images.

        ``best_of`` N > 1: N images are drawn for each prompt and the model keeps one by its own
        reading of the pictures (:meth:`choose`): one its own caption says shows the prompt, the
        one whose caption the prompt's words are likeliest to begin (a prompt says what a picture
        must show, not all it shows, and is not worded as the model's captions are): the model
        checks its drawings as it captions images, at N times the cost of drawing. Images are
        denoised :data:`DRAW_ROWS` at a time, one stream of noise from ``seed`` (or
        ``generator``) running through the batches."""
        if compose:
            raise ValueError("compose: an omni model reads a prompt as one caption; drawing 'and'-joined parts as a "
                             "conjunction is for text-to-image models")
        if not prompts:
            raise ValueError("no prompts to draw")
        check_best_of(self, best_of)
        asked = [p for p in prompts for _ in range(best_of)]  # each prompt's candidates side by side
        ids = [self._caption_ids(p) for p in prompts]
        prefixes = [[[self.tokenizer.bos_id, *ids[i // best_of]]] for i in range(len(asked))]
        if generator is None:  # one stream of noise through every batch
            generator = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        starts = range(0, len(prefixes), DRAW_ROWS)
        tokens = torch.cat([self.generate_image(
            prefixes[start : start + DRAW_ROWS], guidance=guidance, steps=steps, sampler=sampler, generator=generator,
            top_p=top_p, temperature=temperature, guidance_interval=guidance_interval,
            guidance_outside=guidance_outside,
            progress=progress and (lambda i, j=j: progress((j * steps + i) // len(starts))))
            for j, start in enumerate(starts)])
        if progress and self.config.image == "vq":  # codes are sampled, not denoised: all steps are done
            progress(steps)
        images = torch.cat([self.decode_images(tokens[start : start + DRAW_ROWS])
                            for start in range(0, len(tokens), DRAW_ROWS)])
        return images[self.choose(images, asked, best_of)] if best_of > 1 else images

    @torch.no_grad()
    def shows_prompts(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """How far the model's own caption of each image (greedy) shows its prompt ``(B,)``:
        :data:`CAPTION_SHOWS` of :func:`~polymodal.data.scene.caption_shows` (2 shows it, 1
        cannot tell, 0 contradicts it). ``images``: image tokens, as :meth:`caption_log_likelihood`
        reads them."""
        captions = [self.tokenizer.decode(ids) for ids in self.generate_text([self.image_prompt(t) for t in images])]
        return torch.tensor([CAPTION_SHOWS[caption_shows(c, p)] for c, p in zip(captions, prompts, strict=True)])

    @torch.no_grad()
    def choose(self, images: torch.Tensor, prompts: Sequence[str], best_of: int) -> torch.Tensor:
        """Which picture to keep of each prompt's ``best_of`` (``images`` ``(B, 3, S, S)`` in
        [-1, 1] and ``prompts``, each prompt's candidates side by side, as :meth:`draw` draws
        them): the indices ``(B / best_of,)`` into ``images``. The model reads each picture as it
        reads any image (encoded by its autoencoder: what the pixels show, not the latents it
        drew) and checks its own caption against the prompt (:meth:`shows_prompts`). The pictures
        whose caption shows the prompt come first, then those whose caption cannot tell, then
        those it contradicts; within the first such group the one kept is the one whose caption
        the prompt's words are likeliest to begin (:meth:`caption_log_likelihood`, not
        ``closed``, each token floored at :data:`CHOICE_FLOOR`)."""
        if len(images) != len(prompts) or not prompts or len(prompts) % best_of:
            raise ValueError(f"{len(images)} pictures for {len(prompts)} prompts, not {best_of} for each prompt")
        scores, shown = [], []
        for start in range(0, len(images), DRAW_ROWS):
            read, asked = self.image_tokens(images[start : start + DRAW_ROWS]), prompts[start : start + DRAW_ROWS]
            scores.append(self.caption_log_likelihood(read, asked, closed=False, floor=CHOICE_FLOOR))
            shown.append(self.shows_prompts(read, asked))
        scores = torch.cat(scores).view(-1, best_of)
        shown = torch.cat(shown).to(scores.device).view(-1, best_of)
        scores = scores.masked_fill(shown < shown.max(1, keepdim=True).values, float("-inf"))
        return scores.argmax(1) + torch.arange(len(scores), device=scores.device) * best_of


class AsCaptioner:
    """An omni model as :func:`polymodal.eval.understanding.captioner_metrics` reads a captioner:
    a ``config`` that says it captions and answers questions (``tasks``), in which columns, and
    that it hears no speech (no audio ``encoders``); ``generate`` is the model's own
    (:meth:`OmniModel.write` for a batch of images). So captions and answers are scored by the
    captioner's code, not a copy of it."""

    def __init__(self, model: OmniGeneration):
        from types import SimpleNamespace

        self.model = model
        self.config = SimpleNamespace(tasks=("caption", "vqa"), encoders={}, caption_column=model.config.caption_column,
                                      qa_column=model.config.qa_column)

    def eval(self) -> AsCaptioner:
        self.model.eval()
        return self

    def generate(self, batch: dict, prompts: Sequence[str | None] | None = None, **options) -> list[str]:
        return self.model.write(batch, prompts, **options)
