"""What every Triton op here shares: whether the kernels were built for the interpreter, and the dispatch rule."""
import triton

# Read once at import, when triton.jit decides whether the kernels are built for the interpreter; reading the
# environment again later could send CPU tensors to compiled GPU kernels.
TRITON_INTERPRETED = triton.knobs.runtime.interpret


def use_triton(tensor) -> bool:
    """Triton on CUDA tensors, or on any device when the kernels were built for the interpreter."""
    return tensor.is_cuda or TRITON_INTERPRETED
