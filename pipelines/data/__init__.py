"""Ray Data ingestion, preprocessing and the training stream (the synthetic world is `pipelines/synth`)."""
