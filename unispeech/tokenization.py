"""Character-level CTC tokenizer with the same results as transformers' Wav2Vec2CTCTokenizer.

Encoding: text -> ids, one id per character, spaces -> the word delimiter token ("|"); multi-character
vocabulary entries ("<pad>", "<unk>", ...) and added tokens are matched first (longest match) and
swallow the whitespace next to them, as in transformers. Characters outside the vocabulary -> unk.
Decoding CTC output [T] (one id per logit frame): optional removal of special tokens, grouping of
repeated ids, removal of the blank (= the pad token), word delimiter -> " ". Character / word offsets
are in frames: a character covers frames [start_offset, end_offset); seconds = frames *
inputs_to_logits_ratio / sampling_rate (see offsets_to_seconds).

Files (interchangeable with transformers): vocab.json (token -> id, or {language: {token -> id}} with
target_lang), tokenizer_config.json, and the older special_tokens_map.json / added_tokens.json.
"""
from __future__ import annotations

import json
import os
from itertools import groupby
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .feature_extraction import BatchFeature, read_json_object, resolve_padding, round_up

VOCAB_NAME = "vocab.json"
CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
ADDED_TOKENS_NAME = "added_tokens.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class AddedToken:
    """A vocabulary entry matched as a whole in text; lstrip/rstrip swallow whitespace on that side."""

    def __init__(self, content: str, lstrip: bool = False, rstrip: bool = False, special: bool = False):
        self.content, self.lstrip, self.rstrip, self.special = content, lstrip, rstrip, special

    def to_dict(self) -> Dict[str, Any]:
        return {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": False,
            "rstrip": self.rstrip,
            "single_word": False,
            "special": self.special,
        }


class CTCDecoderOutput(BatchFeature):
    """Decoded text with its offsets: fields text, char_offsets, word_offsets (dict or attribute access)."""


def offsets_to_seconds(
    offsets: List[Dict[str, Any]], inputs_to_logits_ratio: int, sampling_rate: int, ndigits: Optional[int] = None
) -> List[Dict[str, Any]]:
    """Copies of char/word offset dicts with start_time / end_time in seconds added.

    time = offset * inputs_to_logits_ratio / sampling_rate (the model config's inputs_to_logits_ratio is
    the product of its conv strides, 320 for UniSpeech); ndigits rounds the times when given.
    """
    if inputs_to_logits_ratio <= 0 or sampling_rate <= 0:
        raise ValueError("inputs_to_logits_ratio and sampling_rate must be positive")
    stride = inputs_to_logits_ratio / sampling_rate
    result = []
    for item in offsets:
        start, end = int(item["start_offset"]) * stride, int(item["end_offset"]) * stride
        if ndigits is not None:
            start, end = round(start, ndigits), round(end, ndigits)
        result.append({**item, "start_time": start, "end_time": end})
    return result


