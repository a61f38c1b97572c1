"""Which connected node serves a request: by model name or alias, least outstanding work first."""

from __future__ import annotations

import asyncio
import logging

from tunnel.protocol import Consent, KeptVoice, ModelInfo

from .tunnel_server import NodeSession

log = logging.getLogger("relay.router")


class Router:
    def __init__(self, max_streams_per_node: int = 0) -> None:
        self._nodes: list[NodeSession] = []
        self.draining = False  # this relay is shutting down: it takes no new work
        self.max_streams_per_node = max_streams_per_node  # 0: no cap
        # Speech responses in progress. A drain waits for these, not only for the nodes' streams:
        # after a node's end, up to a window of audio may still be on its way to a slow client.
        self.responses = 0

    def add(self, node: NodeSession) -> None:
        if node not in self._nodes:
            self._nodes.append(node)

    def remove(self, node: NodeSession) -> None:
        if node in self._nodes:
            self._nodes.remove(node)

    @property
    def nodes(self) -> list[NodeSession]:
        """Nodes that take new work: connected and not draining."""
        return [node for node in self._nodes if not node.closed and not node.draining]

    @property
    def open_streams(self) -> int:
        """Requests in progress: the nodes' open streams, or the responses still being sent."""
        return max(self.responses, sum(node.outstanding for node in self._nodes))

    async def drain(self, grace: float) -> None:
        """Take no new work, tell every node, and wait up to ``grace`` seconds for open streams to end."""
        self.draining = True
        log.info("draining: no new requests; waiting up to %.0f s for %d open streams", grace, self.open_streams)
        await asyncio.gather(*(node.announce_draining() for node in self._nodes))
        deadline = asyncio.get_running_loop().time() + grace
        while self.open_streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.open_streams:
            log.warning("drain grace over: cutting %d open streams", self.open_streams)

    def serving(self, model: str) -> list[tuple[NodeSession, ModelInfo]]:
        """Nodes that answer to ``model`` (a name or alias), least outstanding work first."""
        found = [(node, info) for node in self.nodes for info in node.models.values() if model == info.name or model in info.aliases]
        return sorted(found, key=lambda pair: pair[0].outstanding)

    def has_room(self, node: NodeSession) -> bool:
        """Whether ``node`` may take another stream from this relay (RELAY_MAX_STREAMS_PER_NODE)."""
        return not self.max_streams_per_node or node.outstanding < self.max_streams_per_node

    def catalogue(self) -> dict[str, ModelInfo]:
        """Every model served by some node, merged across nodes, by name."""
        merged: dict[str, ModelInfo] = {}
        for node in self.nodes:
            for info in node.models.values():
                seen = merged.get(info.name)
                if seen is None:
                    merged[info.name] = info
                else:
                    merged[info.name] = ModelInfo(
                        info.name,
                        tuple(dict.fromkeys(seen.aliases + info.aliases)),
                        tuple(dict.fromkeys(seen.voices + info.voices)),
                        seen.any_voice or info.any_voice,
                        seen.clones or info.clones,
                    )
        return merged

    def kept_voices(self) -> dict[str, tuple[KeptVoice, list[NodeSession]]]:
        """Every voice the connected nodes keep, by id, with the nodes that keep it (least busy first)."""
        found: dict[str, tuple[KeptVoice, list[NodeSession]]] = {}
        for node in sorted(self.nodes, key=lambda node: node.outstanding):
            if node.clones:
                for voice in node.kept_voices.values():
                    found.setdefault(voice.id, (voice, []))[1].append(node)
        return found

    def kept_voice(self, voice: str) -> tuple[KeptVoice, list[NodeSession]] | None:
        """The kept voice ``voice`` names, by id or else by name (the newest of that name)."""
        kept = self.kept_voices()
        if voice in kept:
            return kept[voice]
        named = [entry for entry in kept.values() if entry[0].name == voice]
        return max(named, key=lambda entry: entry[0].created_at, default=None)

    def consents(self) -> dict[str, Consent]:
        """Every consent recording the connected nodes keep, by id."""
        return {consent.id: consent for node in self.nodes for consent in node.consents.values()}
