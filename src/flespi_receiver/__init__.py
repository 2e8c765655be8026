"""flespi-receiver: stores flespi HTTP stream messages in PostgreSQL exactly once."""

__version__ = "0.1.0"
