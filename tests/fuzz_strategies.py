"""Hypothesis strategies for the tunnel protocol and JSON bodies, shared by the fuzzing tests."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tunnel.protocol import (
    ERROR_CODES,
    KINDS,
    MAX_AUDIO_PAYLOAD,
    MAX_CREDIT,
    MAX_ID_CHARS,
    MAX_INPUT_CHARS,
    MAX_INSTRUCTIONS_CHARS,
    MAX_KEPT,
    MAX_NAME_CHARS,
    MAX_SPEED,
    MAX_STREAM_ID,
    MAX_UPLOAD_BYTES,
    MIN_SPEED,
    RESPONSE_FORMATS,
    Audio,
    Cancel,
    Consent,
    ConsentList,
    Credit,
    Done,
    Draining,
    End,
    Error,
    Forget,
    Hello,
    KeptVoice,
    ModelInfo,
    Rename,
    Request,
    Text,
    Upload,
    VoiceList,
    encode,
)

# Derandomized: CI runs the same examples every time, and a failure reproduces as is, without an
# example database (Hypothesis keeps only its caches in .hypothesis/, which ignores itself in git).
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TYPE_NAMES = (
    "hello",
    "request",
    "credit",
    "cancel",
    "draining",
    "end",
    "error",
    "audio",
    "upload",
    "forget",
    "rename",
    "done",
    "voices",
    "consents",
)

# --- valid messages -------------------------------------------------------------------------

names = st.text(min_size=1, max_size=12) | st.text(min_size=MAX_NAME_CHARS, max_size=MAX_NAME_CHARS)
stream_ids = st.integers(0, 4) | st.sampled_from([MAX_STREAM_ID - 1, MAX_STREAM_ID])
models = st.builds(
    ModelInfo, names, st.lists(names, max_size=3).map(tuple), st.lists(names, max_size=3).map(tuple), st.booleans(), st.booleans()
)
hellos = st.builds(Hello, names, st.lists(models, max_size=3).map(tuple))
requests = st.builds(
    Request,
    stream_ids,
    names,
    names,
    names,
    st.text(min_size=1, max_size=40) | st.text(min_size=MAX_INPUT_CHARS, max_size=MAX_INPUT_CHARS),
    st.none() | st.text(max_size=40) | st.just("x" * MAX_INSTRUCTIONS_CHARS),
    st.sampled_from(RESPONSE_FORMATS),
    st.floats(MIN_SPEED, MAX_SPEED),
    st.integers(1, MAX_CREDIT),
    st.booleans(),
)
live_texts = st.builds(Text, stream_ids, st.text(min_size=1, max_size=20) | st.just("t" * MAX_INPUT_CHARS), st.booleans()) | st.builds(
    Text, stream_ids, st.just(""), st.just(True)
)
audio_data = st.binary(min_size=1, max_size=64) | st.sampled_from([1, MAX_AUDIO_PAYLOAD]).map(lambda n: b"\x7f" * n)
credits = st.builds(Credit, stream_ids, st.integers(1, MAX_CREDIT))
cancels = st.builds(Cancel, stream_ids)
audios = st.builds(Audio, stream_ids, audio_data)
ends = st.builds(End, stream_ids, st.integers(0, 2**31), st.integers(0, 2**31))
errors = st.builds(Error, stream_ids, st.sampled_from(ERROR_CODES), st.text(max_size=40) | st.just("m" * 1024))
ids = st.text(min_size=1, max_size=12) | st.just("i" * MAX_ID_CHARS)
languages = st.none() | st.sampled_from(["en-US", "English", "x" * 35])
times = st.integers(0, 2**63)
kinds = st.sampled_from(KINDS)
uploads = st.builds(
    Upload,
    stream_ids,
    kinds,
    ids,
    names,
    times,
    st.integers(1, MAX_UPLOAD_BYTES),
    languages,
    st.none() | ids,
    st.none() | st.text(min_size=1, max_size=40),
)
forgets = st.builds(Forget, stream_ids, kinds, ids)
renames = st.builds(Rename, stream_ids, ids, names)
dones = st.builds(Done, stream_ids)
voice_lists = st.builds(
    VoiceList, st.lists(st.builds(KeptVoice, ids, names, times, languages, st.none() | ids), max_size=MAX_KEPT).map(tuple)
)
consent_lists = st.builds(
    ConsentList, st.lists(st.builds(Consent, ids, names, st.sampled_from(["en-US", "x" * 35]), times), max_size=3).map(tuple)
)
messages = st.one_of(
    hellos,
    requests,
    live_texts,
    credits,
    cancels,
    audios,
    ends,
    errors,
    st.just(Draining()),
    uploads,
    forgets,
    renames,
    dones,
    voice_lists,
    consent_lists,
)

# --- JSON that is almost right --------------------------------------------------------------

SURROGATE = "\ud800"
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 0, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([MIN_SPEED - 1e-9, MAX_SPEED + 1e-9, -0.0]),
    st.text(max_size=20),
    st.just(""),
    st.just(SURROGATE),
    st.text(max_size=5).map(lambda s: s + "\udfff"),
    st.sampled_from([130, 1100, 5000, 70000]).map(lambda n: "é" * n),  # over each length limit
    st.sampled_from(RESPONSE_FORMATS + ERROR_CODES + TYPE_NAMES),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)
field_names = st.sampled_from(
    [
        "type",
        "id",
        "node",
        "models",
        "name",
        "aliases",
        "voices",
        "any_voice",
        "request_id",
        "model",
        "voice",
        "input",
        "instructions",
        "response_format",
        "speed",
        "window",
        "size",
        "input_tokens",
        "output_tokens",
        "code",
        "message",
        "clones",
        "kind",
        "object_id",
        "created_at",
        "language",
        "consent",
        "ref_text",
        "consents",
        "live",
        "text",
        "done",
    ]
) | st.text(max_size=8)


@st.composite
def near_valid_objects(draw) -> dict:
    """A valid message's JSON with a few fields replaced, removed or added, or its type changed."""
    message = draw(messages.filter(lambda m: not isinstance(m, Audio)))
    body = json.loads(encode(message))  # type: ignore[arg-type]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "remove", "add", "retype", "nest"]))
        if action == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
        elif action == "remove" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif action == "add":
            body[draw(field_names)] = draw(json_values)
        elif action == "retype":
            body["type"] = draw(st.sampled_from(TYPE_NAMES) | json_values)
        elif action == "nest" and isinstance(body.get("models"), list) and body["models"] and isinstance(body["models"][0], dict):
            body["models"][0][draw(field_names)] = draw(json_values)
    return body


# Frames a broken or hostile peer might send.
garbage = st.one_of(st.text(max_size=40), st.binary(max_size=8), near_valid_objects().map(json.dumps))
