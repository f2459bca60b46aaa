"""`python -m doge_jax.train --config=configs/doge_tiny.py ...`: the training command (doge_jax.cli.train)."""

from doge_jax.cli.train import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    run()
