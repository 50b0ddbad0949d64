"""Cameras: ONVIF, RTSP ingest, detection pipeline, rules and evidence."""
