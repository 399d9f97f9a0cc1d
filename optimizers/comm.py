"""The optimizers' distributed communication: the collectives they use, and a counter of the
bytes those collectives move."""

import torch
import torch.distributed as dist

from optimizers.comm_plan import Traffic


class Pending:
    """The result of an asynchronous collective, ready once wait() returns it."""

    def __init__(self, work, result, keep=None):
        self.work, self.result = work, result
        self.keep = keep  # the send buffer must live until the collective is done

    def wait(self):
        """Block until the collective is done; return its result."""
        self.work.wait()
        self.keep = None
        return self.result


class Communicator:
    """The collectives of one optimizer over one process group, with a byte counter.

    `traffic` counts, per rank and collective kind, the bytes of each collective's result that
    came from other ranks and the bytes sent to them (optimizers/comm_plan.py, whose rules the
    layout planner shares): the figures that shrink when an algorithm moves less.
    """

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = Traffic()

    def all_gather_stack(self, mine, total, async_op=False):
        """Concatenate every rank's equal-size stack `mine` (c, ...) along dim 0; keep `total` rows.

        The collective works on flat buffers, which every backend (gloo too) accepts. With
        `async_op`, returns a Pending whose wait() gives the result.
        """
        mine = mine.contiguous()
        out = torch.empty(self.world_size * mine.numel(), dtype=mine.dtype, device=mine.device)
        work = dist.all_gather_into_tensor(out, mine.view(-1), group=self.group, async_op=async_op)
        self.traffic.all_gather(self.world_size, mine.numel(), mine.element_size())
        result = out.view(self.world_size * mine.size(0), *mine.shape[1:])[:total]
        return Pending(work, result) if async_op else result

    def all_reduce_sum(self, tensor):
        """Sum `tensor` over the ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        self.traffic.all_reduce(self.world_size, tensor.numel(), tensor.element_size())
        return tensor

    def exchange(self, outgoing, incoming_numel, dtype, device, async_op=False):
        """All-to-all: send outgoing[s] (a list of tensors) to rank s; receive incoming_numel[s]
        elements from rank s. Returns the received flat pieces, one per source rank (with
        `async_op`, a Pending of them).

        One `all_to_all_single` on flat buffers with split sizes, which gloo accepts even when
        the pieces differ in size.
        """
        send_sizes = [sum(t.numel() for t in pieces) for pieces in outgoing]
        flat = [t.reshape(-1).to(dtype) for pieces in outgoing for t in pieces]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        received = torch.empty(sum(incoming_numel), dtype=dtype, device=device)
        work = dist.all_to_all_single(
            received, send, incoming_numel, send_sizes, group=self.group, async_op=async_op
        )
        self.traffic.all_to_all(self.rank, incoming_numel, send_sizes, received.element_size())
        result = list(received.split(incoming_numel))
        return Pending(work, result, keep=send) if async_op else result

    def take_bytes(self):
        """The bytes received since the last call."""
        moved, self.traffic = self.traffic.total_received(), Traffic()
        return moved
