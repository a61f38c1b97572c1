"""Test and benchmark tooling: random Qwen3-TTS checkpoints written with the real qwen-tts classes,
from the released models' config files kept in ``qwen_files/``. Production code never imports it;
the command line does, for ``tiny-model`` and ``--tiny``."""
