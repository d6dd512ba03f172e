"""Speech in and out (polymodal.speech): synthesis in OpenAI's voices and formats, each format
decoded back with PyAV; recognition by polymodal's own recogniser (trained here on a few spoken
sentences), by a tiny random Hugging Face Whisper folder made here, and by PocketSphinx with a
domain language model and its fallback; word error rate in `polymodal eval`."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from polymodal.errors import InputError
from polymodal.eval.transcription import normalise_transcript, word_error_rate
from polymodal.modalities.audio import SAMPLE_RATE, load_audio, resample, save_wav
from polymodal.modalities.speech import synthesize
from polymodal.speech import (
    FORMATS,
    VOICES,
    OwnRecogniser,
    SphinxRecogniser,
    WhisperRecogniser,
    encode_audio,
    load_recogniser,
    media_type,
    speak,
    synthesise,
)
from polymodal.speech.base import as_samples, split_at_pauses
from polymodal.speech.synthesise import SAMPLE_RATE as SPEECH_RATE
from polymodal.speech.synthesise import change_tempo

SENTENCES = [
    "a small red circle in the top left",
    "there is a large blue square on the right",
    "a green star below a yellow triangle",
    "an image with a purple cross in the center",
    "one small orange circle at the bottom",
    "a big red square above a little blue star",
]


# ---- word error rate ---------------------------------------------------------------------------


def test_word_error_rate_ignores_case_and_punctuation_and_counts_each_edit():
    assert normalise_transcript("There are two shapes: a RED star, and  a disc.") == \
        "there are two shapes a red star and a disc"
    exact = word_error_rate(["There are two shapes: a red star."], ["there are two shapes a red star"])
    assert exact["word error rate"] == 0.0 and exact["sentence error rate"] == 0.0
    # one substitution, one deletion, one insertion over 4 + 2 reference words
    m = word_error_rate(["a red star here", "blue disc"], ["a green star here now", "blue"])
    assert m["word error rate"] == pytest.approx(3 / 6)
    assert m["substitution rate"] == m["deletion rate"] == m["insertion rate"] == pytest.approx(1 / 6)
    assert m["sentence error rate"] == 1.0
    assert word_error_rate(["a red star"], [""])["deletion rate"] == 1.0
    with pytest.raises(ValueError, match="one transcript per reference"):
        word_error_rate(["a"], [])


# ---- synthesis ---------------------------------------------------------------------------------


def decode(data: bytes) -> tuple[np.ndarray, int, str]:
    """Samples (mono float), sample rate and codec of an encoded audio file, read back with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = []
        for frame in container.decode(stream):
            x = frame.to_ndarray()  # (channels, n) planar or (1, n * channels) packed; mono here
            scale = float(np.iinfo(x.dtype).max) if x.dtype.kind == "i" else 1.0
            frames.append(x.reshape(-1).astype(np.float32) / scale)
        return np.concatenate(frames), stream.codec_context.sample_rate, stream.codec_context.name


@pytest.fixture(scope="module")
def spoken():
    return speak("a small red circle in the top left", "alloy")


@pytest.mark.parametrize("format", [f for f in FORMATS if f != "pcm"])
def test_each_format_decodes_back_to_the_same_speech(format, spoken):
    data = synthesise("a small red circle in the top left", "alloy", 1.0, format)
    samples, rate, codec = decode(data)
    assert codec.startswith({"mp3": "mp3", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "pcm_s16le"}[format])
    seconds = len(samples) / rate
    assert abs(seconds - len(spoken) / SPEECH_RATE) < 0.15, (format, seconds)  # codec padding only
    assert np.sqrt(np.mean(samples**2)) > 0.01  # speech, not silence
    assert media_type(format).startswith("audio/")


def test_pcm_is_raw_16_bit_samples_at_24k(spoken):
    data = synthesise("a small red circle in the top left", "alloy", 1.0, "pcm")
    samples = np.frombuffer(data, "<i2").astype(np.float32) / 32767
    assert abs(len(samples) - len(spoken)) < 0.05 * len(spoken)
    assert not data.startswith(b"RIFF") and np.abs(samples).max() > 0.05


def test_lossless_formats_keep_the_samples(spoken):
    for format in ("wav", "flac"):
        samples, rate, _ = decode(encode_audio(spoken, SPEECH_RATE, format))
        assert rate == SPEECH_RATE and len(samples) == len(spoken)
        assert np.abs(samples - spoken).max() < 1e-4  # 16-bit rounding only


