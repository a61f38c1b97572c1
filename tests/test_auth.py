"""The doors' pure parts: constant-time credential matching and the node's challenge-response
handshake (challenges, proofs, the header, the bounded store), with no sockets."""

import hashlib
import hmac

import pytest

from relay.auth import ChallengeStore
from tunnel.credentials import Credentials
from tunnel.handshake import new_challenge, parse_tunnel_authorization, tunnel_authorization, tunnel_proof, valid_challenge
from tunnel.protocol import SUBPROTOCOL

TOKEN = "node-token-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_challenge_is_32_random_bytes_in_base64url():
    challenges = {new_challenge() for _ in range(100)}
    assert len(challenges) == 100
    assert all(len(c) == 43 and valid_challenge(c) for c in challenges)


def test_the_proof_is_an_hmac_of_the_subprotocol_and_the_challenge_keyed_with_the_token():
    expected = hmac.new(TOKEN.encode(), f"{SUBPROTOCOL}\nabc".encode(), hashlib.sha256).hexdigest()
    assert tunnel_proof(TOKEN, "abc") == expected
    assert tunnel_authorization(TOKEN, "abc") == f"Tunnel-HMAC abc:{expected}"
    assert TOKEN not in tunnel_authorization(TOKEN, "abc")
    assert tunnel_proof(TOKEN, "abd") != expected and tunnel_proof(TOKEN + "x", "abc") != expected


def test_the_header_parses_back():
    header = tunnel_authorization(TOKEN, "a-challenge_1")
    assert parse_tunnel_authorization(header) == ("a-challenge_1", tunnel_proof(TOKEN, "a-challenge_1"))
    assert parse_tunnel_authorization(header.replace("Tunnel-HMAC", "tunnel-hmac")) is not None


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer " + TOKEN,
        "Tunnel-HMAC",
        "Tunnel-HMAC abc",
        "Tunnel-HMAC abc:",
        "Tunnel-HMAC :" + "0" * 64,
        "Tunnel-HMAC abc:" + "0" * 63,
        "Tunnel-HMAC abc:" + "0" * 65,
        "Tunnel-HMAC abc:" + "G" * 64,
        "Tunnel-HMAC a=c:" + "0" * 64,
        "Tunnel-HMAC " + "a" * 129 + ":" + "0" * 64,
        "Tunnel-HMAC abc:" + "é" * 64,
        "Tunnel-HMAC abc:" + "0" * 64 + ":extra",
    ],
)
def test_malformed_headers_are_refused(header):
    assert parse_tunnel_authorization(header) is None


def test_a_proof_names_the_node_whose_token_made_it():
    tokens = Credentials({"home": TOKEN, "office": "office-token-0123456789"})
    assert tokens.match_proof("abc", tunnel_proof(TOKEN, "abc")) == "home"
    assert tokens.match_proof("abc", tunnel_proof("office-token-0123456789", "abc")) == "office"
    assert tokens.match_proof("abc", tunnel_proof("wrong-token-0123456789", "abc")) is None
    assert tokens.match_proof("abd", tunnel_proof(TOKEN, "abc")) is None  # bound to its challenge
    assert tokens.match_proof("abc", "") is None


def test_a_challenge_works_once():
    store = ChallengeStore(clock=Clock())
    challenge = store.issue()
    assert store.consume(challenge)
    assert not store.consume(challenge)  # replayed
    assert not store.consume(new_challenge())  # never issued here
    assert len(store) == 0


def test_a_challenge_expires():
    clock = Clock()
    store = ChallengeStore(ttl=30, clock=clock)
    fresh, stale = store.issue(), store.issue()
    clock.now += 29.9
    assert store.consume(fresh)
    clock.now += 0.1
    assert not store.consume(stale)
    assert len(store) == 0  # used up, valid or not


def test_expired_challenges_are_dropped_as_new_ones_are_issued():
    clock = Clock()
    store = ChallengeStore(ttl=30, clock=clock)
    for _ in range(10):
        store.issue()
    clock.now += 30
    store.issue()
    assert len(store) == 1


def test_a_flood_of_challenges_keeps_memory_flat_and_evicts_the_oldest():
    store = ChallengeStore(capacity=100, clock=Clock())
    first = store.issue()
    issued = [store.issue() for _ in range(1000)]
    assert len(store) == 100
    assert not store.consume(first)  # evicted
    assert store.consume(issued[-1])
