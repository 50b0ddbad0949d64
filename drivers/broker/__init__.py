"""The box's own MQTT broker (Debian's mosquitto): what ``edgeagent broker`` writes and what ``doctor`` reads.

:mod:`.files` holds pure functions (text and certificates in, text and certificates out, no I/O); the
command line (``edgeagent.cli.broker``) reads and writes the files and runs ``mosquitto_passwd``.
"""
