"""Character-level GPT on the CPython docs: SOAP / Sophia / AdamW in Flax and PyTorch.

Run ``python -m examples.charlm.compare --help`` from the repository root (see README.md here).
"""
