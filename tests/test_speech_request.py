"""Validation of the speech request body, without a server."""

import json

import pytest

from relay.errors import ApiError
from relay.speech_request import SpeechRequest, parse_speech_request


def parse(**body) -> SpeechRequest:
    return parse_speech_request(json.dumps(body).encode())


def rejected(body: bytes | dict) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as info:
        parse_speech_request(raw)
    return info.value


def test_defaults():
    assert parse(model="tts-1", input="Hi", voice="alloy") == SpeechRequest("tts-1", "Hi", "alloy", None, "mp3", 1.0, "audio")


def test_all_fields_and_voice_object():
    request = parse(
        model="m", input="Hi", voice={"id": "vivian"}, instructions="calm", response_format="flac", speed=2, stream_format="sse"
    )
    assert request == SpeechRequest("m", "Hi", "vivian", "calm", "flac", 2.0, "sse")


def test_nulls_mean_defaults():
    assert parse(model="m", input="Hi", voice="v", speed=None, response_format=None, instructions=None).speed == 1.0


def test_input_of_exactly_4096_characters_is_accepted():
    assert len(parse(model="m", input="é" * 4096, voice="v").input) == 4096


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "m", "voice": "v"}, "input", "missing_required_parameter"),
        ({"model": "m", "voice": "v", "input": ""}, "input", "invalid_value"),
        ({"model": "m", "voice": "v", "input": "   \n"}, "input", "invalid_value"),
        ({"model": "m", "voice": "v", "input": "x" * 4097}, "input", "string_above_max_length"),
        ({"model": "m", "voice": "v", "input": 42}, "input", "invalid_type"),
        ({"voice": "v", "input": "hi"}, "model", "missing_required_parameter"),
        ({"model": 1, "voice": "v", "input": "hi"}, "model", "invalid_type"),
        ({"model": "m", "input": "hi"}, "voice", "missing_required_parameter"),
        ({"model": "m", "input": "hi", "voice": ["a"]}, "voice", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": {"name": "a"}}, "voice", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": {"id": 3}}, "voice", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": {"id": ""}}, "voice", "invalid_value"),
        ({"model": "m", "input": "hi", "voice": "v", "response_format": "ogg"}, "response_format", "invalid_value"),
        ({"model": "m", "input": "hi", "voice": "v", "response_format": ["mp3"]}, "response_format", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": "v", "speed": 0.2}, "speed", "invalid_value"),
        ({"model": "m", "input": "hi", "voice": "v", "speed": 4.01}, "speed", "invalid_value"),
        ({"model": "m", "input": "hi", "voice": "v", "speed": "fast"}, "speed", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": "v", "speed": True}, "speed", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": "v", "stream_format": "chunks"}, "stream_format", "invalid_value"),
        ({"model": "m", "input": "hi", "voice": "v", "instructions": 5}, "instructions", "invalid_type"),
        ({"model": "m", "input": "hi", "voice": "v", "instructions": "x" * 4097}, "instructions", "string_above_max_length"),
        ({"model": "m", "input": "hi", "voice": "v", "temperature": 0.5}, "temperature", "unknown_parameter"),
    ],
)
def test_bad_fields_name_the_parameter(body, param, code):
    error = rejected(body)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert error.message


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'"text"', b"null", b"\xff\xfe"])
def test_malformed_json(raw):
    error = rejected(raw)
    assert (error.status, error.code) == (400, "invalid_json")


def test_nan_speed_is_rejected():
    error = rejected(b'{"model": "m", "input": "hi", "voice": "v", "speed": NaN}')
    assert (error.status, error.param) == (400, "speed")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "input": "hi", "voice": "v", "speed": 1' + b"0" * 400 + b"}",
        b'{"model": "m", "input": "hi", "voice": "v", "speed": -1e400}',
    ],
)
def test_huge_numbers_are_out_of_range(raw):
    error = rejected(raw)
    assert (error.status, error.param) == (400, "speed")


@pytest.mark.parametrize(
    "raw",
    [  # "\\ud800" in the source is the JSON escape \ud800 on the wire
        b'{"model": "m", "input": "\\ud800", "voice": "v"}',
        b'{"model": "\\udfff", "input": "hi", "voice": "v"}',
        b'{"\\ud800": 1, "model": "m", "input": "hi", "voice": "v"}',
    ],
)
def test_lone_surrogates_are_not_text(raw):
    error = rejected(raw)
    assert (error.status, error.code) == (400, "invalid_json")
    json.dumps(error.body()).encode()  # the error itself can be sent
