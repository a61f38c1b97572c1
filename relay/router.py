"""Which connected node serves a request: by model name or alias, least outstanding work first."""

from __future__ import annotations

from .protocol import ModelInfo
from .tunnel_server import NodeSession


class Router:
    def __init__(self) -> None:
        self._nodes: list[NodeSession] = []

    def add(self, node: NodeSession) -> None:
        if node not in self._nodes:
            self._nodes.append(node)

    def remove(self, node: NodeSession) -> None:
        if node in self._nodes:
            self._nodes.remove(node)

    @property
    def nodes(self) -> list[NodeSession]:
        return [node for node in self._nodes if not node.closed]

    def candidates(self, model: str) -> list[tuple[NodeSession, ModelInfo]]:
        """Nodes that answer to ``model`` (a name or alias), least outstanding work first."""
        found = [
            (node, info)
            for node in self.nodes
            for info in node.models.values()
            if model == info.name or model in info.aliases
        ]
        return sorted(found, key=lambda pair: pair[0].outstanding)

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
                    )
        return merged
