"""Declarative backend dispatch shared by every op.

An op (``Op``) declares its inputs once: an ``Inputs`` dataclass that the input checks, every
backend and the reasons share. Each backend declares what it can run as attributes: the runtime it
needs (``torch``; ``triton``: Triton kernels, on CUDA from ``min_capability`` or on the CPU under
TRITON_INTERPRET=1; ``cuda``: the compiled extension), dtypes, activations, features of the op
(training, dropout...) and size limits; ``not_supported_reasons(inputs)`` adds only what those
cannot say. A composite backend (``parts``) runs other backends on pieces of the input and takes
their reasons. ``python -m unispeech_kernels.info --matrix`` prints these declarations.

``Op.__call__`` takes the backends in preference order cuda > triton > torch and stops at the first
that can run the input; a forced backend (argument or environment variable) that cannot run it
raises one ``BackendUnavailableError`` listing why every backend was rejected; with
``fallback=True`` the backend asked for is a preference (the environment variable beats it) that,
when it cannot run the input, warns once naming the reason and lets the dispatcher pick. Reasons are formatted
only for the backends looked at; ``Op.last_reasons`` keeps them (``Op.reasons`` lists all).

Environment override: ``UNISPEECH_KERNELS_BACKEND=triton`` forces every op;
``UNISPEECH_KERNELS_BACKEND=attention=torch,pos_conv=triton`` forces single ops (an op's variant, such
as attention_packed, obeys its op's name too). Unknown op names and backends raise, listing the
valid ones.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from typing import Callable, Optional

import torch

from . import _cuda
from ._runtime import several_devices_reason, triton_device_reason

log = logging.getLogger("unispeech_kernels.dispatch")

BACKEND_NAMES = ("cuda", "triton", "torch")  # preference order
ENV_VAR = "UNISPEECH_KERNELS_BACKEND"
OPT_IN = "opt-in only (not selected automatically; force it to use it)"
# what each runtime runs on ({cc}: the backend's min_capability)
RUNTIMES = {"torch": "any device torch runs on", "triton": "CUDA sm_{cc}+, or the CPU under TRITON_INTERPRET=1",
            "cuda": "CUDA, with the extension built for the device's architecture"}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run the given input; the message lists every reason."""


class Inputs:
    """Base of an op's inputs dataclass. Subclasses define ``tensors`` (every tensor argument, for
    the device checks), ``float_tensors`` (those whose dtype must be supported), and where they
    apply ``activation``, ``features`` (what the call needs: "training" when autograd will need a
    backward, and the op's own, e.g. "dropout") and ``sizes`` ({name: value} compared with the
    backends' limits)."""

    activation: Optional[str] = None

    @property
    def tensors(self) -> tuple:
        raise NotImplementedError

    @property
    def float_tensors(self) -> tuple:
        return self.tensors

    @property
    def features(self) -> frozenset:
        return frozenset(("training",)) if self.needs_grad else frozenset()

    @property
    def sizes(self) -> dict:
        return {}

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.float_tensors)


