"""The learning-rate schedule of the Dion2 paper: linear warmup, constant, linear decay to 0."""


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio):
    """The factor on the base lr for update number `step` (0-based) of `num_iterations`.

    Warmup rises linearly over the first warmup_ratio of the run, reaching 1 on its last
    step; warmdown falls linearly over the last warmdown_ratio, to 1/warmdown_steps on the
    final update, so that no update is wasted at lr 0.
    """
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_iterations - warmdown:
        return 1.0
    return (num_iterations - step) / warmdown
