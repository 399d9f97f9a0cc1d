"""The sizes of the optimizers' collectives, as pure functions of shapes, blocks and rank
counts. The optimizers size their exchanges and count their bytes with them, and
planning/layout_plan.py predicts a layout's traffic with the same functions, without running it.

Bytes are counted per rank and per collective kind: received, what the rank's result holds
that came from other ranks; sent, what it gives to them. An all-gather or all-reduce over W
ranks of N bytes each receives and sends (W - 1) x N, whatever algorithm the backend runs.
"""

import math
from dataclasses import dataclass, field

KINDS = ("all_gather", "all_reduce", "all_to_all")


@dataclass
class Traffic:
    """A rank's bytes per collective kind; with `keep_calls`, also each collective as (kind,
    group, world, received bytes, sent bytes), in order, `group` naming the process group."""

    keep_calls: bool = False
    received: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    sent: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    calls: list = field(default_factory=list)

    def _add(self, kind, group, world, received, sent):
        self.received[kind] += received
        self.sent[kind] += sent
        if self.keep_calls:
            self.calls.append((kind, group, world, received, sent))

    def all_gather(self, world, numel, element_size, group=None):
        """An all-gather of `numel` elements from each of `world` ranks."""
        moved = (world - 1) * numel * element_size
        self._add("all_gather", group, world, moved, moved)

    def all_reduce(self, world, numel, element_size, group=None):
        """An all-reduce of `numel` elements over `world` ranks."""
        moved = (world - 1) * numel * element_size
        self._add("all_reduce", group, world, moved, moved)

    def all_to_all(self, rank, incoming, outgoing, element_size, group=None):
        """An all-to-all in which this rank (`rank`) receives incoming[s] elements from rank s and
        sends outgoing[s] to it."""
        received = (sum(incoming) - incoming[rank]) * element_size
        sent = (sum(outgoing) - outgoing[rank]) * element_size
        self._add("all_to_all", group, len(incoming), received, sent)

    def total_received(self):
        """All bytes received, every kind together."""
        return sum(self.received.values())


def replicated_share(total, world):
    """How many of `total` replicated matrices each of `world` ranks orthonormalizes: a
    contiguous share, the last ones padded with zero matrices."""
    return math.ceil(total / world)


def owners(total, world):
    """The matrices each rank owns in an exchange of `total` sharded matrices: i % world."""
    return [list(range(o, total, world)) for o in range(world)]


def exchange_sizes(blocks, world, rank):
    """(owned, outgoing, incoming) of the exchange that brings each sharded matrix's blocks to
    its owner: blocks[i][s] is rank s's Block of matrix i. This rank sends outgoing[o] elements
    to owner o and receives incoming[s] from rank s; the return exchange swaps the two."""
    owned = owners(len(blocks), world)
    outgoing = [sum(blocks[i][rank].numel for i in owned[o]) for o in range(world)]
    incoming = [sum(blocks[j][s].numel for j in owned[rank]) for s in range(world)]
    return owned, outgoing, incoming


def replica_assignment(total, replicas):
    """The matrices of a sharded bucket that each data-parallel replica orthonormalizes:
    replica d takes those whose index is d modulo the replicas."""
    return [list(range(d, total, replicas)) for d in range(replicas)]


def replica_sizes(blocks, assigned, rank):
    """(sizes, longest): this rank's block sizes of each replica's assigned matrices, and the
    longest replica's total, which every replica pads its all-gather to."""
    sizes = [[blocks[i][rank].numel for i in matrices] for matrices in assigned]
    return sizes, max(sum(size) for size in sizes)


def low_rank(rank_fraction, m, n):
    """Dion's rank r of an m x n matrix: ceil(rank_fraction x min(m, n))."""
    return math.ceil(rank_fraction * min(m, n))
