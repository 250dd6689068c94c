"""The channel dependency groups as an analysis pass (the analysis itself: :mod:`sparsecc.ir.channels`)."""

from __future__ import annotations

from ..ir.channels import CHANNELS_META_KEY, ChannelGroup, ChannelGroups, Member, channel_groups
from ..ir.graph import SparseGraph
from .base import Pass, PassContext, PassResult

__all__ = ["CHANNELS_META_KEY", "ChannelGroup", "ChannelGroups", "FindChannelGroups", "Member", "channel_groups"]


class FindChannelGroups(Pass):
    """Analysis: the channel dependency groups (:func:`channel_groups`); writes ``{dim: group id}`` under
    :data:`CHANNELS_META_KEY` on every node with a dim in a group, and returns the groups in ``info["groups"]``."""

    name = "find-channel-groups"

    def __init__(self, unknown: str = "error"):
        self.unknown = unknown

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        groups = channel_groups(graph, unknown=self.unknown)
        nodes = {n.name: n for n in graph.gm.graph.nodes}
        for g in groups:
            for (name, dim) in g.vertices:
                nodes[name].meta.setdefault(CHANNELS_META_KEY, {})[dim] = g.id
        return PassResult(graph, False, {"groups": groups})