_SHORT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_names(dtypes) -> str:
    return ", ".join(_SHORT_DTYPES.get(d, str(d)) for d in dtypes)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # one of BACKEND_NAMES
    impl: Callable  # impl(inputs) -> outputs
    runtime: str = "torch"  # what it needs, see RUNTIMES
    dtypes: tuple = ()  # floating dtypes it takes; () = any
    activations: tuple = ()  # activations it computes; () = any
    features: tuple = ()  # the op's features it supports (Op.features)
    limits: tuple = ()  # ((size name, largest value), ...)
    min_capability: tuple = (8, 0)  # CUDA compute capability (runtime "triton")
    auto: bool = True  # False: only runs when forced (not yet measured faster than the next one)
    not_supported_reasons: Optional[Callable] = None  # inputs -> [reasons the attributes cannot give]
    parts: tuple = ()  # composite: ((what, backend, inputs -> [(label, inputs of that piece)]), ...)
    op: str = ""  # the op's name, set by Op.backend
    feature_phrases: tuple = ()  # the op's (feature, phrase when missing), set by Op.backend

    def _runtime_reason(self, inputs) -> Optional[str]:
        if self.runtime == "triton":
            return triton_device_reason(*inputs.tensors, min_capability=self.min_capability)
        if self.runtime == "cuda":
            if torch.compiler.is_compiling():  # the loader and device probes are eager-only code
                return "not selectable under torch.compile (the extension is probed eagerly only)"
            return several_devices_reason(inputs.tensors) or _cuda.cuda_reason(
                next(t.device for t in inputs.tensors if t is not None))
        return None

    def reason(self, inputs) -> Optional[str]:
        """None if this backend can run ``inputs``, else the first reason it cannot (checked in the
        order: features, runtime and device, dtypes, activation, limits, the rest)."""
        if self.parts:  # a composite's capabilities are its parts'
            for _, part, split in self.parts:
                for label, piece in split(inputs):
                    reason = part.reason(piece)
                    if reason:
                        return f"{label}: {reason}"
            return None
        missing = sorted(inputs.features - frozenset(self.features))
        if missing:
            return f"{self.name} {self.op} {dict(self.feature_phrases).get(missing[0], 'has no ' + missing[0])}"
        reason = self._runtime_reason(inputs)
        if reason:
            return reason
        dtypes = {t.dtype for t in inputs.float_tensors if t is not None}
        if len(dtypes) > 1:
            return f"mixed dtypes {sorted(map(str, dtypes))}"
        if self.dtypes and dtypes and not dtypes <= set(self.dtypes):
            return f"dtype {dtypes.pop()} not supported ({dtype_names(self.dtypes)})"
        if self.activations and inputs.activation not in self.activations:
            return (f"{self.name} {self.op} implements only exact {' / '.join(self.activations)}, got activation "
                    f"{inputs.activation!r}")
        sizes = inputs.sizes
        for what, largest in self.limits:
            if sizes[what] > largest:
                return f"{what} {sizes[what]} > {largest}"
        extra = self.not_supported_reasons(inputs) if self.not_supported_reasons else ()
        return extra[0] if extra else None


OPS: dict[str, "Op"] = {}  # every op by name, filled as the ops/ modules import


def resolve_backend(op_name: str, requested: Optional[str]) -> Optional[str]:
    """What a model-wide backend choice (``kernel_backend``, ``patch_model(backend=)``) forces on one
    op: None / "auto" -> None (the dispatcher picks); "cuda" -> "cuda" where the op has a CUDA
    backend and "triton" where it has none (the CUDA extension covers only some ops); otherwise the
    name itself. A forced backend that cannot run the input still raises, with every reason."""
    if requested in (None, "auto"):
        return None
    if requested == "cuda" and op_name in OPS and "cuda" not in OPS[op_name].backends:
        return "triton"
    return requested


def _parse_env(value: str) -> dict:
    """{op name or None (every op): backend} of the environment variable; unknown names raise."""
    from .ops import registered_ops

    valid_ops = sorted({name for op in registered_ops() for name in (op.name, op.env_alias) if name})
    by_target = {}
    for part in value.split(","):
        op, _, name = part.strip().rpartition("=")
        op, name = op.strip() or None, name.strip()
        if not name:
            continue
        if op is not None and op not in valid_ops:
            raise ValueError(f"{ENV_VAR}={value!r}: unknown op {op!r}; valid: {valid_ops}")
        if name not in BACKEND_NAMES:
            raise ValueError(f"{ENV_VAR}={value!r}: unknown backend {name!r}; valid: {list(BACKEND_NAMES)}")
        by_target[op] = name
    return by_target


