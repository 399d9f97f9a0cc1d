"""What the optimizer does to the model, for the metrics log every `diagnostics_every` steps.

Per parameter role, and per layer for the hidden matrices:
- `update_rms/<group>`: the RMS of the step's change of the weights (W after - W before);
- `weight_rms/<group>`: the RMS of the weights after the step;
- `momentum_norm/<group>`: the l2 norm of the optimizer's momentum after the step.
Per shape that Newton-Schulz orthonormalizes, on the first such matrix of the step, with sigma
its output's singular values: `ortho_error/<rows>x<cols>`, the RMS of sigma - 1, and
`ortho_error_max/<rows>x<cols>`, the largest |sigma - 1|. For Dion2 and NorDion2, the selection
coverage and the longest wait of any slice. Every rank takes part (one all-reduce).
"""

import math
import re

import torch

from parallel.sharding import global_squared_norms, local_tensor

LAYER = re.compile(r"blocks\.(\d+)\.")


class Diagnostics:
    """Measures one step: `before_step()` keeps the weights, `after_step()` returns the metrics.

    Groups are the roles of `model.param_roles()`, and `matrix/layerN` for the hidden matrices
    of block N. The copy of the weights is the only memory it takes, on the steps it measures.
    """

    def __init__(self, model, optimizer, every):
        self.optimizer, self.every = optimizer, every
        self.params, self.members = [], {}
        for role, named in model.param_roles().items():
            for name, p in named:
                groups = [role]
                if role == "matrix" and (layer := LAYER.search(name)):
                    groups.append(f"{role}/layer{layer.group(1)}")
                for g in groups:
                    self.members.setdefault(g, []).append(len(self.params))
                self.params.append(p)
        self.before = None

    def due(self, step, last):
        """Whether step number `step` (counted from 1) is measured."""
        return bool(self.every) and (last or step % self.every == 0)

    @torch.no_grad()
    def before_step(self):
        """Keep this rank's weights, and have the optimizer measure Newton-Schulz's output."""
        self.before = [local_tensor(p).detach().clone() for p in self.params]
        self.optimizer.capture_orthogonality()

    @torch.no_grad()
    def after_step(self):
        """The metrics of the step since `before_step()`: the same on every rank, except the
        orthogonality errors, which are of the matrices this rank orthonormalized."""
        weights = [local_tensor(p).detach() for p in self.params]
        # In place, in the copy: a second copy of every weight would cost as much again.
        torch._foreach_sub_(self.before, weights)
        changes, self.before = self.before, None
        momenta = [self.optimizer.momentum_buffer(p) for p in self.params]
        # The change and the momentum are split as their parameter is.
        squares = global_squared_norms([*changes, *weights, *momenta], placed_like=self.params * 3)
        squares = squares.view(3, len(self.params)).tolist()
        record = {}
        for group, members in self.members.items():
            size = sum(self.params[i].numel() for i in members)
            change, weight, momentum = (sum(row[i] for i in members) for row in squares)
            record[f"update_rms/{group}"] = math.sqrt(change / size)
            record[f"weight_rms/{group}"] = math.sqrt(weight / size)
            record[f"momentum_norm/{group}"] = math.sqrt(momentum)
        for (rows, cols), (error, largest) in self.optimizer.orthogonality_errors().items():
            record[f"ortho_error/{rows}x{cols}"] = error
            record[f"ortho_error_max/{rows}x{cols}"] = largest
        record.update(self.optimizer.selection_metrics())
        return record
