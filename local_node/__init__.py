"""The home node: dials out to relays and runs Qwen3-TTS on this machine's CPU.

A request's life here, thread by thread (docs/architecture.md has the whole path):

* event loop (``tunnel_client``): reads ``request`` frames, starts a task per stream, sends the
  audio back within the stream's credit;
* the request's synthesis thread (``worker``, ``qwen_engine``): splits the text, builds prompts
  with qwen-tts' own code, encodes the PCM that comes back (``audio``), hands the bytes to the
  loop;
* the model's generation thread (``batcher``, ``generation``, ``decoder_stack``): steps every
  utterance in progress one frame at a time on the node's kernels (``cpu_kernels``);
* the model's decoding thread (``batcher``, ``codec_stream``): turns each frame's codes into PCM.
"""
