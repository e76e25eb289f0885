"""UniSpeechConfig: every field of transformers' UniSpeechConfig (5.x) with the same defaults, plus
the switches of this library (``attn_implementation``, ``kernel_backend``: one rule for both,
``attention_implementation``; ``batch_invariant_group_norm``) and the pre-training objective's fields transformers lacks
(``pretraining_ctc_weight``, ``pretraining_ctc_blank_id``; see unispeech.pretraining).

``batch_invariant_group_norm`` (default True): a padded batch gives every utterance the output it gets
alone. The group norm of "group" checkpoints then takes its statistics over each utterance's real
frames (those of ``attention_mask``); every other part of the model is per-utterance already. False
restores transformers' padded numerics, statistics over the padded length, so that an utterance's
output depends on what it is batched with: for bit-parity checks against transformers.

config.json compatibility: the file we write is read by transformers' UniSpeechConfig and we read
theirs. Our three switches are written nested under ``"unispeech_kernels"`` because transformers
rejects ``"attn_implementation": "triton"`` at the top level; a top-level key is accepted on read.
Unknown keys (fields of older transformers versions, ``adapter_attn_dim``...) are kept as
attributes and written back, as transformers does. ``to_unispeech_config`` converts a transformers
UniSpeechConfig object (what our model classes do when given one).
"""
from __future__ import annotations

import copy
import functools
import json
import operator
import os
from typing import Any, Dict

MODEL_TYPE = "unispeech"
CONFIG_NAME = "config.json"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "triton")
KERNEL_BACKENDS = ("auto", "torch", "triton", "cuda")
OURS_KEY = "unispeech_kernels"  # config.json key holding our switches

# transformers' UniSpeechConfig fields, in their order, with their defaults
HF_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout=0.1, activation_dropout=0.1,
    attention_dropout=0.1, feat_proj_dropout=0.0, feat_quantizer_dropout=0.0, final_dropout=0.1,
    layerdrop=0.1, initializer_range=0.02, layer_norm_eps=1e-5, feat_extract_norm="group",
    feat_extract_activation="gelu", conv_dim=(512, 512, 512, 512, 512, 512, 512),
    conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=False,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=False,
    apply_spec_augment=True, mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2,
    mask_feature_prob=0.0, mask_feature_length=10, mask_feature_min_masks=0,
    num_codevectors_per_group=320, num_codevector_groups=2, contrastive_logits_temperature=0.1,
    num_negatives=100, codevector_dim=256, proj_codevector_dim=256, diversity_loss_weight=0.1,
    ctc_loss_reduction="mean", ctc_zero_infinity=False, use_weighted_layer_sum=False,
    classifier_proj_size=256, num_ctc_classes=80, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    replace_prob=0.5,
)
# fields every transformers config carries (PreTrainedConfig), with their defaults
COMMON_DEFAULTS: Dict[str, Any] = dict(
    architectures=None, output_hidden_states=False, output_attentions=False, return_dict=True,
    dtype=None, chunk_size_feed_forward=0, is_encoder_decoder=False, problem_type=None,
)
OUR_DEFAULTS: Dict[str, Any] = dict(attn_implementation=None, kernel_backend="auto",
                                    batch_invariant_group_norm=True,
                                    # pre-training objective (unispeech.pretraining): CTC weight alpha,
                                    # CTC blank id (None: pad_token_id)
                                    pretraining_ctc_weight=0.5, pretraining_ctc_blank_id=None)
DERIVED = ("num_feat_extract_layers", "model_type", "transformers_version", "_name_or_path")


def check_attn_implementation(name) -> str:
    if name is not None and name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {name!r}; valid: {list(ATTN_IMPLEMENTATIONS)}")
    return name


