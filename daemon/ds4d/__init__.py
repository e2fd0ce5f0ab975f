"""ds4d: the DeepSeek V4 Flash inference daemon and engine.

The package owns everything that touches the model: GGUF loading (`gguf_file`, `shape`, `weights`), the forward
pass (`model`, `state`, `ops`), text (`tokenizer`, `chat`, `sampling`, `output`), and later the engine and the
daemon. Clients never import it; they speak the socket protocol through `ds4c`.
"""

import os as _os

# The native kernels own the cores. numpy's BLAS threads would fight the kernels' worker pool for them (on a
# 2-core machine a decode step got 5x slower), and the small products left to numpy don't need threads: so
# unless the user says otherwise, BLAS runs single-threaded. Must happen before numpy is first imported.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
