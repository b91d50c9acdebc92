"""Ray Data ingestion, preprocessing, the synthetic corpus and the training stream."""