def _token_content(value: Any) -> Optional[str]:
    """Special tokens are saved as strings or as AddedToken dicts ({"content": ...})."""
    return value["content"] if isinstance(value, dict) else value


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class UniSpeechCTCTokenizer:
    """Character tokenizer for CTC heads (vocab.json); blank = pad token, word delimiter "|"."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: Optional[Union[str, os.PathLike]] = None,
        bos_token: Optional[str] = "<s>",
        eos_token: Optional[str] = "</s>",
        unk_token: Optional[str] = "<unk>",
        pad_token: Optional[str] = "<pad>",
        word_delimiter_token: Optional[str] = "|",
        replace_word_delimiter_char: str = " ",
        do_lower_case: bool = False,
        target_lang: Optional[str] = None,
        clean_up_tokenization_spaces: bool = False,
        padding_side: str = "right",
        vocab: Optional[Dict[str, Any]] = None,
        added_tokens_decoder: Optional[Dict[Any, Any]] = None,
        **kwargs: Any,
    ):
        if (vocab_file is None) == (vocab is None):
            raise ValueError("give exactly one of vocab_file (a vocab.json path) or vocab (a dict)")
        if vocab is None:
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"vocabulary file {os.fspath(vocab_file)!r} does not exist")
            vocab = read_json_object(os.fspath(vocab_file))
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.vocab = vocab
        if target_lang is not None:
            if target_lang not in vocab or not isinstance(vocab[target_lang], dict):
                raise ValueError(f"target_lang {target_lang!r} is not a language of this nested vocabulary")
            self.encoder: Dict[str, int] = dict(vocab[target_lang])
        else:
            self.encoder = dict(vocab)
        bad = [k for k, v in self.encoder.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"vocabulary values must be integer ids; bad entries: {bad[:5]} "
                             "(nested vocab? pass target_lang)")
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.word_delimiter_token = word_delimiter_token
        self.replace_word_delimiter_char = replace_word_delimiter_char
        self.do_lower_case = bool(do_lower_case)
        self.target_lang = target_lang
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.padding_side = padding_side
        kwargs.pop("tokenizer_class", None)
        kwargs.pop("processor_class", None)
        self.extra_config = kwargs
        self._build_added_tokens(added_tokens_decoder or {})

    def _build_added_tokens(self, saved: Dict[Any, Any]) -> None:
        """The added-token table, in transformers' order: saved entries, then special tokens (appended
        after the vocabulary when missing from it), then every multi-character vocabulary entry."""
        self.added: Dict[int, AddedToken] = {}
        for index, token in saved.items():
            if isinstance(token, dict):
                token = AddedToken(token["content"], token.get("lstrip", False), token.get("rstrip", False),
                                   token.get("special", False))
            elif isinstance(token, str):
                token = AddedToken(token)
            self.added[int(index)] = token
        added_contents = {t.content for t in self.added.values()}
        for content in self.all_special_tokens:
            if content not in added_contents:
                self._add(AddedToken(content, special=True))
        for content in self.encoder:
            if len(content) > 1:
                self._add(AddedToken(content, lstrip=True, rstrip=True))
        self.added_encoder = {t.content: i for i, t in sorted(self.added.items())}
        self._match_lengths = sorted({len(c) for c in self.added_encoder}, reverse=True)

    def _add(self, token: AddedToken) -> None:
        vocab = self.get_vocab()
        index = vocab.get(token.content, len(vocab))
        self.added[index] = token

    # ------------------------------------------------------------------ vocabulary
    @property
    def all_special_tokens(self) -> List[str]:
        """bos, eos, unk, pad, word delimiter and tokens saved as special (unset ones left out)."""
        tokens = [getattr(self, name) for name in SPECIAL_TOKEN_NAMES] + [self.word_delimiter_token]
        tokens += [t.content for t in getattr(self, "added", {}).values() if t.special]
        return list(dict.fromkeys(t for t in tokens if t is not None))

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def __len__(self) -> int:
        return len(self.get_vocab())

    def get_vocab(self) -> Dict[str, int]:
        vocab = dict(self.encoder)
        vocab.update({t.content: i for i, t in sorted(getattr(self, "added", {}).items())})
        return vocab

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[Optional[int], List[Optional[int]]]:
        if isinstance(tokens, str):
            if tokens in self.added_encoder:
                return self.added_encoder[tokens]
            unk = self.added_encoder.get(self.unk_token, self.encoder.get(self.unk_token))
            return self.encoder.get(tokens, unk)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]) -> Union[str, List[str]]:
        if isinstance(ids, (int, np.integer)):
            index = int(ids)
            if index in self.decoder:
                return self.decoder[index]
            return self.added[index].content if index in self.added else self.unk_token
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def _special_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.convert_tokens_to_ids(token)

    pad_token_id = property(lambda self: self._special_id(self.pad_token))
    unk_token_id = property(lambda self: self._special_id(self.unk_token))
    bos_token_id = property(lambda self: self._special_id(self.bos_token))
    eos_token_id = property(lambda self: self._special_id(self.eos_token))
    word_delimiter_token_id = property(lambda self: self._special_id(self.word_delimiter_token))

    # ------------------------------------------------------------------ encoding
    def _split_added(self, text: str) -> List[str]:
        """Cut text around added tokens (earliest, then longest match); whitespace next to a token with
        lstrip/rstrip is dropped."""
        pieces: List[str] = []
        start = i = 0
        while i < len(text):
            match = next((text[i:i + n] for n in self._match_lengths if text[i:i + n] in self.added_encoder), None)
            if match is None:
                i += 1
                continue
            if i > start:
                pieces.append(text[start:i])
            pieces.append(match)
            i = start = i + len(match)
        if start < len(text):
            pieces.append(text[start:])
        for k, piece in enumerate(pieces):
            token = self.added.get(self.added_encoder.get(piece, -1))
            if token is None:
                continue
            if token.rstrip and k + 1 < len(pieces):
                pieces[k + 1] = pieces[k + 1].lstrip()
            if token.lstrip and k > 0:
                pieces[k - 1] = pieces[k - 1].rstrip()
        return [piece for piece in pieces if piece]

    def tokenize(self, text: str) -> List[str]:
        """Text -> tokens: added tokens whole, every other character one token (upper-cased when
        do_lower_case, since such vocabularies hold upper-case letters), spaces -> word delimiter."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        tokens: List[str] = []
        for piece in self._split_added(text):
            if piece in self.added_encoder:
                tokens.append(piece)
                continue
            if self.do_lower_case:
                piece = piece.upper()
            if self.word_delimiter_token is not None:
                piece = piece.replace(" ", self.word_delimiter_token)
            tokens.extend(piece)
        return tokens

    def encode(self, text: str) -> List[int]:
        """Text -> ids (no special tokens are added, as for transformers' CTC tokenizer)."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        padding: Union[bool, str] = False,
        max_length: Optional[int] = None,
        truncation: bool = False,
        pad_to_multiple_of: Optional[int] = None,
        return_attention_mask: bool = True,
        return_tensors: Optional[str] = None,
    ) -> BatchFeature:
        """input_ids (+ attention_mask) for one text (a flat list) or a batch (a list of lists); padding
        uses pad_token_id on padding_side; return_tensors None / 'np' / 'pt' (int64)."""
        mode = resolve_padding(padding, max_length)
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        batched = isinstance(text, (list, tuple))
        if batched and len(text) == 0:
            raise ValueError("text is an empty batch")
        rows = [self.encode(t) for t in (text if batched else [text])]
        if truncation:
            rows = [row[:max_length] for row in rows]
        lengths = [len(row) for row in rows]
        target = max(lengths) if mode == "longest" else max_length
        target = round_up(target, pad_to_multiple_of) if mode != "do_not_pad" else None
        if target is not None and any(n < target for n in lengths) and self.pad_token_id is None:
            raise ValueError("padding needs a pad token, and this tokenizer has none")
        ids = [self._pad(row, target, self.pad_token_id) for row in rows]
        masks = [self._pad([1] * n, target, 0) for n in lengths]
        out = BatchFeature(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = masks
        kind = getattr(return_tensors, "value", return_tensors)
        if kind is not None:
            if kind not in ("np", "pt"):
                raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
            if len(set(len(row) for row in ids)) > 1:
                raise ValueError("cannot build one tensor from texts of different lengths; pass padding=True")
            for key in list(out):
                array = np.asarray(out[key], dtype=np.int64).reshape(len(rows), -1)
                out[key] = torch.from_numpy(array) if kind == "pt" else array
        elif not batched:
            for key in list(out):
                out[key] = out[key][0]
        return out

    def _pad(self, row: List[int], target: Optional[int], value: Optional[int]) -> List[int]:
        if target is None or len(row) >= target:
            return list(row)
        fill = [value] * (target - len(row))
        return list(row) + fill if self.padding_side == "right" else fill + list(row)

    # ------------------------------------------------------------------ decoding
    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        group_tokens: bool = True,
        spaces_between_special_tokens: bool = False,
        output_char_offsets: bool = False,
        output_word_offsets: bool = False,
    ) -> Union[str, CTCDecoderOutput]:
        """CTC ids [T] (list, 1-D numpy array or tensor) -> text, or a CTCDecoderOutput with
        char_offsets / word_offsets (in frames) when either offset flag is set.

        Order, as transformers: drop special tokens (skip_special_tokens; never the word delimiter),
        group repeats (group_tokens), drop blanks (pad token), word delimiter -> " ", join, strip.
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().tolist()
        elif isinstance(token_ids, np.ndarray):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (int, np.integer)):
            # transformers reads a single id as the characters of its token
            tokens = list(self.convert_ids_to_tokens(int(token_ids)))
        else:
            if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
                raise TypeError(f"decode takes a sequence of integer ids, got {type(token_ids).__name__}")
            if any(isinstance(i, (list, tuple)) for i in token_ids):
                raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
            bad = [i for i in token_ids if not isinstance(i, (int, np.integer)) or isinstance(i, bool)]
            if bad:
                raise TypeError(f"decode takes integer ids (an unknown id decodes as the unk token, as in "
                                f"transformers), got {bad[:3]!r}")
            tokens = self.convert_ids_to_tokens(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_tokens)
            tokens = [t for t in tokens if t not in special or t == self.word_delimiter_token]
        text, char_offsets, word_offsets = self._tokens_to_text(
            tokens, group_tokens, spaces_between_special_tokens, output_char_offsets, output_word_offsets
        )
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        if output_char_offsets or output_word_offsets:
            return CTCDecoderOutput(text=text, char_offsets=char_offsets, word_offsets=word_offsets)
        return text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        output_char_offsets: bool = False,
        output_word_offsets: bool = False,
        **kwargs: Any,
    ) -> Union[List[str], CTCDecoderOutput]:
        """decode for each row of a list of id lists / 2-D array / 2-D tensor [B, T]; with offsets, one
        CTCDecoderOutput whose fields are lists over the batch."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)) and sequences.ndim != 2:
            raise ValueError(f"batch_decode expects [batch, frames] ids, got shape {tuple(sequences.shape)}")
        if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__"):
            raise TypeError(f"batch_decode expects [batch, frames] ids, got {type(sequences).__name__}")
        decoded = [
            self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces,
                        output_char_offsets=output_char_offsets, output_word_offsets=output_word_offsets, **kwargs)
            for seq in sequences
        ]
        if output_char_offsets or output_word_offsets:
            return CTCDecoderOutput({k: [d[k] for d in decoded] for k in ("text", "char_offsets", "word_offsets")})
        return decoded

    def convert_tokens_to_string(
        self,
        tokens: List[str],
        group_tokens: bool = True,
        spaces_between_special_tokens: bool = False,
        output_char_offsets: bool = False,
        output_word_offsets: bool = False,
    ) -> Dict[str, Any]:
        """CTC tokens -> {"text", "char_offsets", "word_offsets"} (offsets None unless asked for)."""
        text, chars, words = self._tokens_to_text(
            tokens, group_tokens, spaces_between_special_tokens, output_char_offsets, output_word_offsets
        )
        return {"text": text, "char_offsets": chars, "word_offsets": words}

    def _tokens_to_text(self, tokens, group_tokens, spaces_between, want_chars, want_words):
        if not tokens:
            return "", [], []
        if group_tokens:
            runs = [(token, len(list(run))) for token, run in groupby(tokens)]
        else:
            runs = [(token, 1) for token in tokens]
        char_offsets = []
        frame = 0
        for token, count in runs:
            if token != self.pad_token:
                char = self.replace_word_delimiter_char if token == self.word_delimiter_token else token
                char_offsets.append({"char": char, "start_offset": frame, "end_offset": frame + count})
            frame += count
        text = (" " if spaces_between else "").join(c["char"] for c in char_offsets).strip()
        if self.do_lower_case:
            text = text.lower()
        words = self._word_offsets(char_offsets) if want_words else None
        return text, (char_offsets if want_chars else None), words

    def _word_offsets(self, char_offsets: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Words = maximal runs of characters other than the delimiter replacement (" ")."""
        words: List[Dict[str, Any]] = []
        for is_space, run in groupby(char_offsets, key=lambda c: c["char"] == self.replace_word_delimiter_char):
            if not is_space:
                run = list(run)
                words.append({"word": "".join(c["char"] for c in run),
                              "start_offset": run[0]["start_offset"], "end_offset": run[-1]["end_offset"]})
        return words

    # ------------------------------------------------------------------ files
    def to_dict(self) -> Dict[str, Any]:
        """The tokenizer_config.json content (transformers' field names and class name)."""
        config = dict(self.extra_config)
        config.update(
            added_tokens_decoder={str(i): t.to_dict() for i, t in sorted(self.added.items())},
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            unk_token=self.unk_token,
            pad_token=self.pad_token,
            word_delimiter_token=self.word_delimiter_token,
            replace_word_delimiter_char=self.replace_word_delimiter_char,
            do_lower_case=self.do_lower_case,
            target_lang=self.target_lang,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            padding_side=self.padding_side,
            tokenizer_class="Wav2Vec2CTCTokenizer",
        )
        return config

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> List[str]:
        """Write vocab.json, tokenizer_config.json and special_tokens_map.json; returns their paths."""
        os.makedirs(save_directory, exist_ok=True)
        special = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name) is not None}
        contents = {VOCAB_NAME: self.vocab, CONFIG_NAME: self.to_dict(), SPECIAL_TOKENS_MAP_NAME: special}
        paths = []
        for name, content in contents.items():
            path = os.path.join(save_directory, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            paths.append(path)
        return paths

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], **overrides: Any) -> "UniSpeechCTCTokenizer":
        """Load from a local folder holding vocab.json (+ tokenizer_config.json, special_tokens_map.json,
        added_tokens.json when present); keyword arguments override the saved settings."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise OSError(f"{folder!r} is not a local folder (this library does not download from a model hub)")
        vocab_file = os.path.join(folder, VOCAB_NAME)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no {VOCAB_NAME} in {folder!r}: a CTC tokenizer needs its vocabulary")
        config: Dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_MAP_NAME, CONFIG_NAME):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                config.update(read_json_object(path))
        added_path = os.path.join(folder, ADDED_TOKENS_NAME)
        if os.path.isfile(added_path) and "added_tokens_decoder" not in config:
            config["added_tokens_decoder"] = {i: c for c, i in read_json_object(added_path).items()}
        for name in SPECIAL_TOKEN_NAMES + ("word_delimiter_token",):
            if name in config:
                config[name] = _token_content(config[name])
        for name in ("model_max_length", "backend", "additional_special_tokens", "extra_special_tokens"):
            config.pop(name, None)
        config.update(overrides)
        return cls(vocab_file, **config)
