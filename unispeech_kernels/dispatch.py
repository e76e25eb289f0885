"""Declarative backend dispatch shared by every op.

Each op owns an ``Op`` registry. A backend registers an implementation and a ``check`` that
returns ``None`` when it can run the given inputs, or a short human-readable reason when it
cannot. ``Op.__call__`` picks the first backend (in preference order) whose check passes; a
forced backend (argument or environment variable) that cannot run the input raises one
``BackendUnavailableError`` listing why every backend was rejected. Nothing falls back silently:
the reasons of the last selection are kept (``Op.last_reasons``) and logged at debug level.

Environment override: ``UNISPEECH_KERNELS_BACKEND=triton`` forces every op;
``UNISPEECH_KERNELS_BACKEND=attention=torch,pos_conv=triton`` forces single ops (an op's variant, such
as attention_packed, obeys its op's name too).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("unispeech_kernels.dispatch")

BACKEND_NAMES = ("cuda", "triton", "torch")  # preference order
ENV_VAR = "UNISPEECH_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run the given input; the message lists every reason."""


@dataclass(frozen=True)
class Backend:
    name: str
    impl: Callable
    check: Callable[..., Optional[str]]  # same arguments as impl -> None or the reason it can't
    auto: bool = True  # False: only runs when forced (e.g. not yet measured faster than the next one)


def env_override(op_name: str, alias: Optional[str] = None) -> Optional[str]:
    """The backend forced for ``op_name`` by the environment variable, if any: an entry naming the
    op beats one naming its ``alias``, which beats a bare backend name (for every op, read as
    ``resolve_backend`` reads a model-wide choice), in any order."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    by_target = {}
    for part in value.split(","):
        part = part.strip()
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            by_target[op] = name
        elif part:
            by_target[None] = part
    target = next((t for t in (op_name, alias, None) if t in by_target), "none")
    forced = by_target.get(target)
    if forced is not None and forced not in BACKEND_NAMES:
        raise ValueError(f"{ENV_VAR}={value!r}: unknown backend {forced!r}; valid: {BACKEND_NAMES}")
    # a bare name is a choice for the whole model, as kernel_backend is: "cuda" means Triton where
    # an op has no CUDA kernel
    return resolve_backend(op_name, forced) if target is None else forced


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


class Op:
    """Registry of the backends of one op, in preference order cuda > triton > torch."""

    def __init__(self, name: str, env_alias: Optional[str] = None):
        self.name = name
        self.env_alias = env_alias  # a variant of another op also obeys that op's override
        self.backends: dict[str, Backend] = {}
        self.last_reasons: dict[str, Optional[str]] = {}
        OPS[name] = self

    def register(self, name: str, check: Callable[..., Optional[str]], auto: bool = True):
        """Decorator: ``@op.register("triton", check=fn)`` on the implementation. ``auto=False``
        keeps the backend out of automatic selection (it runs only when forced)."""
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; valid: {BACKEND_NAMES}")

        def deco(impl):
            self.backends[name] = Backend(name, impl, check, auto)
            return impl

        return deco

    def reasons(self, *args, **kwargs) -> dict[str, Optional[str]]:
        """For each known backend: None if it can run these inputs, else why not."""
        out = {}
        for name in BACKEND_NAMES:
            b = self.backends.get(name)
            out[name] = "not implemented for this op" if b is None else b.check(*args, **kwargs)
        return out

    def select(self, backend: Optional[str], *args, **kwargs) -> Backend:
        if backend is not None and backend not in BACKEND_NAMES:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; valid: {BACKEND_NAMES} or None")
        forced = backend or env_override(self.name, self.env_alias)
        reasons = self.reasons(*args, **kwargs)
        self.last_reasons = reasons
        if forced is not None:
            if reasons[forced] is None:
                return self.backends[forced]
            listing = "; ".join(f"{n}: {r or 'ok'}" for n, r in reasons.items())
            raise BackendUnavailableError(
                f"{self.name}: backend {forced!r} cannot run this input ({listing})")
        for name in BACKEND_NAMES:
            if reasons[name] is None and not self.backends[name].auto:
                reasons[name] = "opt-in only (not selected automatically; force it to use it)"
            if reasons[name] is None:
                if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
                    log.debug("%s -> %s (rejected: %s)", self.name, name,
                              {n: r for n, r in reasons.items() if r})
                return self.backends[name]
        listing = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise BackendUnavailableError(f"{self.name}: no backend can run this input ({listing})")

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        return self.select(backend, *args, **kwargs).impl(*args, **kwargs)
