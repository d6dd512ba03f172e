"""Word error rate of transcripts (``jiwer``), on text normalised the same way on both sides.

A recogniser is judged on the words it heard, not on how it spells punctuation or case: both
the reference and the transcript are lowercased and every character that is not a letter, a
digit or an apostrophe becomes a space, so "There are two shapes: a red star, ..." and
"there are two shapes a red star ..." are the same six words. WER is corpus-level (the edits
of all utterances over the words of all references, as ``jiwer`` counts them), so a long
caption weighs more than a short one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NOT_A_WORD = re.compile(r"[^\w']+|_")


def normalise_transcript(text: str) -> str:
    """Lowercase words separated by single spaces; punctuation dropped (apostrophes kept)."""
    return " ".join(_NOT_A_WORD.sub(" ", text.lower()).split())


def word_error_rate(references: Sequence[str], transcripts: Sequence[str]) -> dict[str, float]:
    """Corpus word error rate of ``transcripts[i]`` against ``references[i]``, with its parts.

    Returns ``word error rate`` ((substitutions + deletions + insertions) / reference words),
    the three rates apart, and ``sentence error rate`` (share of transcripts not exactly right).
    An empty transcript counts every reference word as deleted.
    """
    import jiwer

    if len(references) != len(transcripts) or not references:
        raise ValueError(f"need one transcript per reference; got {len(transcripts)} and {len(references)}")
    refs = [normalise_transcript(r) for r in references]
    if not all(refs):
        raise ValueError("a reference transcript has no words")
    hyps = [normalise_transcript(t) for t in transcripts]
    out = jiwer.process_words(refs, hyps)
    words = sum(len(r.split()) for r in refs)
    return {
        "word error rate": float(out.wer),
        "substitution rate": out.substitutions / words,
        "deletion rate": out.deletions / words,
        "insertion rate": out.insertions / words,
        "sentence error rate": sum(r != h for r, h in zip(refs, hyps, strict=True)) / len(refs),
    }
