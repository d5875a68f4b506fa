"""FlagOS Triton operators for Qwen3-MoE: one operator per module, each with its reference and tests.

The sources in this package are inputs of every release fingerprint (see flows/plan.py).
"""
