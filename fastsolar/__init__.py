"""fastsolar: a lean, fast runtime for SOLAR-10.7B and its Llama-2 / Mistral relatives.

    from fastsolar import Solar, Tokenizer
    model = Solar.from_pretrained("SOLAR-10.7B-Instruct-v1.0")
    tok = Tokenizer.from_pretrained("SOLAR-10.7B-Instruct-v1.0")

Model-card code written for transformers runs with one changed import:

    from fastsolar import AutoModelForCausalLM, AutoTokenizer   # from_pretrained gives a Solar / Tokenizer
"""
from fastsolar.config import SolarConfig
from fastsolar.hf_compat import AutoModelForCausalLM, AutoTokenizer, BatchEncoding
from fastsolar.hf_patch import patch_hf
from fastsolar.model import KVCache, Solar
from fastsolar.tokenizer import Tokenizer
from fastsolar.upscale import upscale

__all__ = [
    "AutoModelForCausalLM", "AutoTokenizer", "BatchEncoding", "KVCache", "Solar", "SolarConfig", "Tokenizer",
    "patch_hf", "upscale",
]
__version__ = "0.1.0"
