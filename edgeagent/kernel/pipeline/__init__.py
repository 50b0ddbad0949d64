"""The event pipeline: typed events, the durable outbox, the sink capabilities emit through, signed commands."""
