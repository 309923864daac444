"""Built-in passes (installed as graphopt.passes). Importing this package registers them."""
from graphopt.passes import head_roles, importance, prune  # noqa: F401
