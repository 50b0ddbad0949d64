"""ONVIF for cameras: the client (device, media, PTZ, relays), PullPoint events, their normalization
into typed camera events, and WS-Discovery."""
