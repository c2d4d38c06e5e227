"""WAV I/O, resampling and the neural codec (transformers ``EncodecModel``) used by the audio branch.

The codec is loaded from a LOCAL directory (a user's copy of ``facebook/encodec_32khz``: 32 kHz mono,
50 frames/s, 4 codebooks x 2048) or any directory whose model has EnCodec's ``encode``/``decode`` API.
No hub download happens here, and no ``trust_remote_code``.

:func:`make_random_codec` writes a small randomly initialised EnCodec for offline tests and the CPU demo;
it marks the directory (``tunesmith_random_codec.json``) and every load of it logs that its sound is
meaningless -- the code path (feature extractor, encode, decode) is the real one.

Audio I/O is the standard library / scipy only (``scipy.io.wavfile``): WAV is read everywhere; other
formats (FLAC, MP3, OGG) are read when the optional ``soundfile`` package is installed.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from data_preprocess.hub import ArgumentError

log = logging.getLogger("tunesmith.audio")

RANDOM_MARKER = "tunesmith_random_codec.json"
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif")

# Random EnCodec geometries. "tiny": unit tests (8 kHz, 25 frames/s, 4 x 32). "small": the CPU demo of
# scripts/train_audio.sh (16 kHz, 25 frames/s, 4 x 256). "encodec_32khz": the architecture and sizes of
# facebook/encodec_32khz's config (32 kHz, 50 frames/s, 4 x 2048, 64 filters, 2 LSTM layers) with random
# weights, for honest codec speed figures without downloading it.
RANDOM_CODECS = {
    "tiny": {"sampling_rate": 8000, "upsampling_ratios": [5, 4, 4, 4], "codebook_size": 32, "num_filters": 4,
             "hidden_size": 16, "codebook_dim": 16, "num_lstm_layers": 1, "use_causal_conv": True},
    "small": {"sampling_rate": 16000, "upsampling_ratios": [8, 5, 4, 4], "codebook_size": 256, "num_filters": 8,
              "hidden_size": 32, "codebook_dim": 32, "num_lstm_layers": 1, "use_causal_conv": True},
    "encodec_32khz": {"sampling_rate": 32000, "upsampling_ratios": [8, 5, 4, 4], "codebook_size": 2048,
                      "num_filters": 64, "hidden_size": 128, "codebook_dim": 128, "num_lstm_layers": 2,
                      "use_causal_conv": False, "use_conv_shortcut": False},
}


# ------------------------------------------------------------------------------------------- audio I/O


def read_audio(path_or_bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """Reads an audio file (path or bytes) into float32 ``[channels, samples]`` in [-1, 1] and its rate."""
    name = name or (str(path_or_bytes) if not isinstance(path_or_bytes, bytes | bytearray) else "<bytes>")
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes | bytearray) else str(path_or_bytes)
    is_wav = name.lower().endswith(".wav") or (isinstance(path_or_bytes, bytes | bytearray)
                                               and bytes(path_or_bytes[:4]) == b"RIFF")
    if is_wav:
        from scipy.io import wavfile

        try:
            sr, x = wavfile.read(src)
        except Exception as e:  # noqa: BLE001 -- any parse failure becomes a one-line, named error
            raise ValueError(f"{name}: not a readable WAV file ({e}); re-export it as PCM WAV") from None
        x = _to_float(x)
    else:
        try:
            import soundfile as sf
        except ImportError:
            raise ValueError(f"{name}: only WAV is readable without the optional 'soundfile' package; "
                             "run `pip install soundfile` or convert the file to WAV") from None
        x, sr = sf.read(src, dtype="float32", always_2d=True)
    x = x.reshape(len(x), -1).T if x.ndim == 2 else x[None, :]
    return np.ascontiguousarray(x, dtype=np.float32), int(sr)


def _to_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return x.astype(np.float32)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> str:
    """Writes float audio ``[samples]`` or ``[channels, samples]`` as 16-bit PCM WAV (clipped to [-1, 1])."""
    from scipy.io import wavfile

    a = np.asarray(audio, dtype=np.float32)
    a = a[None, :] if a.ndim == 1 else a
    pcm = (np.clip(a, -1.0, 1.0) * 32767.0).round().astype(np.int16).T
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(str(path), int(sample_rate), pcm if pcm.shape[1] > 1 else pcm[:, 0])
    return str(path)


def resample(audio: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Polyphase resampling (scipy) along the last axis; exact rational ratio, no-op when rates match."""
    if sr_from == sr_to:
        return audio
    from scipy.signal import resample_poly

    r = Fraction(sr_to, sr_from)
    return resample_poly(audio, r.numerator, r.denominator, axis=-1).astype(np.float32)


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Downmix (mean) or upmix (repeat) ``[C, N]`` to ``channels``."""
    if audio.shape[0] == channels:
        return audio
    mono = audio.mean(axis=0, keepdims=True)
    return np.repeat(mono, channels, axis=0) if channels > 1 else mono


# ----------------------------------------------------------------------------------------------- codec


@dataclass
class CodecInfo:
    """The codec identity recorded in meta.json and in the tokenizer (so inference can find it)."""

    path: str
    cls: str
    sample_rate: int
    frame_rate: float
    hop_length: int
    num_codebooks: int
    codebook_size: int
    channels: int
    bandwidth: float
    random_init: bool

    def to_dict(self) -> dict:
        return asdict(self)


def is_random_codec(path) -> bool:
    return (Path(path) / RANDOM_MARKER).is_file()


def make_random_codec(out_dir: str | os.PathLike, geometry: str = "tiny", num_codebooks: int = 4,
                      seed: int = 0) -> Path:
    """Saves a randomly initialised EnCodec (+ its feature extractor) to ``out_dir``; returns the dir.

    Its codes are deterministic functions of the audio, but its SOUND IS MEANINGLESS: use it for tests
    and plumbing only. ``num_codebooks`` sets the target bandwidth so the RVQ uses exactly that many.
    """
    import torch
    from transformers import EncodecConfig, EncodecFeatureExtractor, EncodecModel

    if geometry not in RANDOM_CODECS:
        raise ValueError(f"unknown random codec geometry {geometry!r}; choose one of {sorted(RANDOM_CODECS)}")
    g = dict(RANDOM_CODECS[geometry])
    hop = int(np.prod(g["upsampling_ratios"]))
    frame_rate = math.ceil(g["sampling_rate"] / hop)
    bw = num_codebooks * frame_rate * math.ceil(math.log2(g["codebook_size"])) / 1000.0
    cfg = EncodecConfig(**g, target_bandwidths=[bw], audio_channels=1, normalize=False, chunk_length_s=None,
                        overlap=None, num_residual_layers=1)
    torch.manual_seed(seed)
    model = EncodecModel(cfg).eval()
    _init_codebooks(model, g["sampling_rate"])
    out = Path(out_dir)
    model.save_pretrained(out)
    EncodecFeatureExtractor(feature_size=1, sampling_rate=g["sampling_rate"], padding_value=0.0).save_pretrained(out)
    (out / RANDOM_MARKER).write_text(json.dumps({"geometry": geometry, "seed": seed, "note":
                                                 "randomly initialised: codes are valid, sound is meaningless"}) + "\n")
    return out


def _init_codebooks(model, sample_rate: int) -> None:
    """EnCodec's codebooks start at zero (every frame -> code 0). Initialise each residual codebook from
    encoder outputs of noise, as EnCodec's k-means init does from data, so random codecs use all codes."""
    import torch

    with torch.no_grad():
        x = torch.randn(8, model.config.audio_channels, 2 * sample_rate) * 0.3
        residual = model.encoder(x).permute(0, 2, 1).reshape(-1, model.config.codebook_dim)   # [frames, D]
        for layer in model.quantizer.layers:
            cb = layer.codebook
            idx = torch.randint(0, residual.shape[0], (cb.codebook_size,))
            init = residual[idx] + 0.01 * residual.std() * torch.randn(cb.codebook_size, residual.shape[1])
            cb.embed.copy_(init)
            cb.embed_avg.copy_(init)
            residual = residual - cb.decode(cb.encode(residual))


