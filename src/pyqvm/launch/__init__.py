"""What a launch prepares before QEMU starts: the spec resolved against this host
(`resolve`), the launch's plan and argv (`plan`), disk overlays, the cloud-init seed, the
companion processes (virtiofsd for shares, private networks' switches) and host devices
passed through (`passthrough`)."""
