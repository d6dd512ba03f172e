"""Text from images or sound: encoders, and an autoregressive text decoder that cross-attends.

One model serves captioning (image -> caption), audio captioning (speech or sound -> text)
and visual question answering (image + question -> answer, generated as text). Every input
field has a tower (:class:`~polymodal.nn.tower.Tower`): an encoder whose token states,
projected to the decoder's width and tagged with a modality embedding (and learned positions,
for an image encoder's tokens), are the *memory* the decoder reads at every layer.

A decoded sequence is ``<bos> prompt <eos> target <eos>``: for a caption the prompt is empty,
for VQA it is the question. The decoder reads the prompt with causal self-attention (the
question also attends to the image through the cross-attention) and the loss counts only the
target and its closing ``<eos>``. A training image gives a caption or one of its row's
questions, drawn by the weights in ``tasks``, or (``every_task_per_sample``) its caption and all
its questions at once: the encoder's work on an image then serves several sequences.

Decoding (:mod:`polymodal.nn.decoding`): greedy, beam search (length-normalised) and nucleus
sampling, each step one new position against a KV cache; prompts are left-padded so every
sequence of a batch grows at the same place, and the pads stay masked in the cache.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.data.dataset import DEFAULT_COLUMNS
from polymodal.modalities.text import TextTokenizer
from polymodal.models.family import (
    DEFAULT_SPLITS,
    BuildContext,
    EvalOptions,
    Validator,
    check_encoder_specs,
    encoder_fields,
    encoder_image_size,
    evaluate_splits,
    load_saved,
    saved_config,
)
from polymodal.models.folder import read_tokenizer, write_model_folder
from polymodal.nn import decoding
from polymodal.nn.encoders import INPUT_KIND, build_encoder
from polymodal.nn.layers import KVCache, Transformer
from polymodal.nn.tower import Tower, copy_matching_encoders

TASKS = ("caption", "vqa")
DECODING = decoding.METHODS


@dataclass
class CaptionerConfig:
    encoders: dict[str, dict] = field(default_factory=lambda: {"image": {"type": "cnn", "preset": "small"}},
                                      metadata={"check": check_encoder_specs})
    # batch field -> encoder spec; the decoder attends to the tokens of all of them
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    # caption | vqa -> share of training samples
    caption_column: str = "text"  # metadata column with the text to write for "caption"
    qa_column: str = "qa"  # metadata column with [{"question", "answer", "type"}, ...] for "vqa"
    width: int = 256  # decoder width
    depth: int = 3  # decoder blocks (each: causal self-attention, cross-attention, MLP)
    heads: int = 4
    context_length: int = 64  # longest decoded sequence, prompt included
    vocab_size: int | None = None  # of the tokenizer (None: whatever the tokenizer has; the builder records it)
    max_memory_tokens: int = 512  # learned positions for encoder tokens (images; audio has its own)
    freeze_encoders: bool = False  # keep (pretrained) encoders fixed; train only the decoder
    every_task_per_sample: bool = False  # train on each image's caption and its questions in one
    # step (the encoders run once per image); otherwise one of them, drawn by the task weights
    questions_per_sample: int | None = None  # with every_task_per_sample: at most this many of an
    # image's questions, drawn at random each time (None: all of them)
    fields: dict[str, str] = field(default_factory=dict)  # data fields read (name -> "modality[:column]");
    # empty: each encoder's name, with its input kind's default column
    ctc: float = 0.0  # weight of a CTC loss on the audio encoder's tokens predicting the caption (joint
    # CTC-attention training: the monotonic alignment it teaches the encoder makes the decoder's
    # cross-attention learn in far fewer steps; decoding stays the decoder's). Needs one audio encoder.

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
        if any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError("task weights must be non-negative and not all zero")
        if not self.encoders:
            raise ValueError("a captioner needs at least one encoder")
        for name, spec in self.encoders.items():
            if INPUT_KIND.get(spec.get("type")) not in ("image", "audio"):
                raise ValueError(f"encoder {name!r}: type {spec.get('type')!r} is not an image or audio encoder")
        if self.ctc < 0:
            raise ValueError(f"ctc is a loss weight, at least 0; got {self.ctc}")
        if self.ctc and "caption" not in self.tasks:
            raise ValueError("ctc trains on captions: it needs the caption task")
        if self.ctc and [INPUT_KIND.get(s.get("type")) for s in self.encoders.values()] != ["audio"]:
            raise ValueError("ctc needs exactly one encoder, an audio encoder (speech recognition)")


class Captioner(nn.Module):
    def __init__(self, config: CaptionerConfig, tokenizer: TextTokenizer):
        super().__init__()
        if config.vocab_size is not None and tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens; the config says vocab_size "
                             f"{config.vocab_size}")
        self.config = c = config
        self.tokenizer = tokenizer
        self.names = list(c.encoders)
        # Every encoder is built before any projection (the initialisation the models measured in
        # BENCHMARKS.md had); image tokens get learned positions, audio tokens have their own.
        encoders = {n: build_encoder(spec) for n, spec in c.encoders.items()}
        self.towers = nn.ModuleDict({
            n: Tower(n, spec, encoder=encoders[n], out_dim=c.width, modality_embedding=True,
                     positions=0 if INPUT_KIND[spec["type"]] == "audio" else c.max_memory_tokens,
                     frozen=c.freeze_encoders)
            for n, spec in c.encoders.items()})
        self.memory_norm = nn.LayerNorm(c.width)
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.randn(c.context_length, c.width) * 0.01)
        # causal self-attention, cross-attention to the memory, MLP; in every block
        self.decoder = Transformer(c.width, c.depth, c.heads, cross_attention=True)
        self.norm = nn.LayerNorm(c.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if c.ctc:  # every token, and the blank (the last class)
            self.ctc_head = nn.Linear(c.width, tokenizer.vocab_size + 1)

    def init_encoders_from(self, other) -> list[str]:
        """Copy each encoder from a tower of a contrastive model with the identical spec."""
        return [f"{n}<-{m}" for n, m in copy_matching_encoders(self.towers, other.towers)]

    # ---- memory: the encoders' token states ----

    def _keys(self, name: str, batch: dict) -> list | None:
        """The file each row's input to tower ``name`` came from: the key of its cached features
        while the encoders are frozen (``freeze_encoders``), so each image is encoded once and
        training then runs at the speed of the decoder."""
        rows = batch.get("rows")
        if rows is None or not self.towers[name].frozen:
            return None
        return [r.get(DEFAULT_COLUMNS[INPUT_KIND[self.config.encoders[name]["type"]]]) for r in rows]

    def memory(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, M, width)`` token states of every input the batch has, and their mask ``(B, M)``."""
        states, masks = [], []
        for n in self.names:
            if n in batch:
                x, mask = self.towers[n].tokens(batch, self._keys(n, batch))  # (B, T_n, width), (B, T_n)
                states.append(x)
                masks.append(mask)
        if not states:
            raise ValueError(f"the batch has none of this model's inputs {self.names}")
        return self.memory_norm(torch.cat(states, 1)), torch.cat(masks, 1)

    # ---- the decoder ----

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab)`` for token ids ``(B, T)`` (padding anywhere, mask True on tokens).

        With a ``cache`` (from ``self.decoder.new_cache()``), ``ids`` are the tokens after those
        it holds: only they are computed, attending to the cached ones.
        """
        before = cache.key_mask.long().sum(1, keepdim=True) if cache is not None and len(cache) else 0  # (B, 1)
        positions = (before + mask.long().cumsum(1) - 1).clamp(min=0)  # left padding does not shift positions
        x = self.token_embedding(ids) + self.position_embedding[positions]  # (B, T, width)
        x = self.decoder(x, mask, causal=True, context=memory, context_mask=memory_mask, cache=cache)
        return self.norm(x) @ self.token_embedding.weight.T

    # ---- sequences ----

    def _prefix(self, prompt: str | None) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_id, *(tok.encode(prompt, add_special_tokens=False) if prompt else []), tok.eos_id]

    def examples(self, rows: list[dict], rng: random.Random | None = None) -> list[tuple[str | None, str]]:
        """One (prompt, target) per row: its caption or one of its questions, by the task weights."""
        rng = rng or random
        tasks = list(self.config.tasks)
        weights = [self.config.tasks[t] for t in tasks]
        out = []
        for row in rows:
            task = rng.choices(tasks, weights)[0] if len(tasks) > 1 else tasks[0]
            qa = row.get(self.config.qa_column) or []
            if task == "vqa" and qa:
                item = rng.choice(qa)
                out.append((item["question"], item["answer"]))
            elif "caption" in tasks or not qa:
                out.append((None, row[self.config.caption_column]))
            else:
                raise ValueError(f"row {row.get('id')!r} has no {self.config.qa_column!r} questions")
        return out

    def every_example(self, rows: list[dict], rng: random.Random | None = None
                      ) -> tuple[list[tuple[str | None, str]], list[int]]:
        """Every (prompt, target) of each row that the tasks ask for (at most
        ``questions_per_sample`` questions each), and the row of each."""
        pairs, owner = [], []
        for i, row in enumerate(rows):
            mine = [(None, row[self.config.caption_column])] if "caption" in self.config.tasks else []
            if "vqa" in self.config.tasks:
                qa = list(row.get(self.config.qa_column) or [])
                k = self.config.questions_per_sample
                if k is not None and len(qa) > k:
                    qa = (rng or random).sample(qa, k)
                mine += [(q["question"], q["answer"]) for q in qa]
            pairs += mine
            owner += [i] * len(mine)
        return pairs, owner

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        memory, memory_mask = self.memory(batch)
        if self.config.every_task_per_sample:
            pairs, owner = self.every_example(batch["rows"])
            index = torch.tensor(owner, device=memory.device)
            memory, memory_mask = memory[index], memory_mask[index]
        else:
            pairs = self.examples(batch["rows"])
        tok, limit = self.tokenizer, self.config.context_length
        rows, starts, targets = [], [], []
        for prompt, target in pairs:
            prefix = self._prefix(prompt)
            targets.append(tok.encode(target, add_special_tokens=False))
            seq = (prefix + targets[-1] + [tok.eos_id])[:limit]
            rows.append(seq)
            starts.append(len(prefix))
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        for i, (seq, start) in enumerate(zip(rows, starts, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, start - 1 : len(seq) - 1] = torch.tensor(seq[start:])  # predict target and final <eos>
        ids, labels = ids.to(memory.device), labels.to(memory.device)
        logits = self.decode(ids, ids != tok.pad_id, memory, memory_mask)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        scored = labels != -100
        accuracy = ((logits.argmax(-1) == labels) & scored).sum() / scored.sum().clamp(min=1)
        out = {"loss": loss, "token_accuracy": accuracy.detach()}
        if self.config.ctc:
            captioned = [prompt is None for prompt, _ in pairs]
            out["ctc"] = self.ctc_loss(memory, memory_mask, [ids for ids, c in zip(targets, captioned, strict=True) if c], captioned)
            out["loss"] = loss + self.config.ctc * out["ctc"]
            out["ctc"] = out["ctc"].detach()
        return out

    def ctc_loss(self, memory: torch.Tensor, memory_mask: torch.Tensor, targets: list[list[int]],
                 captioned: list[bool]) -> torch.Tensor:
        """CTC loss of the audio tokens ``memory`` (B, T, width) against the caption token ids ``targets`` of
        the rows marked ``captioned``; rows whose caption has more tokens than the audio has
        frames cannot be aligned and are left out (``zero_infinity``)."""
        keep = torch.tensor(captioned, device=memory.device)
        if not keep.any():  # zero, through the head: under DDP every parameter must take part in each step
            return self.ctc_head(memory[:0]).sum() * 0.0
        logp = F.log_softmax(self.ctc_head(memory[keep]).float(), -1).transpose(0, 1)  # (T, B', V + 1)
        encoded = [ids[: self.config.context_length] for ids in targets]
        flat = torch.tensor([i for ids in encoded for i in ids], dtype=torch.long, device=memory.device)
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long, device=memory.device)
        frames = memory_mask[keep].long().sum(1)
        return F.ctc_loss(logp, flat, frames, lengths, blank=self.tokenizer.vocab_size, zero_infinity=True)

    # ---- generation ----

    @torch.no_grad()
    def generate(self, batch: dict, prompts: list[str | None] | None = None, *, method: str = "greedy",
                 beams: int = 4, top_p: float = 0.9, temperature: float = 1.0, max_new_tokens: int = 40,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> list[str]:
        """Text for each sample of ``batch`` (after its prompt, if any): greedy, beam or nucleus.

        ``use_cache``: each step runs the decoder on the new token only, reading the keys and
        values of the earlier ones from a KV cache (off: on the whole sequence, the same tokens).
        """
        if method not in DECODING:
            raise ValueError(f"unknown decoding {method!r}; choose from {DECODING}")
        memory, memory_mask = self.memory(batch)
        b = memory.shape[0]
        prompts = prompts if prompts is not None else [None] * b
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for a batch of {b}")
        ids = self.prompt_ids(prompts, memory.device)
        max_new = min(max_new_tokens, self.config.context_length - ids.shape[1])
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        if method == "beam":  # each sample's memory serves its beams
            memory, memory_mask = memory.repeat_interleave(beams, 0), memory_mask.repeat_interleave(beams, 0)

        def step(new_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:  # (B, t) -> (B, vocab)
            return self.decode(new_ids, new_ids != pad, memory, memory_mask, cache)[:, -1]

        cache = self.decoder.new_cache() if use_cache else None
        if method == "beam":
            out = decoding.beam(step, ids, beams=beams, max_new=max_new, eos=eos, pad=pad, cache=cache)
        elif method == "nucleus":
            out = decoding.nucleus(step, ids, max_new=max_new, eos=eos, pad=pad, top_p=top_p,
                                   temperature=temperature, generator=generator, cache=cache)
        else:
            out = decoding.greedy(step, ids, max_new=max_new, eos=eos, pad=pad, cache=cache)
        return [self.tokenizer.decode(seq) for seq in out]

    def prompt_ids(self, prompts: list[str | None], device: torch.device | str = "cpu") -> torch.Tensor:
        """``<bos> prompt <eos>`` of each sample, left-padded so every sequence grows at the right end."""
        prefixes = [self._prefix(p) for p in prompts]
        longest = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), longest), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prefixes):
            ids[i, longest - len(p):] = torch.tensor(p, device=device)
        return ids

    # ---- the family (see polymodal.models.family) ----

    tasks = ("caption", "answer")
    config_class = CaptionerConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = DEFAULT_SPLITS

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> Captioner:
        """A tokenizer trained on the training split's captions (and questions and answers, for
        VQA); the recipe's fields remembered for evaluation; with ``init_from`` (a saved
        contrastive model), encoders with the same spec as one of its towers start from it."""
        from polymodal.models.clip import start_encoders_from

        spec = dict(spec)
        init_from = spec.pop("init_from", None)
        if "encoders" in spec:
            spec["encoders"] = build.sized(spec["encoders"], "model.encoders")
        config = CaptionerConfig(**{**spec, "fields": spec.get("fields") or build.field_map()})
        tokenizer = build.tokenizer(questions=config.qa_column if "vqa" in config.tasks else None)
        model = cls(replace(config, vocab_size=tokenizer.vocab_size), tokenizer)
        start_encoders_from(model, init_from)
        return model

    def fields(self) -> dict[str, str]:
        return encoder_fields(self.config.encoders, self.config.fields)

    def input_size(self) -> int:
        return encoder_image_size(self.config.encoders)

    def validator(self, items: list[dict], fields) -> Validator:
        """Decoded captions and answers of (at most 250) validation items, judged (on the shapes
        world by its scene-graph judge too: :func:`polymodal.eval.datasets.dataset_metrics_of_rows`)."""
        from polymodal.eval.datasets import dataset_metrics_of_rows
        from polymodal.eval.understanding import captioner_metrics

        items = items[:250]
        dataset = dataset_metrics_of_rows([item["row"] for item in items])
        return lambda model: captioner_metrics(model, items, fields, references=1, dataset=dataset)

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """BLEU-4, CIDEr-D, VQA accuracy per question type; the word error rate of its transcripts
        when it hears speech; and the metrics the data set brings of its own
        (:mod:`polymodal.eval.datasets`: on the shapes world the scene-graph judge of captions)."""
        from polymodal.eval.datasets import dataset_metrics
        from polymodal.eval.understanding import captioner_metrics

        fields = self.fields()
        dataset = dataset_metrics(data)
        return evaluate_splits(
            data, splits, fields, options.image_size or self.input_size(),
            lambda items: captioner_metrics(self, items, fields, decoding=options.decoding, beams=options.beams,
                                            examples=options.examples, dataset=dataset),
            limit=options.limit, progress=options.progress)

    # ---- saving ----

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return write_model_folder(directory, {"model_type": "captioner", **asdict(self.config)}, self.state_dict(),
                                  extra=self.tokenizer.save_pretrained)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Captioner:
        """The config checked and the model sized and matched with its weights before anything is
        allocated (see :func:`~polymodal.models.family.load_saved`)."""
        config = saved_config(directory, "captioner", CaptionerConfig)
        tokenizer = read_tokenizer(directory)
        return load_saved(directory, lambda: cls(config, tokenizer))
