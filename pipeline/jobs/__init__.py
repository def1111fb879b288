"""The stages' work above the cluster: training a run, the sweep, and the sample, evaluate and
reference stages' jobs of chunks."""
