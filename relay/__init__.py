"""The public relay: OpenAI's ``POST /v1/audio/speech`` in front of home nodes.

A request's life here, all on the relay's event loop: ``app`` routes it through the API-key check
to ``speech``, which validates it (``speech_request``), picks the least busy node serving the model
(``router``) and opens a stream on that node's tunnel session (``tunnel_server``); audio frames
are written to the client as they arrive, and the node gets credit as the client takes them.
The wire format is ``tunnel.protocol``'s. docs/architecture.md has the whole path.
"""
