"""relayd: a local SMTP relay that queues durably and forwards to Microsoft 365 with OAuth 2.0."""

__version__ = "0.1.0"
