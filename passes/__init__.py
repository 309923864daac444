"""Built-in passes (installed as graphopt.passes). Importing this package registers them."""
from graphopt.passes import block_importance, cache, drop, head_roles, importance, prune, route  # noqa: F401
