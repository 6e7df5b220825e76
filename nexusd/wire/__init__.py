"""What both sides of the socket share: message types, framing, error codes, default paths.

Imports nothing else of nexusd: the daemon and the clients both build on it.
"""
