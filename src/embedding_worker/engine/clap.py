"""CLAP models (audio and text in one space) on the service's own torch code: transformers'
`ClapModel` and its feature extractor, with what infinity 0.0.78's CLAP path gets wrong made
right (docs/architecture.md):

- the same clip always gives the same vector: a clip longer than the model's window is not cut at
  a random place. An unfused model sees its first `max_length_s` seconds (as a text keeps its
  start); a fused model sees the whole clip shrunk, and three windows from the middles of its
  first, second and last thirds (transformers' extractor draws them at random).
- `is_longer` is each clip's own (a fused model needs it; the extractor marks a random clip of a
  batch with no long one as long, which made a clip's vector depend on its batch).
- text is cut at the text model's window (512 tokens for LAION's), not at 20 tokens.

The samples come decoded, one channel at the model's rate (core/audio.py); the model behind the
engine seam is engine/clap_engine.py. The extractor's private methods this relies on are touched
in compat.py only, checked when a model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .compat import clap_input_mel

DTYPES = ("float32", "float16", "bfloat16")


class Clap:
    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0,
                 dtype: str = "float32"):
        import torch
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.dtype = getattr(torch, dtype)  # one of DTYPES
        self.model = ClapModel.from_pretrained(str(path)).to(device, self.dtype).eval()
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        extractor = ClapFeatureExtractor.from_pretrained(str(path))
        # a long clip's three windows: the middle of each third, not drawn at random
        self._input_mel = clap_input_mel(extractor, _middle_windows)
        self.extractor = extractor
        text = self.model.config.text_config
        # RoBERTa's positions start after the padding index: the last usable one is the window
        self.window = int(text.max_position_embeddings) - int(text.pad_token_id) - 1
        self.rate = int(extractor.sampling_rate)
        self.max_samples = int(extractor.nb_max_samples)
        self.fusion = extractor.truncation == "fusion"
        self.dimensions = int(self.model.config.projection_dim)

    def features(self, samples: np.ndarray) -> tuple[np.ndarray, bool]:
        """The model's input for one clip (mono, at `self.rate`) and whether it counts as long."""
        wave = np.asarray(samples, dtype=np.float64)
        if not self.fusion and len(wave) > self.max_samples:
            wave = wave[: self.max_samples]
        mel, longer = self._input_mel(wave, self.max_samples)
        return np.asarray(mel, dtype=np.float32), bool(longer)

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        """Unit vectors of the clips."""
        torch = self.torch
        made = [self.features(clip) for clip in clips]
        features = torch.from_numpy(np.stack([mel for mel, _ in made])).to(self.device,
                                                                           self.dtype)
        longer = torch.tensor([[flag] for _, flag in made], device=self.device)
        with torch.inference_mode():
            vectors = self.model.get_audio_features(input_features=features, is_longer=longer)
        return _unit(vectors.float().cpu().numpy())

    def tokens(self, texts: list[str]) -> dict[str, Any]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.window,
                              return_tensors="pt")

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of the texts, in the clips' space."""
        torch = self.torch
        encoded = {name: value.to(self.device) for name, value in self.tokens(texts).items()}
        with torch.inference_mode():
            vectors = self.model.get_text_features(**encoded)
        return _unit(vectors.float().cpu().numpy())


def _middle_windows(mel: np.ndarray, total_frames: int, chunk_frames: int) -> np.ndarray:
    """transformers' `_random_mel_fusion` with each window at the middle of its third rather than
    drawn: the whole mel shrunk to one window's frames, then the three windows."""
    import torch

    ranges = np.array_split(np.arange(0, total_frames - chunk_frames + 1), 3)
    starts = [int(r[len(r) // 2]) if len(r) else 0 for r in ranges]
    windows = [mel[start:start + chunk_frames, :] for start in starts]
    whole = torch.tensor(mel[None, None, :])
    shrunk = torch.nn.functional.interpolate(whole, size=[chunk_frames, mel.shape[1]],
                                             mode="bilinear", align_corners=False)[0][0].numpy()
    return np.stack([shrunk, *windows], axis=0)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