def fundamental_hz(x: np.ndarray, rate: int = SPEECH_RATE) -> float:
    """Median pitch of the loud stretches of ``x`` (YIN's cumulative-mean difference, threshold 0.3)."""
    size, found = 2048, []
    for i in range(0, len(x) - size, size // 2):
        w = x[i : i + size]
        if np.sqrt(np.mean(w**2)) < 0.05:
            continue
        d = np.array([np.sum((w[: size - t] - w[t:]) ** 2) for t in range(1, rate // 60)])
        normalised = d * np.arange(1, len(d) + 1) / np.cumsum(d)
        low = rate // 400
        below = np.flatnonzero(normalised[low:] < 0.3)
        if len(below):
            t = below[0] + low
            while t + 1 < len(normalised) and normalised[t + 1] < normalised[t]:
                t += 1
            found.append(rate / (t + 1))
    return float(np.median(found))


def test_every_openai_voice_speaks_and_male_and_female_voices_differ_in_pitch():
    assert set(VOICES) == {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse"}
    assert len({(v.espeak, v.pitch) for v in VOICES.values()}) == len(VOICES)
    pitch = {}
    for name in VOICES:
        clip = speak("hello there, how are you today", name)
        assert clip.dtype == np.float32 and np.abs(clip).max() > 0.05
        pitch[name] = fundamental_hz(clip)
    female = [pitch[n] for n, v in VOICES.items() if "+f" in v.espeak]
    male = [pitch[n] for n, v in VOICES.items() if "+m" in v.espeak]
    assert len(female) == 5 and len(male) == 6
    assert max(male) < 130 < 150 < min(female), pitch
    assert pitch["onyx"] == min(pitch.values())  # the deep one


def test_speed_changes_duration_within_and_beyond_espeaks_own_range():
    text = "a small red circle in the top left"
    normal, fast, faster, slow = (len(speak(text, "echo", s)) for s in (1.0, 2.0, 4.0, 0.25))
    assert fast < 0.7 * normal and faster < 0.75 * fast  # 4.0 is beyond eSpeak's 450 words a minute
    assert slow > 2.5 * normal  # 0.25 is below its 80
    stretched = change_tempo(np.sin(np.arange(24_000) / 10).astype(np.float32), 24_000, 2.0)
    assert abs(len(stretched) - 12_000) < 600


@pytest.mark.parametrize(("call", "field"), [
    (lambda: synthesise("hi", "robot", 1.0, "mp3"), "voice"),
    (lambda: synthesise("hi", "alloy", 1.0, "ogg"), "response_format"),
    (lambda: synthesise("hi", "alloy", 5.0, "mp3"), "speed"),
    (lambda: synthesise("hi", "alloy", True, "mp3"), "speed"),
    (lambda: synthesise("   ", "alloy", 1.0, "mp3"), "input"),
    (lambda: synthesise("x" * 5000, "alloy", 1.0, "mp3"), "input"),
])
def test_bad_synthesis_requests_name_the_field(call, field):
    with pytest.raises(InputError) as e:
        call()
    assert e.value.source == field


# ---- audio given to a recogniser ---------------------------------------------------------------


def test_audio_is_validated_mixed_and_resampled():
    tone = np.sin(np.arange(8_000) / 5).astype(np.float32)
    assert len(as_samples(tone, 8_000)) == 16_000
    stereo = np.stack([tone, -tone])  # mixes to silence
    assert np.abs(as_samples(stereo, 16_000)).max() < 1e-6
    pcm = (tone * 32767).astype(np.int16)
    assert np.allclose(as_samples(pcm, 16_000), tone, atol=1e-4)
    assert as_samples(torch.from_numpy(tone), 16_000).dtype == np.float32
    for bad, rate, field in [(tone, 4_000, "sample_rate"), (np.array([np.nan]), 16_000, "audio"),
                             (np.zeros(0), 16_000, "audio"), (np.array(["a"]), 16_000, "audio"),
                             (np.zeros(16_000 * 601, np.float32), 16_000, "audio")]:
        with pytest.raises(InputError) as e:
            as_samples(bad, rate)
        assert e.value.source == field


def test_long_audio_is_cut_at_pauses_into_windows():
    rng = np.random.default_rng(0)
    loud = lambda seconds: rng.normal(0, 0.3, int(seconds * SAMPLE_RATE)).astype(np.float32)  # noqa: E731
    quiet = np.zeros(int(0.2 * SAMPLE_RATE), np.float32)
    x = np.concatenate([loud(7), quiet, loud(5), quiet, loud(6)])  # pauses at 7.0-7.2 s and 12.2-12.4 s
    windows = split_at_pauses(x, 10.0)
    assert windows[0][0] == 0 and windows[-1][1] == len(x)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
    assert all(end - start <= 10 * SAMPLE_RATE for start, end in windows)
    assert 7.0 <= windows[0][1] / SAMPLE_RATE <= 7.2  # the first cut falls in the first pause


# ---- polymodal's own recogniser ----------------------------------------------------------------


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    """A data folder of spoken sentences: four to train on, two to test."""
    out = tmp_path_factory.mktemp("speech")
    (out / "audio").mkdir()
    rows = []
    for i, text in enumerate(SENTENCES):
        save_wav(out / f"audio/{i}.wav", synthesize(text, "en-us", 160))
        rows.append({"id": str(i), "split": "train" if i < 4 else "test", "audio_file": f"audio/{i}.wav", "text": text})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


TINY_ASR = ["trainer.max_steps=2", "trainer.val_every_minutes=0", "trainer.vocab_size=300", "data.batch_size=4",
            "data.val_split=null", "model.encoders.speech={type: audio, preset: tiny, stem_stride: 8}",
            "model.width=32", "model.depth=1", "model.heads=2"]


@pytest.mark.slow  # about 20 s: a Lightning run and an evaluation through the command line
def test_asr_recipe_trains_and_eval_reports_word_error_rate(speech_data, tmp_path):
    from polymodal.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "asr-shapes", "--data", str(speech_data), "--out", str(tmp_path / "asr"),
                                 *TINY_ASR])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "asr/model/config.json").read_text())
    assert saved["fields"] == {"speech": "audio:audio_file"}
    metrics = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "asr/model"), "--data", str(speech_data), "--split", "test",
                                 "--json", str(metrics)])
    assert result.exit_code == 0, result.output
    m = json.loads(metrics.read_text())["test"]
    assert m["samples"] == 2 and m["word error rate"] >= 0 and "sentence error rate" in m
    assert isinstance(load_recogniser(tmp_path / "asr/model"), OwnRecogniser)


