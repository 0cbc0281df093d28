"""Needle-in-a-haystack / passkey retrieval under a KV budget (the LaCache paper's Figs. 8-9)."""
