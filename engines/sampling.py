"""The bundle's default LCM sampling and how many steps a (steps, strength) pair runs, without torch: the
sampler (engines.lcm), the bundle's manifest and the service's settings check (serve.config) share them."""

DEFAULT_STEPS = 4
DEFAULT_STRENGTH = 1.0


def steps_run(num_steps: int, strength: float) -> int:
    """The steps diffusers' SDXL inpaint pipeline runs of `num_steps` at `strength` (below 1 skips the first)."""
    return min(int(num_steps * strength), num_steps)
