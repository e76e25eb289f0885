"""Audio + text processing for UniSpeech CTC models, without transformers.

UniSpeechFeatureExtractor (feature_extraction.py): waveforms -> input_values [B, T] float32 and
attention_mask [B, T] int32. UniSpeechCTCTokenizer (tokenization.py): text <-> CTC ids, with character
and word offsets in logit frames. UniSpeechProcessor (here) holds one of each: audio and text in ->
input_values / attention_mask / labels [B, N] (padded label positions = -100, which CTC losses ignore);
decode / batch_decode go to the tokenizer. Folders are interchangeable with transformers'
Wav2Vec2Processor (preprocessor_config.json, vocab.json, tokenizer_config.json).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .feature_extraction import BatchFeature, UniSpeechFeatureExtractor
from .tokenization import CTCDecoderOutput, UniSpeechCTCTokenizer, offsets_to_seconds

__all__ = [
    "BatchFeature",
    "CTCDecoderOutput",
    "UniSpeechCTCTokenizer",
    "UniSpeechFeatureExtractor",
    "UniSpeechProcessor",
    "offsets_to_seconds",
]

LABEL_PAD_ID = -100


def _mask_labels(ids: Any, mask: Any) -> Any:
    """Padded label positions (mask == 0) -> -100, for lists of rows, numpy arrays or tensors."""
    if isinstance(ids, torch.Tensor):
        return ids.masked_fill(mask == 0, LABEL_PAD_ID)
    if isinstance(ids, np.ndarray):
        return np.where(mask == 0, LABEL_PAD_ID, ids)
    return [[i if m else LABEL_PAD_ID for i, m in zip(row, row_mask)] for row, row_mask in zip(ids, mask)]


class UniSpeechProcessor:
    """A feature extractor and a CTC tokenizer used together (the Wav2Vec2Processor contract)."""

    def __init__(self, feature_extractor: UniSpeechFeatureExtractor, tokenizer: UniSpeechCTCTokenizer):
        if not isinstance(feature_extractor, UniSpeechFeatureExtractor):
            raise TypeError("feature_extractor must be a UniSpeechFeatureExtractor, got "
                            f"{type(feature_extractor).__name__}")
        if not isinstance(tokenizer, UniSpeechCTCTokenizer):
            raise TypeError(f"tokenizer must be a UniSpeechCTCTokenizer, got {type(tokenizer).__name__}")
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    def __call__(
        self,
        audio: Any = None,
        text: Optional[Union[str, Sequence[str]]] = None,
        sampling_rate: Optional[int] = None,
        padding: Union[bool, str] = True,
        return_tensors: Optional[str] = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """audio -> input_values (+ attention_mask); text -> labels (padded with -100). With text only,
        the tokenizer's input_ids / attention_mask are returned. Extra keyword arguments go to the
        feature extractor (max_length, truncation, pad_to_multiple_of, return_attention_mask).

        Labels are padded to the longest text of the batch; padding=False keeps unequal rows (as lists).
        """
        if audio is None and text is None:
            raise ValueError("give audio, text or both")
        if text is not None:
            encoded = self.tokenizer(text, padding=padding is not False and padding != "do_not_pad",
                                     return_tensors=return_tensors)
            if audio is None:
                return encoded
        inputs = self.feature_extractor(audio, sampling_rate=sampling_rate, padding=padding,
                                        return_tensors=return_tensors, **kwargs)
        if text is not None:
            if isinstance(text, str):
                labels = [encoded["input_ids"]] if return_tensors is None else encoded["input_ids"]
                mask = [encoded["attention_mask"]] if return_tensors is None else encoded["attention_mask"]
            else:
                labels, mask = encoded["input_ids"], encoded["attention_mask"]
            batch = len(inputs["input_values"])
            if len(labels) != batch:
                raise ValueError(f"{batch} audio utterance(s) but {len(labels)} text(s): give one text per utterance")
            inputs["labels"] = _mask_labels(labels, mask)
        return inputs

    def decode(self, *args: Any, **kwargs: Any) -> Union[str, CTCDecoderOutput]:
        """UniSpeechCTCTokenizer.decode."""
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> Union[List[str], CTCDecoderOutput]:
        """UniSpeechCTCTokenizer.batch_decode."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def offsets_to_seconds(
        self, offsets: List[Dict[str, Any]], inputs_to_logits_ratio: int, ndigits: Optional[int] = None
    ) -> List[Dict[str, Any]]:
        """Offsets in frames -> with start_time / end_time in seconds at this extractor's sampling rate
        (inputs_to_logits_ratio: the model config's, the product of the conv strides)."""
        return offsets_to_seconds(offsets, inputs_to_logits_ratio, self.feature_extractor.sampling_rate, ndigits)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> List[str]:
        """Write preprocessor_config.json and the tokenizer files into one folder."""
        return [self.feature_extractor.save_pretrained(save_directory)] + self.tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], **tokenizer_overrides: Any) -> "UniSpeechProcessor":
        """Load both halves from one local folder (as written by save_pretrained or by transformers)."""
        return cls(UniSpeechFeatureExtractor.from_pretrained(folder),
                   UniSpeechCTCTokenizer.from_pretrained(folder, **tokenizer_overrides))

