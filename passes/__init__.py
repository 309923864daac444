"""Built-in passes (installed as graphopt.passes). Importing this package registers them."""
