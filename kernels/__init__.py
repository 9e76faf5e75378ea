"""One op a file: a plain-torch `<op>_reference` beside a dispatcher `<op>`.

The dispatchers pick a fused CuPy kernel for CUDA tensors once those kernels exist (GPU kernels issue);
today every device runs the reference.
"""
