"""The model runner: qwen-tts imported on a CPU-only torch, weights packed for our kernels (bf16 or
int8), the decoder stacks with their caches, the frame-by-frame loop (``generation``) and the
incremental codec decoder. Knows nothing of requests, threads or the tunnel."""
