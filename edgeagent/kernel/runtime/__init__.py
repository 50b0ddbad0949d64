"""What keeps the daemon running: supervision, clock, named outputs, metrics, systemd notify, logging."""
