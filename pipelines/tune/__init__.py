"""Ray Tune search spaces, schedulers and the Tune driver."""