def attention_implementation(attn_implementation, kernel_backend: str) -> str:
    """The one rule for the two switches. ``kernel_backend`` chooses the backend of the three hot
    spots (feature encoder, positional conv, attention): "torch", "triton", "cuda" (the CUDA
    extension where an op has it, Triton elsewhere: attention has none) or "auto" (the dispatcher
    picks per op; for attention that is SDPA). ``attn_implementation``, when set, names the
    attention instead and wins over ``kernel_backend`` for it: "eager" (matmul + softmax, returns
    weights), "sdpa" (torch SDPA) or "triton" (Triton, falling back to SDPA with a warning where it
    cannot run). Unset (None), attention follows ``kernel_backend``: "triton" / "cuda" -> "triton",
    "torch" / "auto" -> "sdpa"."""
    if attn_implementation is not None:
        return attn_implementation
    return "triton" if kernel_backend in ("triton", "cuda") else "sdpa"


def check_kernel_backend(name) -> str:
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel_backend {name!r}; valid: {list(KERNEL_BACKENDS)}")
    return name


class UniSpeechConfig:
    """Configuration of a UniSpeech model; see transformers' UniSpeechConfig for every field."""

    model_type = MODEL_TYPE

    def __init__(self, id2label=None, label2id=None, num_labels=None, **kwargs):
        ours = kwargs.pop(OURS_KEY, None) or {}
        for name in DERIVED:
            kwargs.pop(name, None)
        if "torch_dtype" in kwargs:  # the older spelling
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        for name, default in {**HF_DEFAULTS, **COMMON_DEFAULTS, **OUR_DEFAULTS}.items():
            value = kwargs.pop(name, ours.get(name, default))
            setattr(self, name, list(value) if isinstance(value, tuple) else value)
        for name, value in kwargs.items():  # unknown keys: kept and written back, as transformers
            setattr(self, name, value)
        self._set_labels(id2label, label2id, num_labels)
        self.validate()

    # our switches are validated whenever they are set
    @property
    def attn_implementation(self) -> str:
        """The attention that runs (``attention_implementation``): the one set, else kernel_backend's."""
        return attention_implementation(self._attn_implementation, self.kernel_backend)

    @attn_implementation.setter
    def attn_implementation(self, name):
        self._attn_implementation = check_attn_implementation(name)

    @property
    def kernel_backend(self) -> str:
        return self._kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, name):
        self._kernel_backend = check_kernel_backend(name)

    def _set_labels(self, id2label, label2id, num_labels):
        if id2label is None:
            n = num_labels if num_labels is not None else 2
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.label2id = dict(label2id) if label2id is not None else {v: k for k, v in self.id2label.items()}
        if num_labels is not None and num_labels != len(self.id2label):
            raise ValueError(f"num_labels={num_labels} does not match id2label with {len(self.id2label)} entries")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int):
        self._set_labels(None, None, n)

    @property
    def num_feat_extract_layers(self) -> int:
        return len(self.conv_dim)

    @property
    def inputs_to_logits_ratio(self) -> int:
        return functools.reduce(operator.mul, self.conv_stride, 1)

    def validate(self):
        check_field_types(self)
        n = len(self.conv_dim)
        if len(self.conv_stride) != n or len(self.conv_kernel) != n or n == 0:
            raise ValueError("conv_dim, conv_stride and conv_kernel must be non-empty and of equal length, got "
                             f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)}")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_conv_pos_embedding_groups "
                             f"{self.num_conv_pos_embedding_groups}")
        if self.ctc_loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"ctc_loss_reduction must be 'mean', 'sum' or 'none', got {self.ctc_loss_reduction!r}")
        check_attn_implementation(self.attn_implementation)
        check_kernel_backend(self.kernel_backend)
        if not 0.0 <= self.pretraining_ctc_weight <= 1.0:
            raise ValueError(f"pretraining_ctc_weight must be in [0, 1], got {self.pretraining_ctc_weight}")
        blank = self.pretraining_ctc_blank_id
        if blank is not None and not 0 <= blank < self.num_ctc_classes:
            raise ValueError(f"pretraining_ctc_blank_id {blank} is outside [0, num_ctc_classes={self.num_ctc_classes})")

    @staticmethod
    def valid_names():
        return sorted({*HF_DEFAULTS, *COMMON_DEFAULTS, *OUR_DEFAULTS, "id2label", "label2id", "num_labels"})

    def update(self, overrides: Dict[str, Any]):
        """Set known fields (a ValueError lists the valid names for an unknown one)."""
        known = set(self.valid_names()) | set(vars(self))
        for name in overrides:
            if name not in known:
                raise ValueError(f"unknown config field {name!r}; valid: {self.valid_names()}")
        for name, value in overrides.items():
            if name == "num_labels":
                self.num_labels = value
            else:
                setattr(self, name, list(value) if isinstance(value, tuple) else value)
        self.validate()

    def to_dict(self) -> Dict[str, Any]:
        """The config.json content: transformers' fields at the top level, ours under "unispeech_kernels"."""
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["num_feat_extract_layers"] = self.num_feat_extract_layers
        out["model_type"] = MODEL_TYPE
        if out.get("dtype") is not None:
            out["dtype"] = str(out["dtype"]).replace("torch.", "")
        out[OURS_KEY] = {name: getattr(self, name) for name in OUR_DEFAULTS}
        out[OURS_KEY]["attn_implementation"] = self._attn_implementation  # None: follows kernel_backend
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "UniSpeechConfig":
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config has model_type {model_type!r}, expected {MODEL_TYPE!r}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path) -> "UniSpeechConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.to_json_file(os.path.join(folder, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, folder, **overrides) -> "UniSpeechConfig":
        path = os.path.join(folder, CONFIG_NAME) if os.path.isdir(folder) else folder
        if not os.path.isfile(path):
            raise OSError(f"no {CONFIG_NAME} at {folder!r}: a local folder is needed (there is no access to the "
                          "model hub)")
        config = cls.from_json_file(path)
        config.update(overrides)
        return config

    def copy(self) -> "UniSpeechConfig":
        return copy.deepcopy(self)

    def __eq__(self, other):
        return isinstance(other, UniSpeechConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


NULLABLE = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
POSITIVE = ("hidden_size", "num_attention_heads", "intermediate_size", "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups", "conv_dim", "conv_kernel", "conv_stride", "vocab_size",
            "classifier_proj_size", "codevector_dim", "proj_codevector_dim", "num_codevectors_per_group",
            "num_codevector_groups")


def check_field_types(config):
    """Every transformers field holds its default's type (an int where the default is an int, a
    list of ints for the conv shapes...), sizes are positive: a TypeError / ValueError names the key."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    for name, default in HF_DEFAULTS.items():
        value = getattr(config, name)
        if value is None and name in NULLABLE:
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "a bool"
        elif isinstance(default, int):
            ok, kind = is_int(value), "an int"
        elif isinstance(default, float):
            ok, kind = is_int(value) or isinstance(value, float), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:
            ok, kind = isinstance(value, (list, tuple)) and all(map(is_int, value)), "a list of ints"
        if not ok:
            raise TypeError(f"config field {name!r} must be {kind}, got {value!r} ({type(value).__name__})")
        if name in POSITIVE and min(value if isinstance(value, (list, tuple)) else [value], default=1) < 1:
            raise ValueError(f"config field {name!r} must be positive, got {value!r}")
    if config.num_hidden_layers < 0:
        raise ValueError(f"config field 'num_hidden_layers' must be >= 0, got {config.num_hidden_layers}")


def to_unispeech_config(config, user: str) -> UniSpeechConfig:
    """``config`` as our UniSpeechConfig: ours as it is; transformers' UniSpeechConfig (any config
    with ``to_dict()``) converted from what its config.json holds. ``user`` names the caller in errors."""
    if isinstance(config, UniSpeechConfig):
        return config
    if callable(getattr(config, "to_dict", None)):
        return UniSpeechConfig.from_dict(config.to_dict())
    raise TypeError(f"{user} needs a UniSpeechConfig (unispeech's or transformers'), got "
                    f"{type(config).__module__}.{type(config).__qualname__}")
