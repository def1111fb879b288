"""One thin `main()` per DVC stage: parse paths, load params, call the pipeline."""
