"""Streaming encoders from synthesised PCM to the OpenAI ``response_format`` bytes.

Encoding happens here, on the node, so the home uplink (usually the slowest link in the chain)
carries compressed audio, and the relay stays a light byte router with no codecs: it forwards
whatever this module produced with chunked transfer, as it appears.

Everything is streamed: ``encode`` takes PCM in chunks of any length and returns the bytes that
are ready now; ``finish`` flushes the rest. Muxers write into a sink that has no ``seek``, so
FFmpeg produces streamable output and never relies on patching a header afterwards: a WAV
keeps 0xFFFFFFFF in its RIFF and data size fields (the usual streaming convention; FFmpeg reads
it as "until end of stream"), and FLAC's STREAMINFO leaves the total sample count at 0 (unknown).

What PyAV decodes back: 24 kHz mono for every format except ``opus``, which decodes at 48 kHz
(Opus always decodes at 48 kHz; the Ogg header records the 24 kHz input rate only as a hint).
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from local_node.engine.base import SAMPLE_RATE
from tunnel.protocol import MAX_SPEED, MIN_SPEED
from tunnel.protocol import RESPONSE_FORMATS as FORMATS

# response_format -> (muxer, encoder, bit rate, muxer options). Bit rates suit 24 kHz mono speech.
_CODECS: dict[str, tuple[str, str, int | None, dict[str, str]]] = {
    # No ID3v2 tag: the stream is plain MPEG audio frames from the first byte.
    "mp3": ("mp3", "libmp3lame", 64_000, {"id3v2_version": "0"}),
    # The Ogg muxer fills pages up to page_duration (default 1 s) and holds the newest page back
    # (to flag the last one EOS), so audio trails input by ~2 pages: 100 ms pages make that
    # ~200 ms instead of ~2 s, for ~6 % more bytes at 32 kbit/s.
    "opus": ("ogg", "libopus", 32_000, {"page_duration": "100000"}),
    "aac": ("adts", "aac", 64_000, {}),
    # FLAC reserves 8 KiB of PADDING for later in-place tag edits; useless on a stream.
    "flac": ("flac", "flac", None, {"metadata_header_padding": "0"}),
    # bitexact drops the LIST/INFO "encoder" chunk, leaving the canonical 44-byte header that
    # naive clients assume.
    "wav": ("wav", "pcm_s16le", None, {"fflags": "+bitexact"}),
}


class _Sink:
    """Write-only on purpose: without seek/tell PyAV marks the output unseekable, so muxers write
    streaming headers instead of planning to rewrite them at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _atempo_factors(speed: float) -> list[float]:
    # atempo accepts 0.5..100 per instance in this FFmpeg, but above 2.0 it skips input: in our
    # tests a tiny first frame then failed with ENOMEM and atempo=10 aborted the process. Chaining
    # instances within 0.5..2.0 is robust and works on every FFmpeg.
    factors = []
    while speed > 2.0:
        factors.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    return factors + [speed]


class StreamEncoder:
    """Turns float32 mono PCM, pushed in chunks, into one ``response_format`` byte stream."""

    def __init__(self, response_format: str, speed: float = 1.0, sample_rate: int = SAMPLE_RATE) -> None:
        if response_format not in FORMATS:
            raise ValueError(f"unknown response_format {response_format!r}; expected one of {', '.join(FORMATS)}")
        if not MIN_SPEED <= speed <= MAX_SPEED:  # also rejects NaN
            raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed!r}")
        self.response_format = response_format
        self.sample_rate = sample_rate
        self._time_base = Fraction(1, sample_rate)
        self._in_pts = 0  # samples pushed into the tempo filter
        self._out_pts = 0  # samples handed to the encoder
        self._finished = False

        self._tempo: av.filter.Graph | None = None
        if speed != 1.0:
            self._tempo = av.filter.Graph()
            source = self._tempo.add_abuffer(sample_rate=sample_rate, format="s16", layout="mono", time_base=self._time_base)
            tempos = [self._tempo.add("atempo", f"{f:.6f}") for f in _atempo_factors(speed)]
            self._tempo.link_nodes(source, *tempos, self._tempo.add("abuffersink"))
            self._tempo.configure()

        self._sink = _Sink()
        self._container: av.container.OutputContainer | None = None
        if response_format != "pcm":
            muxer, codec, bit_rate, options = _CODECS[response_format]
            self._container = av.open(self._sink, "w", format=muxer, container_options=options)
            self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
            if bit_rate:
                self._stream.bit_rate = bit_rate
            # Write the header now: it leaves with the first encode() even if no packet is ready
            # yet, and a request that yields no audio still ends as a well-formed empty file.
            self._container.start_encoding()

    def encode(self, pcm: np.ndarray) -> bytes:
        """Feed float32 mono samples in [-1, 1]; return the encoded bytes ready now (maybe b"")."""
        if self._finished:
            raise RuntimeError("encode() after finish()")
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if samples.size:
            # Clip first: a model's overshoot must saturate, not wrap around in int16.
            s16 = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
            if self._tempo is None and self._container is None:
                return s16.tobytes()  # pcm at normal speed: nothing else to do
            frame = av.AudioFrame.from_ndarray(s16[np.newaxis, :], format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts, frame.time_base = self._in_pts, self._time_base
            self._in_pts += s16.size
            self._write(self._filter(frame))
        return self._sink.take()

    def finish(self) -> bytes:
        """Flush the tempo filter, encoder and muxer; return the last bytes of the stream."""
        if self._finished:
            return b""
        self._finished = True
        if self._tempo is not None:
            self._write(self._filter(None))
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self._container.close()
        return self._sink.take()

    def _filter(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        if self._tempo is None:
            return [] if frame is None else [frame]
        self._tempo.push(frame)
        frames = []
        while True:
            try:
                frames.append(self._tempo.pull())
            except (BlockingIOError, EOFError):  # EAGAIN: needs more input; EOF: flushed
                return frames

    def _write(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            if self._container is None:
                self._sink.write(frame.to_ndarray().astype("<i2").tobytes())
                continue
            # Continuous timestamps from our own sample count: atempo rescales pts, and the
            # encoder (which re-frames to its frame_size via PyAV's resampler) needs no gaps.
            frame.pts, frame.time_base = self._out_pts, self._time_base
            self._out_pts += frame.samples
            self._container.mux(self._stream.encode(frame))
