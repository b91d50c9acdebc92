"""What a user runs or submits: the `mplug` CLI, job configs, cluster manifests."""
