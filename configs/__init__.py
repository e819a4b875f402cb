"""Configuration files shipped with Event-Pulse (a data package: `eventpulse.resources`)."""
