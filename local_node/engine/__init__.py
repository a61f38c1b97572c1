"""Speech engines: the interface the serving layer calls (``base``), Qwen3-TTS (``qwen``) with its
scheduler (``batcher``: one generation thread and one decoding thread per model), and a synthetic
tone engine for measuring the tunnel alone."""
