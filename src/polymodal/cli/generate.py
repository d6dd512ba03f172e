"""``polymodal generate``: draw, write and interleave with a trained model, and read a person's
own image or sound file into a model's batch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from polymodal.cli.common import check_drawing_options, drawn_with, fail
from polymodal.errors import InputError
from polymodal.progress import console, progress_bar

generate_app = typer.Typer(help="Generate with a trained model.", no_args_is_help=True)


@generate_app.command("image")
def generate_image(
    model: Annotated[Path, typer.Argument(help="A saved text-to-image model folder.")],
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    n: Annotated[int, typer.Option("--n", help="Images to draw.")] = 8,
    cfg: Annotated[float | None, typer.Option(
        "--cfg", help="Classifier-free guidance scale (1: none). Default, as for each drawing setting: the model's "
                      "own (its config's drawing section), else 3.")] = None,
    cfg_interval: Annotated[str | None, typer.Option(
        "--cfg-interval", help="Guide at --cfg only at timesteps LOW,HIGH (0-999; high is noisy), e.g. 0,400, or "
                               "'all' (every step; the default unless the model has its own).")] = None,
    cfg_outside: Annotated[float | None, typer.Option(
        "--cfg-outside", help="The guidance scale at the timesteps outside --cfg-interval (default: 1).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: 50).")] = None,
    sampler: Annotated[str, typer.Option(help="ddim (deterministic) or ddpm (ancestral).")] = "ddim",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed draws the same images.")] = 0,
    compose: Annotated[bool, typer.Option(
        help="Draw a prompt whose parts are joined by 'and' as the conjunction of its parts.")] = False,
    best_of: Annotated[int | None, typer.Option(
        "--best-of", help="Omni models: draw N candidates for each image and keep one the model, reading the "
                          "pictures, captions as showing the prompt, the one whose caption the prompt's words are "
                          "likeliest to begin (default: the model's own, else 1).")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG grid to write (default: a name made from the prompt).")] = None,
    columns: Annotated[int, typer.Option(help="Images per row of the grid.")] = 8,
    scale: Annotated[int, typer.Option(help="Enlarge each image this many times in the grid.")] = 4,
):
    """Draw images for a prompt and write them as one PNG grid."""
    import re

    import torch

    from polymodal.modalities.image import image_grid
    from polymodal.models import load_model
    from polymodal.models.family import drawing_settings

    try:
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {n}")
        check_drawing_options(best_of, cfg_interval, steps)  # before the model loads
        generator = load_model(model, task="generate image")
        drawing = drawing_settings(generator, guidance=cfg, guidance_interval=cfg_interval, guidance_outside=cfg_outside,
                                   steps=steps, best_of=best_of)
        start = time.perf_counter()
        with progress_bar("denoising", drawing["steps"]) as update, torch.no_grad():
            images = generator.generate([prompt] * n, sampler=sampler, seed=seed, compose=compose, progress=update,
                                        **drawing)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    out = out or Path(re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    composed = ", composed" if compose else ""
    image_grid(images, columns=columns, scale=scale,
               title=f"{prompt}  ({drawn_with(drawing)}, {sampler}{composed}, seed {seed})").save(out)
    console.print(f"{n} images in {time.perf_counter() - start:.1f} s ({drawn_with(drawing)}) -> {out}")


@generate_app.command("text")
def generate_text(
    model: Annotated[Path, typer.Argument(help="A saved model that writes text (a captioner).")],
    image: Annotated[Path | None, typer.Option(help="An image file to caption or ask about.")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio file to caption or transcribe.")] = None,
    question: Annotated[str | None, typer.Option(help="Ask this about the file instead of captioning it.")] = None,
    decoding: Annotated[str, typer.Option(help="greedy, beam or nucleus.")] = "greedy",
    beams: Annotated[int, typer.Option(help="Beams with --decoding beam.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to write.")] = 40,
):
    """Caption an image or a sound, transcribe speech, or answer a question about a file of your
    own: the text the model writes is printed."""
    import torch

    from polymodal.models import load_model

    given = [(kind, path) for kind, path in (("image", image), ("audio", audio)) if path is not None]
    if len(given) != 1:
        raise fail(ValueError("give one file: --image FILE or --audio FILE"))
    kind, path = given[0]
    if question is not None and not question.strip():
        raise fail(ValueError("--question is empty"))
    if max_tokens < 1:
        raise fail(ValueError(f"--max-tokens must be at least 1, got {max_tokens}"))
    if beams < 1:
        raise fail(ValueError(f"--beams must be at least 1, got {beams}"))
    try:
        writer = load_model(model, task="answer" if question else "caption")
        batch = file_batch(writer, model, kind, path)
        with torch.no_grad():
            text = writer.generate(batch, [question.strip()] if question else None, method=decoding,
                                   max_new_tokens=max_tokens, beams=beams)[0]
    except (InputError, ValueError) as e:
        raise fail(e) from None
    console.print(escape(text), soft_wrap=True)


@generate_app.command("interleaved")
def generate_interleaved(
    model: Annotated[Path, typer.Argument(help="A saved native multimodal (omni) model.")],
    prompt: Annotated[str, typer.Argument(help="The text the sequence opens with (a caption-like prompt).")],
    draw: Annotated[bool, typer.Option(
        help="Draw the prompt at once: the first image follows the prompt, with no text written before it.")] = False,
    describe: Annotated[bool, typer.Option(help="After each drawn image, ask the model to say what it drew.")] = False,
    ask: Annotated[str | None, typer.Option(help="After each drawn image, ask the model this about it.")] = None,
    max_images: Annotated[int, typer.Option(help="Most images to draw.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Most text tokens to write.")] = 40,
    cfg: Annotated[float | None, typer.Option(
        "--cfg", help="Classifier-free guidance scale of the images (1: none). Default, as for each drawing "
                      "setting: the model's own (its config's drawing section), else 3.")] = None,
    cfg_interval: Annotated[str | None, typer.Option(
        "--cfg-interval", help="Guide at --cfg only at timesteps LOW,HIGH (0-999; high is noisy), e.g. 0,400, or "
                               "'all' (every step; the default unless the model has its own).")] = None,
    cfg_outside: Annotated[float | None, typer.Option(
        "--cfg-outside", help="The guidance scale at the timesteps outside --cfg-interval (default: 1).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps of each latent image (default: 50).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes and draws the same.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for the drawn images (image-1.png, ...) and sequence.json.")] = Path(
        "interleaved"),
    scale: Annotated[int, typer.Option(help="Enlarge each written image this many times.")] = 4,
):
    """Interleaved output: the model continues the sequence with text, draws an image in place
    where it writes <boi>, then writes again. The text is printed; each image is written to --out."""
    import torch

    from polymodal.modalities.image import to_pil
    from polymodal.models import load_model
    from polymodal.models.family import drawing_settings

    if describe and ask is not None:
        raise fail(ValueError("give --describe or --ask, not both"))
    if ask is not None and not ask.strip():
        raise fail(ValueError("--ask is empty"))
    for name, value in (("--max-images", max_images), ("--max-tokens", max_tokens), ("--scale", scale)):
        if value < 1:
            raise fail(ValueError(f"{name} must be at least 1, got {value}"))
    if not prompt.strip():
        raise fail(ValueError("the prompt is empty"))
    try:
        check_drawing_options(None, cfg_interval, steps)
        omni = load_model(model, task="generate image")
        if not hasattr(omni, "generate_interleaved"):
            raise InputError(model, "this model does not write interleaved text and images (an omni model does)")
        drawing = drawing_settings(omni, guidance=cfg, guidance_interval=cfg_interval, guidance_outside=cfg_outside,
                                   steps=steps, best_of=1)  # each image drawn once, in place
        tok = omni.tokenizer
        prefix = omni.text_prompt(prompt.strip())
        if describe or ask is not None:
            after = [tok.eos_id] if describe else [*tok.encode(ask.strip(), add_special_tokens=False), tok.eos_id]
        else:
            after = None
        start = time.perf_counter()
        with torch.no_grad():
            segments = omni.generate_interleaved([prefix], max_new_tokens=max_tokens, max_images=max_images,
                                                 seed=seed, after_image=after, open_image=draw, **drawing)[0]
            pictures = [s for s in segments if isinstance(s, torch.Tensor)]
            drawn = omni.decode_images(torch.stack(pictures)) if pictures else None
    except (InputError, ValueError) as e:
        raise fail(e) from None
    out.mkdir(parents=True, exist_ok=True)
    sequence, n = [], 0
    for i, segment in enumerate(segments):
        if isinstance(segment, torch.Tensor):
            path = out / f"image-{n + 1}.png"
            picture = to_pil((drawn[n] + 1) / 2)
            picture.resize((picture.width * scale, picture.height * scale), resample=0).save(path)
            sequence.append({"image": path.name})
            console.print(escape(f"[image {n + 1}: {path}]"))
            n += 1
        elif after and i and isinstance(segments[i - 1], torch.Tensor) and segment == after:  # the turn we put there
            sequence.append({"asked": ask.strip() if ask is not None else "describe the image"})
            console.print(escape(f"[asked: {sequence[-1]['asked']}]"))
        else:
            text = tok.decode(segment)
            sequence.append({"text": text})
            console.print(escape(text), soft_wrap=True)
    (out / "sequence.json").write_text(json.dumps({"prompt": prompt, "sequence": sequence}, indent=2) + "\n")
    written = sum("text" in part for part in sequence)
    console.print(f"{n} image{'s' * (n != 1)} and {written} written part{'s' * (written != 1)} "
                  f"in {time.perf_counter() - start:.1f} s -> {out}")


def file_batch(model, folder: Path, kind: str, path: Path) -> dict:
    """A batch of one file of a person's own, decoded as the model's data set would be (the model's
    image size and preprocessing; log-mel spectrograms for sound), into the field that reads ``kind``."""
    from polymodal.data.dataset import Collator
    from polymodal.modalities.audio import load_audio, log_mel_spectrogram
    from polymodal.modalities.image import ImageTransform, load_image

    fields = model.fields()
    reads = {name: spec.partition(":")[0] for name, spec in fields.items()}
    name = next((n for n, k in reads.items() if k == kind), None)
    if name is None:
        readable = sorted({k for k in reads.values() if k in ("image", "audio")}) or sorted(set(reads.values()))
        raise InputError(folder, f"this model reads {' and '.join(readable)}, not {kind}: give --{readable[0]}")
    if kind == "image":
        transform = getattr(model, "image_transform", None) or ImageTransform(model.input_size())
        value = transform(load_image(path, target_size=transform.size))
    else:
        value = log_mel_spectrogram(load_audio(path))
    batch = Collator({name: kind})([{name: value, "row": {}}])
    del batch["rows"]  # a file of one's own has no metadata row
    return batch
