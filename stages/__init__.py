"""One module per DVC stage: its `main()` parses the stage's arguments, loads and validates
params.yaml, calls the library (`pipeline`), writes the outputs and the MLflow records."""
