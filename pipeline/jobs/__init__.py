"""The sample, evaluate and reference stages' work, as jobs of chunks."""
