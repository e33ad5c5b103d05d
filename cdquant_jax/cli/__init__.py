"""The `cdquant` command (main.py). Importing it applies the process settings of
`cdquant_jax.runtime` before JAX loads."""

from cdquant_jax import runtime

runtime.configure()