def test_own_recogniser_transcribes_what_its_model_learned(speech_data, tmp_path):
    """A tiny captioner over log-mel learns four spoken sentences by heart (trained on the
    data set's batches, as the trainer makes them); the recogniser, given the raw audio at another
    sample rate, must compute the same features to write them back."""
    from polymodal.data.dataset import Collator
    from polymodal.data.memory import MemoryDataset
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.captioner import Captioner, CaptionerConfig

    torch.manual_seed(0)
    fields = {"speech": "audio:audio_file"}
    items = MemoryDataset(speech_data, fields, split="train").items
    tokenizer = TextTokenizer.train(SENTENCES, vocab_size=300)
    config = CaptionerConfig(encoders={"speech": {"type": "audio", "width": 48, "depth": 1, "heads": 2, "stem_stride": 8}},
                             width=48, depth=1, heads=2, fields=fields, vocab_size=tokenizer.vocab_size)
    model = Captioner(config, tokenizer)
    batch = Collator(fields)(items)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(tmp_path / "own")

    recogniser = load_recogniser(tmp_path / "own")
    assert isinstance(recogniser, OwnRecogniser)
    for i, text in enumerate(SENTENCES[:4]):
        # the very clip it learned, at 22.05 kHz (eSpeak NG says it a few samples differently
        # each time, and four memorised clips are no test of robustness)
        audio = resample(load_audio(speech_data / f"audio/{i}.wav").numpy(), SAMPLE_RATE, 22_050)
        transcript = recogniser.transcribe(audio, 22_050)
        assert normalise_transcript(transcript.text) == text
        assert transcript.segments[0].start == 0 and transcript.segments[-1].end == pytest.approx(len(audio) / 22_050, abs=0.01)
        assert "polymodal recogniser" in transcript.model


def test_a_model_that_does_not_hear_is_no_recogniser(tmp_path):
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.captioner import Captioner, CaptionerConfig

    tokenizer = TextTokenizer.train(SENTENCES, vocab_size=300)
    config = CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny"}}, width=32, depth=1, heads=2,
                             vocab_size=tokenizer.vocab_size)
    Captioner(config, tokenizer).save_pretrained(tmp_path / "cap")
    with pytest.raises(InputError, match="no audio encoder"):
        load_recogniser(tmp_path / "cap")
    with pytest.raises(InputError, match="not a model folder"):
        load_recogniser(tmp_path / "nothing")