class AudioInputError(ArgumentError):
    """A codec / input / codes argument of the audio branch that cannot be used (one line: argument, reason,
    fix); every CLI prints it as ``error: <line>``, exit 2 (``data_preprocess.hub.exit_on_argument_error``)."""


def check_codec_dir(path, random_ok: bool = False) -> Path:
    """``path`` must be a codec dir (config.json); else :class:`AudioInputError` naming the ``--codec`` values
    that work (``random_ok``: the CLI also takes ``random-tiny`` / ``random-small``)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        why = "no such directory" if not p.exists() else "not a codec directory (no config.json)"
        alt = "; or --codec random-small for a random test codec (meaningless sound)" if random_ok else ""
        raise AudioInputError(f"codec {path}: {why}. Fix: --codec DIR with a local copy of facebook/encodec_32khz "
                              f"(huggingface-cli download facebook/encodec_32khz --local-dir DIR){alt}")
    return p


def random_codec_geometry(name: str) -> str | None:
    """``random-tiny`` -> ``tiny``; None for a codec dir; :class:`AudioInputError` for an unknown ``random-*``."""
    if not name.startswith("random-"):
        return None
    g = name.split("-", 1)[1]
    if g not in RANDOM_CODECS:
        raise AudioInputError(f"codec {name}: unknown random codec; choose one of "
                              f"{', '.join('random-' + k for k in RANDOM_CODECS)} or a codec dir")
    return g


class Codec:
    """A loaded codec: ``encode(audio [B, C, N]) -> codes [B, K, T]`` and ``decode(codes) -> audio``."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", bandwidth: float | None = None):
        import torch
        from transformers import AutoModel

        p = check_codec_dir(path)
        self.path = str(p)
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(p, trust_remote_code=False).to(self.device).eval()
        cfg = self.model.config
        for attr in ("encode", "decode"):
            if not hasattr(self.model, attr):
                raise TypeError(f"{p}: {type(self.model).__name__} has no .{attr}(); an EnCodec-style codec is needed")
        if getattr(cfg, "chunk_length_s", None):
            raise ValueError(f"{p}: chunked codecs (chunk_length_s={cfg.chunk_length_s}, e.g. encodec_48khz) are not "
                             "supported; use facebook/encodec_32khz or encodec_24khz")
        self.feature_extractor = None
        if (p / "preprocessor_config.json").is_file():
            from transformers import AutoFeatureExtractor

            self.feature_extractor = AutoFeatureExtractor.from_pretrained(p)
        self.sample_rate = int(cfg.sampling_rate)
        self.channels = int(getattr(cfg, "audio_channels", 1))
        self.hop_length = int(cfg.hop_length)
        self.frame_rate = float(cfg.frame_rate)
        self.codebook_size = int(cfg.codebook_size)
        self.bandwidth = float(bandwidth if bandwidth is not None else cfg.target_bandwidths[0])
        if self.bandwidth not in cfg.target_bandwidths:
            raise ValueError(f"{p}: bandwidth {self.bandwidth} is not one of {cfg.target_bandwidths}")
        self.num_codebooks = int(self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))
        self.normalize = bool(getattr(cfg, "normalize", False))
        self.random_init = is_random_codec(p)
        if self.random_init:
            log.warning("codec %s is a RANDOMLY INITIALISED EnCodec: its codes are valid but its sound is "
                        "meaningless (plumbing/tests only; use real facebook/encodec_32khz weights for music)", p)
        if self.normalize:
            log.warning("codec %s normalises loudness per item; the per-item scale is not modelled, decoded "
                        "audio uses unit scale", p)

    @property
    def info(self) -> CodecInfo:
        return CodecInfo(self.path, type(self.model).__name__, self.sample_rate, self.frame_rate, self.hop_length,
                         self.num_codebooks, self.codebook_size, self.channels, self.bandwidth, self.random_init)

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.hop_length)

    def prepare(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """``[C, N]`` at any rate -> ``[codec channels, N']`` at the codec's rate."""
        return resample(to_channels(np.asarray(audio, np.float32), self.channels), sample_rate, self.sample_rate)

    def encode(self, batch: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Encodes prepared clips (each ``[C, N]`` at the codec rate; lengths may differ) in one forward.

        Returns one ``[K, ceil(N / hop)]`` int64 code array per clip (padding frames trimmed).
        """
        import torch

        clips = [np.asarray(c, np.float32) for c in batch]
        lengths = [c.shape[-1] for c in clips]
        if self.feature_extractor is not None:
            raw = [c[0] if self.channels == 1 else c.T for c in clips]   # the extractor's expected layout
            feats = self.feature_extractor(raw, sampling_rate=self.sample_rate, return_tensors="pt",
                                           padding=len(set(lengths)) > 1)
            x = feats["input_values"]
            pm = feats.get("padding_mask")
        else:
            n = max(lengths)
            x = torch.zeros(len(clips), self.channels, n)
            pm = torch.zeros(len(clips), n, dtype=torch.long)
            for i, c in enumerate(clips):
                x[i, :, : c.shape[-1]] = torch.from_numpy(c)
                pm[i, : c.shape[-1]] = 1
        with torch.inference_mode():
            out = self.model.encode(x.to(self.device), pm.to(self.device) if pm is not None else None,
                                    bandwidth=self.bandwidth, return_dict=True)
        codes = out.audio_codes[0].cpu().numpy().astype(np.int64)   # [B, K, T] (one chunk: unchunked codec)
        return [codes[i, :, : self.num_frames(n)] for i, n in enumerate(lengths)]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes ``[K, T]`` or ``[B, K, T]`` -> float32 audio ``[B, C, T * hop]`` at the codec rate."""
        import torch

        c = np.asarray(codes, dtype=np.int64)
        c = c[None] if c.ndim == 2 else c
        if c.shape[1] != self.num_codebooks:
            raise ValueError(f"codes have {c.shape[1]} codebooks, the codec uses {self.num_codebooks}")
        with torch.inference_mode():
            t = torch.from_numpy(c).to(self.device)[None]   # [1 chunk, B, K, T]
            audio = self.model.decode(t, [None], return_dict=True).audio_values
        return audio[..., : c.shape[-1] * self.hop_length].float().cpu().numpy()
