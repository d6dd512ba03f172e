"""Word error rate of PocketSphinx on the shapes world's spoken captions, three ways, in one run.

- ``general``: PocketSphinx's bundled English language model alone;
- ``domain``: a trigram model of the world's training captions, never falling back;
- ``domain+fallback``: the same, with the general model decoding again where the domain
  decode is poor (:class:`polymodal.speech.sphinx.SphinxRecogniser`'s rule, as shipped);

and, on the same voices, how often out-of-domain requests fall back (they should) and how
often the captions do (they should not).

    OMP_NUM_THREADS=1 python benchmarks/speech_wer.py --data WORLD [--n 50] [--split test] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from polymodal.eval.transcription import word_error_rate
from polymodal.modalities.audio import SAMPLE_RATE, load_audio
from polymodal.modalities.speech import ENGLISH_VOICES, synthesize
from polymodal.speech.recognise import domain_sentences
from polymodal.speech.sphinx import SphinxRecogniser

REQUESTS = ("what is the weather like today in paris", "please tell me a story about a dragon",
            "turn off the lights in the kitchen", "how do i make a cup of tea",
            "i would like to book a flight to london tomorrow morning", "remind me to call my mother at six")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == args.split and r.get("audio_file")][: args.n]
    audio = [load_audio(args.data / r["audio_file"]) for r in rows]
    references = [r["text"] for r in rows]

    started = time.perf_counter()
    shipped = SphinxRecogniser(domain_sentences(args.data))
    print(f"domain language model from {args.data}: {time.perf_counter() - started:.1f} s")
    general = SphinxRecogniser()

    results: dict = {"samples": len(rows), "split": args.split}
    for name, recogniser, fallback in (("domain", shipped, False), ("domain+fallback", shipped, True),
                                       ("general", general, True)):
        recogniser.fallback = fallback
        started, texts, fell_back = time.perf_counter(), [], 0
        for x in audio:
            texts.append(recogniser.transcribe(x, SAMPLE_RATE).text)
            fell_back += recogniser.last_search == "general"
        seconds = time.perf_counter() - started
        results[name] = {**word_error_rate(references, texts), "fallbacks": fell_back,
                         "seconds per caption": seconds / len(rows)}
        print(name, json.dumps(results[name]))
    requests = [synthesize(text, voice) for text in REQUESTS for voice in ENGLISH_VOICES]
    fallbacks = 0
    for x in requests:
        shipped.transcribe(x, SAMPLE_RATE)
        fallbacks += shipped.last_search == "general"
    results["out-of-domain requests falling back"] = f"{fallbacks} / {len(requests)}"
    print("out-of-domain requests falling back:", results["out-of-domain requests falling back"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