def env_override(op_name: str, alias: Optional[str] = None) -> Optional[str]:
    """The backend forced for ``op_name`` by the environment variable, if any: an entry naming the
    op beats one naming its ``alias``, which beats a bare backend name (for every op, read as
    ``resolve_backend`` reads a model-wide choice), in any order."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    by_target = _parse_env(value)
    for target in (op_name, alias):
        if target is not None and target in by_target:
            return by_target[target]
    # a bare name is a choice for the whole model, as kernel_backend is: "cuda" means Triton where
    # an op has no CUDA kernel
    return resolve_backend(op_name, by_target.get(None))


_WARNED: set = set()


class Op:
    """The backends of one op, in preference order cuda > triton > torch, and its features:
    {feature name: what a backend without it "has no ..."}."""

    def __init__(self, name: str, *, features: Optional[dict] = None, env_alias: Optional[str] = None):
        self.name = name
        self.env_alias = env_alias  # a variant of another op also obeys that op's override
        self.features = dict(features or {})
        self.backends: dict[str, Backend] = {}
        self.last_reasons: dict[str, Optional[str]] = {}
        self.example_inputs: Optional[Callable] = None  # (device, dtype) -> a representative inputs object
        self.module = sys._getframe(1).f_globals.get("__name__")  # where it is defined
        OPS[name] = self

    def example(self, make: Callable):
        """Decorator: ``make(device, dtype)`` builds a representative input (what info reports on)."""
        self.example_inputs = make
        return make

    def backend(self, name: str, **capabilities):
        """Decorator: ``@op.backend("triton", runtime="triton", dtypes=..., ...)`` on impl(inputs)."""
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; valid: {BACKEND_NAMES}")

        def deco(impl):
            self.backends[name] = Backend(name, impl, op=self.name, feature_phrases=tuple(self.features.items()),
                                          **capabilities)
            return impl

        return deco

    def _reason(self, name: str, inputs) -> Optional[str]:
        backend = self.backends.get(name)
        return "not implemented for this op" if backend is None else backend.reason(inputs)

    def reasons(self, inputs) -> dict[str, Optional[str]]:
        """For each known backend: None if it can run these inputs, else why not."""
        return {name: self._reason(name, inputs) for name in BACKEND_NAMES}

    def _unavailable(self, forced: str, inputs) -> BackendUnavailableError:
        listing = "; ".join(f"{n}: {r or 'ok'}" for n, r in self.reasons(inputs).items())
        return BackendUnavailableError(f"{self.name}: backend {forced!r} cannot run this input ({listing})")

    def select(self, inputs, backend: Optional[str] = None, fallback: bool = False) -> Backend:
        if backend is not None and backend not in BACKEND_NAMES:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; valid: {BACKEND_NAMES} or None")
        # a fallback request is a preference, which the environment overrides; a plain one beats it
        env = env_override(self.name, self.env_alias)
        forced = (env or backend) if fallback else (backend or env)
        fallback = fallback and env is None
        if forced is not None:
            reason = self._reason(forced, inputs)
            self.last_reasons = {forced: reason}
            if reason is None:
                return self.backends[forced]
            if not fallback:
                raise self._unavailable(forced, inputs)
            chosen = self.select(inputs)
            self.last_reasons[forced] = reason
            if not torch.compiler.is_compiling() and (self.name, forced, reason) not in _WARNED:
                _WARNED.add((self.name, forced, reason))
                warnings.warn(f"{self.name}: {forced!r} was asked for but cannot run this input ({reason}); "
                              f"running {chosen.name!r}", stacklevel=4)
            return chosen
        reasons = {}
        self.last_reasons = reasons
        for name in BACKEND_NAMES:
            reason = self._reason(name, inputs)
            if reason is None and not self.backends[name].auto:
                reason = OPT_IN
            reasons[name] = reason
            if reason is None:
                if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
                    log.debug("%s -> %s (rejected: %s)", self.name, name, {n: r for n, r in reasons.items() if r})
                return self.backends[name]
        listing = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise BackendUnavailableError(f"{self.name}: no backend can run this input ({listing})")

    def __call__(self, inputs, backend: Optional[str] = None, fallback: bool = False):
        return self.select(inputs, backend, fallback).impl(inputs)
