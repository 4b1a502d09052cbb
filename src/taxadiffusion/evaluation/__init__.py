"""Evaluation: FID/KID by level, LPIPS, BioCLIP score, the synthetic-world oracle, tables (DESIGN.md).

Imports are light: each metric lives in its own module and is imported where used.
"""
