"""Glue between Triton's Python backend and the package, shared by every model.py.

`pb` is the `triton_python_backend_utils` module, passed in because it exists only inside the
backend's stub process. Modules: `tensors` (inputs and outputs), `responses` (errors and sends),
`workers` (thread pools, cancellation polls), `metrics` (/metrics families), `token_stream`
(the `tensorrt_llm` responses of one request).
"""

import faulthandler

# A stub that dies of a signal (SIGSEGV, SIGBUS, SIGABRT) writes every thread's Python stack to
# its stderr, which is the server's log: Triton itself only notices later that the stub is gone.
faulthandler.enable()
