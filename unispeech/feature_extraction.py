"""Raw waveform -> model inputs, with the same results as transformers' Wav2Vec2FeatureExtractor.

Shapes: one utterance is a 1-D array of mono samples [L]; a batch is B utterances whose lengths L_b may
differ. Outputs: input_values [B, T] float32 and attention_mask [B, T] int32 (1 = real sample, 0 =
padding), T = the padded length. With padding=False and return_tensors=None every row keeps its own
length (a list of 1-D arrays), as in transformers.

The attention mask is returned for every model type, group-norm checkpoints included (their
preprocessor_config.json says ``return_attention_mask: false``, which transformers follows and we
keep only to write it back): with it a padded batch gives every utterance the inputs, and with
unispeech's models the outputs, it gets alone. ``return_attention_mask=False`` in a call gives
transformers' unmasked inputs.

Normalisation (do_normalize): x' = (x - mean) / sqrt(var + 1e-7) per utterance, in float32, exactly as
transformers computes it. Like transformers, the statistics cover only the real samples (and padded
samples are set to padding_value) when an attention mask is produced; when padding is requested with
return_attention_mask=False, transformers normalises the whole padded row, padding included, and so do
we. One deliberate difference: with padding_side="left" and an attention mask, transformers takes the
statistics over the first ``length`` samples of the padded row (padding included, real samples left
out); we take them over the real samples, as with right padding.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

FEATURE_EXTRACTOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"
PADDING_MODES = ("longest", "max_length", "do_not_pad")
NORM_EPS = 1e-7


class BatchFeature(dict):
    """A dict of model inputs whose keys can also be read as attributes (``batch.input_values``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no field {name!r}; fields are {sorted(self)}") from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        """Move every torch tensor (``tensor.to(*args, **kwargs)``); other values are kept as they are."""
        return BatchFeature(
            {k: v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v for k, v in self.items()}
        )


def resolve_padding(padding: Union[bool, str], max_length: Optional[int]) -> str:
    """Map transformers' padding argument (True/False/'longest'/'max_length'/'do_not_pad') to a mode name."""
    if padding is True:
        mode = "longest"
    elif padding is False or padding is None:
        mode = "do_not_pad"
    else:
        mode = getattr(padding, "value", padding)
        if mode not in PADDING_MODES:
            raise ValueError(f"unknown padding mode {padding!r}; use True, False or one of {PADDING_MODES}")
    if mode == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    return mode


def round_up(length: Optional[int], multiple: Optional[int]) -> Optional[int]:
    """length rounded up to a multiple of `multiple` (unchanged when either is None)."""
    if length is None or multiple is None or length % multiple == 0:
        return length
    return (length // multiple + 1) * multiple


def stack_rows(rows: List[np.ndarray], return_tensors: Optional[str], name: str):
    """Keep a list of rows (return_tensors=None) or stack them into one np.ndarray / torch.Tensor."""
    kind = getattr(return_tensors, "value", return_tensors)
    if kind is None:
        return rows
    if kind not in ("np", "pt"):
        raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(
            f"cannot build one tensor of {name} from rows of different lengths {lengths}; "
            "pass padding=True (or 'max_length') to pad them"
        )
    array = np.stack(rows)
    return torch.from_numpy(array) if kind == "pt" else array


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _integer_samples(raw_speech: Any) -> bool:
    """Whether the audio (or the batch's first utterance) holds integer samples."""
    first = raw_speech[0] if isinstance(raw_speech, (list, tuple)) and raw_speech else raw_speech
    dtype = getattr(first, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and dtype != torch.bool
    return dtype is not None and np.issubdtype(dtype, np.integer)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def as_utterances(raw_speech: Any) -> List[np.ndarray]:
    """Split raw speech into a list of 1-D float32 arrays, one per utterance.

    Accepted: a 1-D array/tensor or a list of numbers (one utterance); a 2-D array/tensor [B, L] or a
    list/tuple of 1-D arrays, tensors or number lists (a batch). float64 (and any other dtype) becomes
    float32, as transformers casts float64 to float32 before normalising.
    """
    if isinstance(raw_speech, (np.ndarray, torch.Tensor)):
        array = _to_numpy(raw_speech)
        if array.ndim == 1:
            items = [array]
        elif array.ndim == 2 and array.shape[1] <= MAX_CHANNELS < array.shape[0]:
            raise ValueError(
                f"raw_speech has shape {tuple(array.shape)}: this looks like {array.shape[1]}-channel audio "
                "[samples, channels] (soundfile's layout); mix it down (x.mean(axis=1)) or give a batch [B, L]"
            )
        elif array.ndim == 2:
            items = list(array)
        else:
            raise ValueError(
                f"raw_speech has shape {tuple(array.shape)}: give one mono utterance [L] or a batch [B, L]"
            )
    elif isinstance(raw_speech, (list, tuple)):
        if len(raw_speech) == 0:
            raise ValueError("raw_speech is an empty batch: give at least one utterance")
        if all(_is_scalar(x) for x in raw_speech):
            items = [np.asarray(raw_speech)]
        elif any(_is_scalar(x) for x in raw_speech):
            raise ValueError("raw_speech mixes numbers and sequences: give one utterance or a list of utterances")
        else:
            items = [_to_numpy(x) for x in raw_speech]
    else:
        raise TypeError(
            f"raw_speech must be a numpy array, a torch tensor or a list, got {type(raw_speech).__name__}"
        )
    for i, item in enumerate(items):
        if not (np.issubdtype(item.dtype, np.floating) or np.issubdtype(item.dtype, np.integer)):
            raise TypeError(f"utterance {i} has dtype {item.dtype}; audio samples must be numbers")
        if item.ndim != 1:
            raise ValueError(
                f"utterance {i} has shape {tuple(item.shape)}; each utterance must be 1-D mono audio "
                "(multi-channel audio is not supported: mix it down first)"
            )
        if item.shape[0] == 0:
            raise ValueError(f"utterance {i} is empty (0 samples)")
    return [item.astype(np.float32, copy=False) for item in items]


MAX_CHANNELS = 8  # a [L, c] array with c <= this (and L > c) is multi-channel audio, not c-sample utterances


def zero_mean_unit_var(x: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-7) in x's dtype, the formula transformers uses."""
    return (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)


def read_json_object(path: str) -> Dict[str, Any]:
    """The JSON object in ``path``; a ValueError names the file when it holds anything else."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class UniSpeechFeatureExtractor:
    """Turns raw 16 kHz waveforms into ``input_values`` (+ ``attention_mask``) for UniSpeech models.

    Reads and writes transformers' ``preprocessor_config.json`` (feature_extractor_type
    ``Wav2Vec2FeatureExtractor``), so folders are interchangeable with transformers.
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        return_attention_mask: bool = False,
        do_normalize: bool = True,
        padding_side: str = "right",
        **kwargs: Any,
    ):
        if feature_size != 1:
            raise ValueError(f"feature_size must be 1 (mono raw audio), got {feature_size}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if not isinstance(sampling_rate, int) or isinstance(sampling_rate, bool) or sampling_rate < 1:
            raise ValueError(f"sampling_rate must be a positive int (Hz), got {sampling_rate!r}")
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = float(padding_value)
        self.return_attention_mask = bool(return_attention_mask)
        self.do_normalize = bool(do_normalize)
        self.padding_side = padding_side
        kwargs.pop("feature_extractor_type", None)
        kwargs.pop("processor_class", None)
        self.extra_config = kwargs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    def __call__(
        self,
        raw_speech: Any,
        padding: Union[bool, str] = False,
        max_length: Optional[int] = None,
        truncation: bool = False,
        pad_to_multiple_of: Optional[int] = None,
        return_attention_mask: Optional[bool] = None,
        return_tensors: Optional[str] = None,
        sampling_rate: Optional[int] = None,
    ) -> BatchFeature:
        """Normalise, truncate and pad one utterance or a batch (arguments as in transformers).

        padding: False / 'do_not_pad' (default, as transformers), True / 'longest', or 'max_length'
        (needs max_length). truncation=True cuts rows to max_length (rounded up to pad_to_multiple_of).
        return_attention_mask: None or True = return it (whatever the config's field says), False = do not
        (and normalise padded rows whole, as transformers does then). return_tensors: None (list of rows),
        'np' or 'pt'. Always returns a batch, even for one utterance.
        """
        if sampling_rate is None:
            logger.warning(
                "pass sampling_rate to %s() so that audio at the wrong rate is caught", type(self).__name__
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz, but this feature extractor (and its model) expects "
                f"{self.sampling_rate} Hz: resample the audio first"
            )
        mode = resolve_padding(padding, max_length)
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        return_attention_mask = return_attention_mask is not False
        if not self.do_normalize and _integer_samples(raw_speech):
            logger.warning("integer audio samples (PCM) with do_normalize=False go to the model unscaled: "
                           "divide int16 audio by 32768 to get the [-1, 1] floats models are trained on")
        rows = as_utterances(raw_speech)

        if truncation:
            limit = round_up(max_length, pad_to_multiple_of)
            rows = [row[:limit] for row in rows]
        lengths = [len(row) for row in rows]
        target = max(lengths) if mode == "longest" else max_length
        target = round_up(target, pad_to_multiple_of) if mode != "do_not_pad" else None

        # with a mask (and padding), statistics cover the real samples only: normalise before padding
        stats_on_real = self.do_normalize and return_attention_mask and mode != "do_not_pad"
        if stats_on_real:
            rows = [zero_mean_unit_var(row) for row in rows]
        values = [self._pad(row, target, self.padding_value) for row in rows]
        if self.do_normalize and not stats_on_real:
            values = [zero_mean_unit_var(row) for row in values]

        out = BatchFeature(input_values=stack_rows(values, return_tensors, "input_values"))
        if return_attention_mask:
            masks = [self._pad(np.ones(n, dtype=np.int32), target, 0) for n in lengths]
            out["attention_mask"] = stack_rows(masks, return_tensors, "attention_mask")
        return out

    def _pad(self, row: np.ndarray, target: Optional[int], value: float) -> np.ndarray:
        if target is None or len(row) >= target:
            return row
        pad = (0, target - len(row)) if self.padding_side == "right" else (target - len(row), 0)
        return np.pad(row, pad, mode="constant", constant_values=value)

    def to_dict(self) -> Dict[str, Any]:
        """The preprocessor_config.json content (transformers' field names and class name)."""
        config = dict(self.extra_config)
        config.update(
            feature_size=self.feature_size,
            sampling_rate=self.sampling_rate,
            padding_value=self.padding_value,
            padding_side=self.padding_side,
            return_attention_mask=self.return_attention_mask,
            do_normalize=self.do_normalize,
            feature_extractor_type="Wav2Vec2FeatureExtractor",
        )
        return config

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write preprocessor_config.json into save_directory (created if needed); returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, FEATURE_EXTRACTOR_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], **overrides: Any) -> "UniSpeechFeatureExtractor":
        """Read preprocessor_config.json (or the feature_extractor part of processor_config.json, which
        transformers' processors write) from a local folder; keyword arguments override its fields."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise OSError(f"{folder!r} is not a local folder (this library does not download from a model hub)")
        path = os.path.join(folder, FEATURE_EXTRACTOR_NAME)
        if os.path.isfile(path):
            config = read_json_object(path)
        else:
            processor_path = os.path.join(folder, PROCESSOR_NAME)
            config = None
            if os.path.isfile(processor_path):
                path = processor_path
                config = read_json_object(path).get("feature_extractor")
            if config is None:
                raise FileNotFoundError(
                    f"no {FEATURE_EXTRACTOR_NAME} (nor a feature_extractor entry in {PROCESSOR_NAME}) in {folder!r}"
                )
        config.update(overrides)
        try:
            return cls(**config)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None
