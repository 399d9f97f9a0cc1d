"""The base of every optimizer here: param-group checking, state created up front, and the
step loop that hands each group to AdamW, Lion or the class's own matrix algorithm."""

import torch

from optimizers.hyperparameters import check_value
from optimizers.newton_schulz import orthogonality_error
from optimizers.scalar import SCALAR_ALGORITHMS, new_scalar_state, scalar_state_bytes, scalar_step


class BaseOptimizer(torch.optim.Optimizer):
    """AdamW or Lion per param group (`algorithm`), with state created for every parameter up
    front. Subclasses add a matrix algorithm of their own name."""

    def __init__(self, params, defaults):
        defaults = {"algorithm": self.algorithm_name(), **defaults}
        super().__init__(params, defaults)
        # A parameter's position in the optimizer: the same on every rank and every run, so
        # per-parameter seeds derived from it agree everywhere.
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._orthogonality = None
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                self.state[p] = self._new_state(p, group)

    @classmethod
    def algorithm_name(cls):
        """The `algorithm` value of this class's own update."""
        return "adamw"

    @classmethod
    def state_bytes(cls, algorithm, shape, local_numel, dtype, arguments):
        """The bytes of one parameter's state under `algorithm` on a rank that holds `local_numel`
        of its elements in `dtype`, predicted for the layout planner: AdamW's and Lion's from
        their own state, a matrix's by `_matrix_state_bytes`. `arguments` are the constructor's."""
        if algorithm in SCALAR_ALGORITHMS:
            return scalar_state_bytes(algorithm, local_numel, dtype)
        return cls._matrix_state_bytes(shape, local_numel, dtype, arguments)

    @classmethod
    def _matrix_state_bytes(cls, shape, local_numel, dtype, arguments):
        """The bytes of an m x n matrix's state (`shape`) on a rank holding `local_numel` of its
        elements in `dtype`."""
        raise NotImplementedError(f"{cls.__name__} has no _matrix_state_bytes")

    @classmethod
    def plan_bucket(cls, planner, names, shape):
        """The layout planner's walk of one bucket of same-shape matrices (`names`) through the
        class's `_update_bucket`: it calls `planner`'s methods (planning.layout_plan.StepPlanner)
        where the step runs collectives and Newton-Schulz. AdamW and Lion have none."""

    def selection_metrics(self):
        """Diagnostics of the slices an algorithm selects ({} for one that selects none). Every
        rank must call it."""
        return {}

    def algorithms(self):
        """The `algorithm` values a param group may take."""
        return tuple(dict.fromkeys((self.algorithm_name(), *SCALAR_ALGORITHMS)))

    def _check_group(self, group):
        if group["algorithm"] not in self.algorithms():
            raise ValueError(
                f"unknown algorithm '{group['algorithm']}'; {type(self).__name__} takes "
                f"{', '.join(self.algorithms())}"
            )
        # A group may give betas as a pair or as beta1/beta2; both are honoured.
        beta1, beta2 = group["betas"]
        group["betas"] = (group.pop("beta1", beta1), group.pop("beta2", beta2))
        for name, value in (*group.items(), *zip(("beta1", "beta2"), group["betas"], strict=True)):
            check_value(name, value)

    def comm_bytes(self):
        """Bytes the optimizer's collectives moved on this rank since the last call."""
        return 0

    def synchronize_for_checkpoint(self):
        """Make the state equal on every replica before a save (nothing to do here)."""

    def capture_orthogonality(self):
        """Have the next step measure, for each shape that Newton-Schulz orthonormalizes, the
        first such matrix's distance from orthonormal; `orthogonality_errors()` returns them
        (none for an algorithm without Newton-Schulz)."""
        self._orthogonality = {}

    def orthogonality_errors(self):
        """{(rows, cols): (RMS, largest) of |sigma - 1|} (`orthogonality_error`) of the step after
        `capture_orthogonality()`, then capturing stops. Each rank measures the first non-zero
        matrix it orthonormalized of each shape: on rank 0, the first of that shape's first
        bucket, as in one process. Measured after the step, and read in one copy."""
        captured, self._orthogonality = self._orthogonality or {}, None
        kept = [(shape, nonzero, out) for shape, outputs in captured.items() for nonzero, out in outputs]
        if not kept:
            return {}
        rows = torch.stack(
            [torch.cat([nonzero.float().view(1), orthogonality_error(out)]) for _, nonzero, out in kept]
        )
        errors = {}
        for (shape, _, _), (nonzero, rms, largest) in zip(kept, rows.tolist(), strict=True):
            if nonzero and shape not in errors:
                errors[shape] = (rms, largest)
        return errors

    def momentum_buffer(self, p):
        """The momentum of parameter p: the matrix algorithms' `momentum`, AdamW's and Lion's
        `exp_avg`."""
        state = self.state[p]
        return state["momentum"] if "momentum" in state else state["exp_avg"]

    def _new_state(self, p, group):
        if group["algorithm"] in SCALAR_ALGORITHMS:
            return new_scalar_state(p, group["algorithm"])
        return self._new_matrix_state(p, group)

    def _new_matrix_state(self, p, group):
        raise NotImplementedError

    def _matrix_step(self, group, params):
        raise NotImplementedError

    def load_state_dict(self, state_dict):
        """torch.optim's load, with integer state (Dion2's selection record) kept integer:
        torch casts every state tensor but `step` to its parameter's dtype."""
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        integer = {
            (p, name): value.dtype
            for i, p in zip(saved, params, strict=True)
            for name, value in state_dict["state"].get(i, {}).items()
            if isinstance(value, torch.Tensor) and not value.is_floating_point()
        }
        super().load_state_dict(state_dict)
        for (p, name), dtype in integer.items():
            self.state[p][name] = self.state[p][name].to(dtype)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; the others are left untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["algorithm"] in SCALAR_ALGORITHMS:
                scalar_step(group, params, [self.state[p] for p in params])
            else:
                self._matrix_step(group, params)
        return loss
