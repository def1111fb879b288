"""Measuring: sampling, feature extractors, the NLL bound, FID / IS / KID statistics."""
