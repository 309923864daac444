"""graphopt: compile-time compression and deployment of video diffusion transformers.

    import graphopt
    graph = graphopt.capture(model)                      # torch.export → DiTGraph
    graphopt.compress(graph, ["prune", "route"], {"prune": {"ratio": 0.3}}, out="out/")
    graph = graphopt.load("out/")                        # recipe + safetensors, no pickle
"""
from graphopt.capture import capture, load_model
from graphopt.compress import compress
from graphopt.cost import model_cost
from graphopt.errors import GraphoptError
from graphopt.graph import DiTGraph
from graphopt.pass_manager import Analysis, Pass, PassManager, available, get_pass, register, rel_error
from graphopt.recipe import Recipe
from graphopt.serialize import load, save

__all__ = ["capture", "load_model", "compress", "model_cost", "GraphoptError", "DiTGraph",
           "Analysis", "Pass", "PassManager", "available", "get_pass", "register", "rel_error",
           "Recipe", "load", "save"]
