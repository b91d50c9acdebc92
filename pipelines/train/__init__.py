"""Ray Train loops run on every worker."""
