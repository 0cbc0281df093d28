"""The harness shared by the benchmark folders (``ppl/``, ``longbench/``, ``niah/``, ``ruler/``, ``scripts/``).

It is kept apart from the library: ``lacache_core`` holds the policies, the cache and the attention
integration, needs only torch and transformers, and imports nothing from here. This package holds
what running a benchmark needs: the runner (:mod:`harness.runner`), flags generated from the
policies' fields (:mod:`harness.flags`), result identity (:mod:`harness.identity`), records and
sharding, model and data loading, the prompt-and-answer and streaming-perplexity loops, plots and
the paper's numbers.
"""
