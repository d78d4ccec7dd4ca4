"""The Pallas Triton backend: forward and backward kernels, lowered through Triton.

``forward.flash_forward`` returns ``(out, lse)``; ``backward.flash_backward``
returns ``(dq, dk, dv)``. Nothing outside ``pallas_flash.attention`` calls them.
"""
