"""Delegated OAuth 2.0 tokens: manager and refresher, MSAL client, cache file, `relayd auth`.
May use: ops (logging, metrics, auth-state names), config, units. Only store.py touches the cache.
"""
