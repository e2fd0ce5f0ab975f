"""ds4d: the DeepSeek V4 Flash inference daemon and engine.

The package owns everything that touches the model: GGUF loading (`gguf_file`, `shape`, `weights`), the forward
pass (`model`, `state`, `ops`), text (`tokenizer`, `chat`, `sampling`), and later the engine and the daemon.
Clients never import it; they speak the socket protocol through `ds4c`.
"""

__version__ = "0.1.0"
