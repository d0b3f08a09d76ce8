"""CLAP's numbers (engine/clap.py) held to transformers' own `ClapModel.get_audio_features` /
`get_text_features` on the same preprocessed input, for a fused and an unfused tiny CLAP made
here: the same clip always gives the same vector, whatever its batch; a long clip's windows are
fixed; text is cut at the text model's window, not at 20 tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_worker.engine.clap import Clap
from models import CLAP_SENTENCES, make_tiny_clap_audio

RATE = 48000


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def clap(request, tmp_path_factory):
    path = make_tiny_clap_audio(tmp_path_factory.mktemp("clap") / "tiny-clap",
                                fusion=request.param)
    return Clap(path)


def clip(seconds: float, hertz: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(RATE * seconds)) / RATE
    return (0.4 * np.sin(2 * np.pi * hertz * t) + 0.05 * rng.standard_normal(len(t))).astype(
        np.float32)


def unit(vectors: torch.Tensor) -> np.ndarray:
    out = vectors.detach().float().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_audio_vectors_are_transformers_own(clap):
    clips = [clip(0.4, 440), clip(1.0, 880, 1), clip(2.7, 220, 2)]  # short, exact, long
    made = [clap.features(c) for c in clips]
    assert [longer for _, longer in made] == [False, False, clap.fusion]
    with torch.inference_mode():
        expected = unit(clap.model.get_audio_features(
            input_features=torch.from_numpy(np.stack([mel for mel, _ in made])),
            is_longer=torch.tensor([[longer] for _, longer in made])))
    got = clap.embed_audio(clips)
    assert got.shape == (3, clap.dimensions)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_short_clip_is_what_the_extractor_makes(clap):
    short = clip(0.4, 440)
    public = clap.extractor(short, sampling_rate=RATE, return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(clap.features(short)[0], public, atol=1e-6)


def test_a_long_clip_is_fixed_windows_not_random_ones(clap):
    long = clip(3.3, 330, 3)
    first, _ = clap.features(long)
    for _ in range(3):  # transformers' extractor draws anew each time; this does not
        np.testing.assert_array_equal(clap.features(long)[0], first)
    np.testing.assert_array_equal(clap.embed_audio([long]), clap.embed_audio([long]))
    if clap.fusion:  # the whole clip shrunk (as transformers makes it), then three of its windows
        np.random.seed(0)
        from transformers import ClapFeatureExtractor

        reference = ClapFeatureExtractor._random_mel_fusion
        mel = clap.extractor._np_extract_fbank_features(long.astype(np.float64),
                                                        clap.extractor.mel_filters)
        chunk = clap.max_samples // clap.extractor.hop_length + 1
        drawn = reference(clap.extractor, mel, mel.shape[0], chunk)
        np.testing.assert_allclose(first[0], drawn[0], atol=1e-6)
        starts = [next(s for s in range(mel.shape[0]) if np.allclose(mel[s:s + chunk], w))
                  for w in first[1:]]
        thirds = np.array_split(np.arange(mel.shape[0] - chunk + 1), 3)
        assert starts == [int(r[len(r) // 2]) for r in thirds]
    else:  # its first second
        np.testing.assert_allclose(first, clap.features(long[:RATE])[0], atol=1e-6)


def test_a_clips_vector_does_not_depend_on_its_batch(clap):
    """transformers' extractor marks a random clip of a batch with no long one as long; here a
    clip is long or not by itself."""
    short = clip(0.5, 500)
    alone = clap.embed_audio([short])
    together = clap.embed_audio([clip(0.8, 300, 4), short, clip(0.2, 900, 5)])
    np.testing.assert_allclose(together[1], alone[0], atol=1e-6)


def test_text_vectors_are_transformers_own_and_not_cut_at_20_tokens(clap):
    long = " ".join(CLAP_SENTENCES * 3)
    texts = [CLAP_SENTENCES[0], long]
    encoded = clap.tokenizer(texts, padding=True, truncation=True, max_length=clap.window,
                             return_tensors="pt")
    assert clap.window == 78
    assert int(encoded["attention_mask"][1].sum()) == 78  # the whole window, not 20
    with torch.inference_mode():
        expected = unit(clap.model.get_text_features(**encoded))
    np.testing.assert_allclose(clap.embed_text(texts), expected, atol=1e-6)
    # a text is embedded alone as in a batch
    np.testing.assert_allclose(clap.embed_text([texts[0]])[0], expected[0], atol=1e-6)
