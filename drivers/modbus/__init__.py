"""Modbus devices (barrier gates, e-bike charging stations, relay modules) over Modbus TCP and RTU."""
