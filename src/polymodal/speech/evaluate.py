"""Word error rate of any recogniser on a data set's speech (``polymodal eval`` for recognisers
that are not polymodal model folders: ``pocketsphinx[:SENTENCES]`` and Whisper folders).

polymodal's own recogniser is a captioner and is scored by its family (the word error rate is
one of its caption metrics); this module scores the others the same way: each row's audio file
(``audio_file``) is read from the data set (folder or shards, with the same checks as training
reads it), transcribed, and compared with the text it speaks (``text``). A row whose audio
cannot be read is skipped, counted and logged, as training skips it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from polymodal.data.dataset import row_split
from polymodal.data.source import SkipLog, iter_source
from polymodal.errors import InputError
from polymodal.eval.transcription import word_error_rate
from polymodal.modalities.audio import SAMPLE_RATE, load_audio
from polymodal.speech.base import MAX_SECONDS, Recogniser

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("test",)


def is_recogniser_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a recogniser scored here: ``pocketsphinx``, ``pocketsphinx:...`` or a
    Whisper folder (a polymodal captioner is scored by its family)."""
    text = str(spec)
    if text == "pocketsphinx" or text.startswith("pocketsphinx:"):
        return True
    if (Path(spec) / "config.json").is_file():
        from polymodal.models.folder import read_config

        return read_config(spec).get("model_type") == "whisper"
    return False


def evaluate_recogniser(recogniser: Recogniser, data: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS, *,
                        audio_column: str = "audio_file", text_column: str = "text", limit: int | None = None,
                        examples: int = 0, progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """``{split: metrics}``: word error rate (with its parts), sentence error rate and samples of
    ``recogniser`` on the spoken rows of each split (at most ``limit`` each); ``examples``
    transcripts are kept beside their references."""
    wanted = set(splits)
    references: dict[str, list[str]] = {s: [] for s in splits}
    transcripts: dict[str, list[str]] = {s: [] for s in splits}
    skips, done = SkipLog(), 0
    for raw in iter_source(data, skips):
        split = row_split(raw.row)
        if split not in wanted or not raw.row.get(audio_column) or not isinstance(raw.row.get(text_column), str):
            continue
        if limit is not None and len(references[split]) >= limit:
            if all(len(r) >= limit for r in references.values()):
                break
            continue
        try:
            audio = load_audio(raw.read(audio_column), name=raw.file_name(audio_column), max_seconds=MAX_SECONDS)
        except InputError as e:
            skips.add(e.source, e.problem)
            continue
        references[split].append(raw.row[text_column])
        transcripts[split].append(recogniser.transcribe(audio, SAMPLE_RATE).text)
        done += 1
        if progress:
            progress(done)
    results: dict[str, dict] = {}
    for split in splits:
        if references[split]:
            metrics: dict = {"samples": float(len(references[split])),
                             **word_error_rate(references[split], transcripts[split])}
            if examples:
                metrics["examples"] = [{"reference": r, "transcript": t} for r, t in
                                       zip(references[split][:examples], transcripts[split][:examples], strict=True)]
            results[split] = metrics
    if not results:
        raise InputError(data, f"no rows with {audio_column!r} and {text_column!r} in split(s) {', '.join(splits)}")
    if skips.total:
        log.warning("%s: %s", data, skips.summary())
    return results
