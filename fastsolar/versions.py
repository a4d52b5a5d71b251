"""Every version gate of fastsolar, in one place (`packaging.version`, never string or regex matching).

- transformers: `patch_hf` mirrors the Llama/Mistral decoder and attention code of the versions in
  `SUPPORTED_TRANSFORMERS` and refuses any other (`check_transformers`). The range is what the suite tests:
  CI runs tests/hf/test_hf_patch.py (and the other transformers-dependent files) on its lowest release (5.17,
  the lent GPU image's) and on its newest. Within the range one thing changed that the patched attention
  forward must follow: from 5.24 the attention forward's cache argument is `cache` (was `past_key_values`)
  and it hands its kwargs to `cache.update` (`transformers_cache_api`).
- triton + numpy: Triton's CPU interpreter up to 3.6 converts 1-element numpy arrays to Python ints, which
  numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a
  loop over run-time bounds fails there (`interpreter_numpy_conflict`). Compiled kernels on a GPU are not
  affected. Read from package metadata, so that asking does not import triton (the test suite must set
  TRITON_INTERPRET before the first import).
- pytest-timeout: `--session-timeout` (bench/gpu_check.py ends a pytest phase cleanly before its time limit)
  exists from 2.3.

This module imports nothing of fastsolar, torch or triton, so bench/gpu_check.py loads it on its own.
"""
from __future__ import annotations

import importlib.metadata
import types

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: transformers versions patch_hf accepts: 5.17.0 (oldest tested, the lent GPU image's) to 5.25.x (newest tested).
SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.17,<5.26")
#: The first transformers whose attention forward takes `cache=` (not `past_key_values=`).
_CACHE_RENAMED = Version("5.24")

#: Triton releases whose interpreter breaks on numpy >= INTERPRETER_NUMPY_BAD (triton 3.9 is known good).
_INTERPRETER_TRITON_BAD = SpecifierSet("<3.7")
_INTERPRETER_NUMPY_BAD = SpecifierSet(">=2.4")
#: The error that conflict raises, as the interpreter reports it (tests/conftest.py matches failures on it).
INTERPRETER_NUMPY_ERROR = "only 0-dimensional arrays can be converted to Python scalars"


_PYTEST_SESSION_TIMEOUT = SpecifierSet(">=2.3")


def installed_version(name: str) -> Version | None:
    """The installed distribution's version, or None when it is not installed or not PEP 440."""
    try:
        return Version(importlib.metadata.version(name))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def transformers_version() -> Version:
    """The version of the transformers that `import transformers` gives (its own `__version__`)."""
    import transformers

    try:
        return Version(transformers.__version__)
    except InvalidVersion:
        raise ValueError(f"cannot read the transformers version {transformers.__version__!r}") from None


def spec_str(spec: SpecifierSet) -> str:
    """A specifier set as people write it, lower bound first: ">=5.17,<5.26"."""
    return ",".join(sorted((str(s) for s in spec), reverse=True))


def check_transformers() -> Version:
    """Raise ValueError unless transformers is in SUPPORTED_TRANSFORMERS; returns its version."""
    version = transformers_version()
    if not SUPPORTED_TRANSFORMERS.contains(version, prereleases=True):
        wanted = spec_str(SUPPORTED_TRANSFORMERS)
        raise ValueError(
            f"patch_hf supports transformers {wanted} (tested at both ends); this is {version}. The patched "
            f"forwards mirror those versions' Llama/Mistral code. Install one (pip install \"transformers{wanted}\"), "
            "or, after tests/hf/test_hf_patch.py passes on a new version, widen fastsolar.versions.SUPPORTED_TRANSFORMERS"
        )
    return version


def transformers_cache_api(version: Version | None = None) -> types.SimpleNamespace:
    """How the installed transformers' Llama/Mistral attention forward takes its KV cache:
    `name` (the keyword argument) and `update_kwargs` (whether it passes its kwargs to `cache.update`)."""
    renamed = (version or transformers_version()) >= _CACHE_RENAMED
    return types.SimpleNamespace(name="cache" if renamed else "past_key_values", update_kwargs=renamed)


def interpreter_numpy_conflict() -> str | None:
    """Why Triton's CPU interpreter cannot run loop kernels with the installed triton and numpy, or None."""
    triton, numpy = installed_version("triton"), installed_version("numpy")
    if triton is None or numpy is None:
        return None
    if _INTERPRETER_TRITON_BAD.contains(triton, prereleases=True) and _INTERPRETER_NUMPY_BAD.contains(
        numpy, prereleases=True
    ):
        return (
            f"triton {triton} with numpy {numpy}: Triton's CPU interpreter (triton < 3.7) fails on numpy >= 2.4 "
            f"with {INTERPRETER_NUMPY_ERROR!r} in kernels that loop over run-time bounds; "
            'use numpy<2.4 (pip install "numpy<2.4") or triton >= 3.7, or run on a GPU'
        )
    return None


def pytest_session_timeout_supported() -> bool:
    """Whether the installed pytest-timeout has `--session-timeout`."""
    version = installed_version("pytest-timeout")
    return version is not None and _PYTEST_SESSION_TIMEOUT.contains(version)
