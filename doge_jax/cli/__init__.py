"""Command-line tools, each a thin entry point over the library:

    python -m doge_jax.train ...              (cli/train.py)         pretraining and post-training stages
    python -m doge_jax.generate ...           (cli/generate.py)      sampling from a checkpoint
    python -m doge_jax.cli.continuation ...   dense → CDMoE continuation
    python -m doge_jax.cli.tokenizer train    train a SentencePiece tokenizer
"""
