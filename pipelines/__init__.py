"""Ray Data, Ray Train and Ray Tune pipelines around the `mplug` model library."""
