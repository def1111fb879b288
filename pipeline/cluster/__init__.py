"""Running on Ray: Ray Train (one run's workers), Ray Tune (the sweep), Ray Data (work in chunks),
the connection to a cluster. Every module here imports Ray."""
