"""The CPU kernels: one C source (``cpu_kernels.c``) built per tier, the tier chosen for this
machine (``tiers``: ``QWEN3_TTS_ISA``, vendor libraries capped to match), and their Python face
(``cpu_kernels.Kernels``). Uses torch only."""
