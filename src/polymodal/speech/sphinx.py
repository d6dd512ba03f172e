"""PocketSphinx: offline English recognition with its bundled model, sharpened by the domain.

PocketSphinx's general language model spreads its belief over all of English and, on eSpeak
NG's synthetic speech, hears mostly other words. A language model of the domain's own
sentences (a trigram model with back-off, built by ``pocketsphinx.lm.ArpaBoLM``) makes its
acoustic model pick among the words and word orders that the domain uses, so the domain
model decodes first. When the domain decode is *poor* -- the speech is not the domain's --
the general model decodes again and its text is kept. The rule (:meth:`SphinxRecogniser.poor`):

- the domain decode found no word; or
- its words' mean posterior probability (from the lattice) is below ``min_posterior``: the
  decoder had to choose between several ill-fitting paths; or
- its word sequence is unlikely under the domain language model itself, mean log probability
  per word below ``min_log_prob``: forced into the domain's vocabulary, speech about something
  else comes out as a string of the domain's commonest words ("on the the top with a").

The thresholds were set on 40 of the shapes world's validation captions and 36 out-of-domain
requests spoken by the world's voices: the domain decodes of the captions had posteriors of
0.68 or more and log probabilities of -2.87 or more, so none fell back; every request fell
back (all but two on the language model's verdict: -3.01 and below).

Audio is prepared the way the acoustic model needs it: 0.3 s of silence on each side (the
decoder's silence model and cepstral mean need a lead-in) and a faint fixed noise floor at
-60 dBFS, because synthetic speech contains stretches of exact digital zeros whose log energy
is minus infinity; without them word error on the shapes world's spoken captions was four
times higher.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from polymodal.eval.transcription import normalise_transcript
from polymodal.modalities.audio import SAMPLE_RATE
from polymodal.speech.base import Recogniser, Word

log = logging.getLogger(__name__)

PAD_SECONDS = 0.3
NOISE_FLOOR = 1e-3  # standard deviation of the added noise (-60 dBFS)
FRAME_SECONDS = 0.01  # PocketSphinx's frame step
_LN_LOGBASE = math.log(1.0001)  # PocketSphinx's integer log scores are in base 1.0001


def prepare(samples: np.ndarray) -> bytes:
    """16-bit PCM bytes of ``samples`` padded with silence and given a faint noise floor."""
    pad = np.zeros(int(PAD_SECONDS * SAMPLE_RATE), np.float32)
    x = np.concatenate([pad, samples.astype(np.float32), pad])
    x = x + np.random.default_rng(0).normal(0.0, NOISE_FLOOR, len(x)).astype(np.float32)  # the same floor every call
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


@lru_cache(maxsize=1)
def pronunciations() -> dict[str, list[str]]:
    """The bundled pronouncing dictionary: word -> its pronunciations (phones), the first the commonest."""
    from pocketsphinx import get_model_path

    table: dict[str, list[str]] = {}
    with open(Path(get_model_path()) / "en-us" / "cmudict-en-us.dict", encoding="utf-8") as f:
        for line in f:
            word, _, phones = line.strip().partition(" ")
            if phones:
                table.setdefault(word.split("(")[0], []).append(phones.strip())
    return table


class SphinxRecogniser(Recogniser):
    """PocketSphinx's English acoustic model and dictionary; with ``sentences``, a domain
    language model built from them decodes first, and the general model only when the domain
    decode is poor (``fallback``).

    The domain decoder gets a dictionary of the domain's words only: PocketSphinx builds its
    search over every dictionary word, which for the bundled 134,000 words and a small language
    model took 40 s; over the domain's words it takes a fraction of a second. The general
    decoder is made when first needed.
    """

    max_chunk_seconds = 30.0

    def __init__(self, sentences: Sequence[str] | None = None, *, fallback: bool = True,
                 min_posterior: float = 0.6, min_log_prob: float = -3.0):
        super().__init__()
        self.fallback, self.min_posterior, self.min_log_prob = fallback, min_posterior, min_log_prob
        self.domain = self.domain_lm = self._general = None
        self.last_search = "general"
        if sentences:
            self.domain, self.domain_lm = self._domain_decoder(sentences)

    @property
    def general(self):
        """The decoder with PocketSphinx's general English language model and full dictionary."""
        if self._general is None:
            from pocketsphinx import Decoder

            self._general = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        return self._general

    @staticmethod
    def _domain_decoder(sentences: Sequence[str]):
        """A decoder over a trigram model (ARPA, back-off) of the sentences whose words the
        dictionary can say, and that language model (to score decodes with)."""
        from pocketsphinx import Decoder, LogMath, NGramModel
        from pocketsphinx.lm import ArpaBoLM

        known = pronunciations()
        kept, unknown = [], set()
        for sentence in sentences:
            words = normalise_transcript(sentence).split()
            missing = [w for w in words if w not in known]
            unknown.update(missing)
            if words and not missing:
                kept.append(" ".join(words))
        if unknown:
            log.warning("%d of %d domain sentences left out: words the pronouncing dictionary lacks: %s",
                        len(sentences) - len(kept), len(sentences), ", ".join(sorted(unknown)[:20]))
        if not kept:
            raise ValueError("no domain sentence has only words the pronouncing dictionary knows")
        builder = ArpaBoLM(text="\n".join(kept), add_start=True)
        builder.compute()
        vocabulary = sorted({w for sentence in kept for w in sentence.split()})
        with tempfile.TemporaryDirectory() as tmp:
            lm_path, dict_path = Path(tmp) / "domain.arpa", Path(tmp) / "domain.dict"
            builder.write_file(str(lm_path))
            dict_path.write_text("".join(f"{w if i == 0 else f'{w}({i + 1})'} {phones}\n"
                                         for w in vocabulary for i, phones in enumerate(known[w])))
            decoder = Decoder(samprate=SAMPLE_RATE, lm=str(lm_path), dict=str(dict_path), loglevel="FATAL")
            return decoder, NGramModel(decoder.config, LogMath(), str(lm_path))

    # ---- decoding ----

    @staticmethod
    def _decode(decoder, pcm: bytes) -> tuple[str, list, float]:
        """Text, word segments and mean word posterior of one decode.

        The front end is made afresh first (``reinit_feat``, tens of microseconds): the
        acoustic model's ``feat.params`` turns on noise removal, whose running estimate of the
        noise spectrum ``start_utt`` does not reset, so without it a transcript depended on the
        clips the decoder heard before. Afresh, every decode is the one a new decoder makes.
        """
        decoder.reinit_feat()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        words = [s for s in decoder.seg() if not s.word.startswith(("<", "["))]
        posterior = float(np.mean([s.prob for s in words])) if words else 0.0
        return (hyp.hypstr if hyp else "").strip(), words, posterior

    def domain_log_prob(self, text: str) -> float:
        """Mean natural log probability per word (and end of sentence) of ``text`` under the domain model."""
        words = ["<s>", *text.split(), "</s>"]
        total = sum(self.domain_lm.prob([words[i], *reversed(words[max(0, i - 2):i])]) for i in range(1, len(words)))
        return total * _LN_LOGBASE / (len(words) - 1)

    def poor(self, text: str, posterior: float) -> bool:
        """Whether a domain decode is poor (see the module's docstring for the rule)."""
        return (not text or posterior < self.min_posterior
                or self.domain_log_prob(text) < self.min_log_prob)

    def transcribe_window(self, samples: np.ndarray) -> tuple[str, list[Word]]:
        pcm = prepare(samples)
        if self.domain is not None:
            text, segments, posterior = self._decode(self.domain, pcm)
            self.last_search = "domain"
            if not (self.fallback and self.poor(text, posterior)):
                return text, self._words(segments)
        text, segments, _ = self._decode(self.general, pcm)
        self.last_search = "general"
        return text, self._words(segments)

    @staticmethod
    def _words(segments) -> list[Word]:
        def seconds(frame: int) -> float:
            return max(0.0, frame * FRAME_SECONDS - PAD_SECONDS)

        return [Word(s.word.split("(")[0], seconds(s.start_frame), seconds(s.end_frame + 1)) for s in segments]

    def describe(self) -> str:
        return f"pocketsphinx ({self.last_search} language model)"
