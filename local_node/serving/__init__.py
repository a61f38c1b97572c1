"""What faces the relay: the tunnel client (event loop), one worker per model (synthesis threads
and their queue), streaming audio encoders, and the node's metrics."""
