"""ds4c: the thin client of the ds4 daemon (library, REPL, pipe mode).

Imports only the standard library, msgpack and prompt_toolkit: never numpy and never `ds4d`. The wire contract
lives in `ds4c.protocol`, the single copy that the daemon imports too.
"""

__version__ = "0.1.0"
