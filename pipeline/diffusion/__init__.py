"""The diffusion math: variance schedules, the Gaussian process, its bound and samplers, seeds."""
