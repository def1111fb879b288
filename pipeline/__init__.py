"""A reproducible pipeline for the DDPM study (Ho, Jain & Abbeel 2020).

The library: no work at import time, no argv parsing. Stages in `stages/` call into it.
"""
