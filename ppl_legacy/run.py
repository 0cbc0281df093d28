"""Streaming perplexity on transformers < 4.36 (tuple caches), as the official legacy harness.

Same flags and outputs as ``ppl/run.py``; the query sits at the current cache length and the
policy compacts the ``(key, value)`` tuples after every step. Run it in an environment with
``transformers==4.33.*`` (see docs/benchmarks.md and docs/versions.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppl.run import legacy_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(legacy_main())
