"""`python -m doge_jax.generate --checkpoint DIR --prompt ...`: sampling from the command line (doge_jax.cli.generate)."""

import sys

from doge_jax.cli.generate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