# ---- Hugging Face Whisper ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    """A tiny random Whisper (d_model 16, one layer each side) with a tiny byte-level BPE
    tokenizer and Whisper's special tokens, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out = tmp_path_factory.mktemp("whisper")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(SENTENCES * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    bpe.model.save(str(out))
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), unk_token=end, bos_token=end,
                                 eos_token=end, pad_token=end)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                                 "<|notimestamps|>"]})
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=start)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"), max_length=32)
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(out)
    return out


def test_whisper_folder_transcribes_as_transformers_does(whisper_folder):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    recogniser = load_recogniser(whisper_folder)
    assert isinstance(recogniser, WhisperRecogniser)
    audio_16k = synthesize("a small red circle", "en-us", 160)
    audio_8k = synthesize("a small red circle", "en-us", 160, sample_rate=8_000)
    transcript = recogniser.transcribe(audio_8k, 8_000)

    processor = WhisperProcessor.from_pretrained(whisper_folder)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_folder).eval()
    features = processor(audio_16k, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        expected = processor.batch_decode(model.generate(features, max_new_tokens=28), skip_special_tokens=True)[0]
    assert transcript.text == expected.strip() and transcript.text  # a random model writes something
    assert transcript.duration == pytest.approx(len(audio_8k) / 8_000, abs=0.01)
    assert "whisper" in transcript.model


# ---- PocketSphinx ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sphinx(tmp_path_factory):
    sentences = tmp_path_factory.mktemp("sentences") / "domain.txt"
    sentences.write_text("\n".join(SENTENCES * 3) + "\n")
    return load_recogniser(f"pocketsphinx:{sentences}")


def test_sphinx_with_the_domain_model_hears_a_domain_sentence_exactly(sphinx):
    assert isinstance(sphinx, SphinxRecogniser)
    text = "a green star below a yellow triangle"
    audio = synthesize(text, "en-us", 160)
    transcript = sphinx.transcribe(audio, SAMPLE_RATE)
    assert transcript.text == text
    assert transcript.model == "pocketsphinx (domain language model)"
    assert [w.word for w in transcript.words] == text.split()
    starts = [w.start for w in transcript.words]
    assert starts == sorted(starts) and 0 <= starts[0] and transcript.words[-1].end <= len(audio) / SAMPLE_RATE + 0.05


def test_sphinx_falls_back_to_the_general_model_on_other_speech(sphinx):
    assert sphinx.poor("", 1.0) and sphinx.poor("a small red circle", 0.2)
    assert sphinx.poor("the the on a with the", 0.9)  # words of the domain, in no order it uses
    assert not sphinx.poor("a small red circle in the top left", 0.9)
    transcript = sphinx.transcribe(synthesize("please tell me a story about a dragon", "en-us", 160), SAMPLE_RATE)
    assert transcript.model == "pocketsphinx (general language model)"
    assert "dragon" in transcript.text or "story" in transcript.text


def test_sphinx_domain_from_a_data_folder_and_bad_specs(speech_data, tmp_path):
    from polymodal.speech.recognise import domain_sentences

    assert domain_sentences(speech_data) == SENTENCES[:4]  # the training split's captions
    (tmp_path / "empty.txt").write_text("\n\n")
    for spec in (f"pocketsphinx:{tmp_path / 'empty.txt'}", f"pocketsphinx:{tmp_path / 'missing'}"):
        with pytest.raises(InputError):
            load_recogniser(spec)


# ---- `polymodal eval` of recognisers that are not polymodal models ------------------------------


def test_eval_scores_pocketsphinx_and_a_whisper_folder_by_word_error_rate(speech_data, whisper_folder, tmp_path):
    from polymodal.cli import app

    runner = CliRunner()
    out, sentences = tmp_path / "sphinx.json", tmp_path / "domain.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    result = runner.invoke(app, ["eval", f"pocketsphinx:{sentences}", "--data", str(speech_data),
                                 "--examples", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())["test"]
    assert m["samples"] == 2 and m["examples"][0]["reference"] == SENTENCES[4]
    assert m["word error rate"] < 0.2  # sentences of its domain, in a clear voice
    out = tmp_path / "whisper.json"
    result = runner.invoke(app, ["eval", str(whisper_folder), "--data", str(speech_data), "--split", "train",
                                 "--limit", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())["train"]
    assert m["samples"] == 1 and m["word error rate"] >= 0.5  # a random model writes nonsense
    result = runner.invoke(app, ["eval", "pocketsphinx", "--data", str(speech_data), "--split", "tset"])
    assert result.exit_code == 2 and "tset" in result.output
