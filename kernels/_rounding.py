"""Round-to-nearest-even stores that give the same bits under the Triton interpreter as on a GPU."""
import triton
import triton.language as tl

from ._common import interpreting

# The interpreter converts fp32 -> bf16 by truncating the mantissa (triton 3.9's numpy emulation),
# while GPUs round to nearest even; cast_rtne rounds by hand under the interpreter only, so CPU
# tests see the same bits a GPU produces. Read at trace time: compiled kernels use a plain cast.
_EMULATE_BF16_RTNE = tl.constexpr(interpreting())


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """x.to(DTYPE) with round-to-nearest-even to bf16 even under the interpreter (shared by the elementwise kernels)."""
    if _EMULATE_BF16_RTNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        # Add half an ulp of bf16, plus one more when the kept lsb is odd (ties to even); the
        # carry propagates into the exponent, which rounds the largest finite values to inf.
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y
