"""lm-evaluation-harness with our caches: the registered model ``kvcache`` (:mod:`.model`) and lm-eval's own command
line with it registered (``python -m harness.lm_eval run --model kvcache ...``). Needs ``lm-eval`` (the ``lm_eval``
extra; ``bash scripts/setup.sh --all`` makes ``.venv-lmeval``). See docs/lm_eval.md."""
