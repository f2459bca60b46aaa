"""Data presets: `python -m doge_jax.train --config=configs/doge_60m.py --data=configs/data/smollm_corpus.py`."""
