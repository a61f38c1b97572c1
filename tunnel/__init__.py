"""What the relay and the node share, and nothing else: the tunnel's wire protocol (``protocol``,
sans I/O), the pure half of its handshake (``handshake``) and the constant-time handling of
secrets (``credentials``). Standard library only (tests/test_layers.py holds it to that), so
neither side's dependencies leak into the other.
"""
