"""Alarms: the pure engine, its runtime, and the messages notifiers send."""
