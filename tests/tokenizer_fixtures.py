"""A real tokenizer for tests: Mistral-7B's sentencepiece `tokenizer.model`, the one SOLAR-10.7B ships.

The PyPI package mistral-common (in the test extra) carries it as `mistral_common/data/tokenizer.model.v1`.
`mistral_tokenizer_model()` returns its path (found without importing mistral_common, whose import pulls in
pydantic and more); tests/conftest.py exposes it as the session fixture `mistral_tokenizer_model`.

The reference for what it must produce is sentencepiece itself (which is what transformers 4.35.2, the
SOLAR model card's pin, produces), never transformers 5.x's converted tokenizer: that one differs on runs
of spaces and leading spaces (code indentation, double spaces) in a large share of ordinary texts.

TEXTS are ordinary and whitespace-heavy strings for checks against sentencepiece.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

#: sha256 of Mistral-7B-v0.1's tokenizer.model (SOLAR-10.7B's is the same file).
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "SOLAR-10.7B is a 48-layer model; it was made by Depth Up-Scaling Mistral-7B.",
    "Hello  world",  # double space
    "a  b   c    d",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "   ",
    "",
    "\n",
    "\n\n\n",
    " \n \n ",
    "line one\nline two\n\nline four\n",
    "\ttab\t\tand\r\nCRLF\r\n",
    "def f(x):\n    return x * 2\n",
    "    def f(x):\n        if x:\n            return [i  for i in x]\n        return None\n",
    "class A:\n\tdef g(self):\n\t\tpass\n",
    "    leading indent\n  then less\n",
    "x = {\n  'a': 1,\n  'b': [1,  2],\n}\n",
    "### User:\nHi there!\n\n### Assistant:\n",
    "Café naïve résumé crème brûlée Ångström",
    "日本語のテキストです。 中文：你好，世界！ 한국어 문장입니다",
    "emoji 😀🚀 👍🏽 ❤️ 🇰🇷",
    "mixed  日本  café 😀 123 4567.89 €5",
    "\u200bzero width\u200b and combining e\u0301",
    "1234567890 3.14159 -42 1e-5",
]


def mistral_tokenizer_model() -> Path:
    """Path of the real Mistral-7B `tokenizer.model`; skips the test when mistral-common is not installed, fails
    when the file is not the expected one."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip('needs the PyPI package mistral-common (the test extra: pip install -e ".[test]"), which ships '
                    "Mistral-7B's real tokenizer.model")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.fail(f"mistral-common is installed but has no {path}; a newer release may have moved it")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MISTRAL_TOKENIZER_SHA256:
        pytest.fail(f"{path} has sha256 {digest}, not Mistral-7B's tokenizer.model ({MISTRAL_TOKENIZER_SHA256})")
    return path
