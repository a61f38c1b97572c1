"""The home node: dials out to relays and runs Qwen3-TTS on this machine's CPU.

Its layers, lowest first; each uses only those below it (tests/test_layers.py):

* ``config``: the YAML, validated;
* ``kernels``: our C products, norms and attention, one build per CPU tier;
* ``model``: the model runner: loading through qwen-tts, packed weights, the decoder stacks, the
  frame-by-frame loop, the incremental codec decoder;
* ``engine``: what a speech engine is, the Qwen3-TTS engine and its scheduler (the batcher);
* ``serving``: the tunnel client, one worker per model, audio encoders, metrics;
* ``testing``: random checkpoints for tests and benchmarks (used only by the command line);
* ``__main__``: the command line, which composes them.

A request's life here, thread by thread (docs/architecture.md has the whole path):

* event loop (``serving.tunnel_client``): reads ``request`` frames, starts a task per stream,
  sends the audio back within the stream's credit;
* the request's synthesis thread (``serving.worker``, ``engine.qwen``): splits the text, builds
  prompts with qwen-tts' own code, encodes the PCM that comes back (``serving.audio``), hands the
  bytes to the loop;
* the model's generation thread (``engine.batcher``, ``model.generation``,
  ``model.decoder_stack``): steps every utterance in progress one frame at a time on the node's
  kernels (``kernels.cpu_kernels``);
* the model's decoding thread (``engine.batcher``, ``model.codec_stream``): turns each frame's
  codes into PCM.
"""
