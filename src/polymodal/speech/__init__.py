"""Speech in and out: recognition three ways behind one interface, and synthesis in OpenAI's
voices and formats.

- :func:`load_recogniser` (``pocketsphinx``, ``pocketsphinx:SENTENCES``, a Whisper folder or a
  polymodal recogniser folder) -> :class:`Recogniser`, whose ``transcribe(waveform, sample_rate)``
  gives a :class:`Transcript` (text, segments with times, the model that made it);
- :func:`synthesise` ``(text, voice, speed, format) -> bytes``: eSpeak NG through OpenAI's voice
  names, encoded by PyAV as mp3, opus, aac, flac, wav or raw pcm.
"""

from polymodal.speech.base import Recogniser, Segment, Transcript, Word
from polymodal.speech.recognise import OwnRecogniser, WhisperRecogniser, load_recogniser
from polymodal.speech.sphinx import SphinxRecogniser
from polymodal.speech.synthesise import FORMATS, VOICES, encode_audio, media_type, speak, synthesise

__all__ = [
    "FORMATS", "VOICES", "OwnRecogniser", "Recogniser", "Segment", "SphinxRecogniser", "Transcript",
    "WhisperRecogniser", "Word", "encode_audio", "load_recogniser", "media_type", "speak", "synthesise",
]
