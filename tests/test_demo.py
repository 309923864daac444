"""`graphopt demo --quick`: every stage of the toolchain on the shipped teacher, end to end (CI's check)."""

from __future__ import annotations

import json

import pytest
import torch

from graphopt.cli import main
from graphopt.io import MARKER
from graphopt.tiny.testbed import calibration_inputs, capture_teacher

STAGES = ["inspect", "compress", "fit", "export", "bench", "quality"]
REPORT_FILES = {"summary.md", "summary.json", "inspect.json", "head_roles.png", "head_roles.md", "compressed",
                "onnx", "bench.png", "bench.json", "router_decisions.png", "compute_per_step.png",
                "frames.png", "quality.md"}


@pytest.mark.slow  # 60 s on 2 idle cores (23 s of it the ONNX export), over 2 min on a busy machine
def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out), "--threads", "1"]) == 0
    assert REPORT_FILES <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [MARKER]  # no temp leftovers
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["export"]["onnx_rel_error"] < 1e-4          # onnxruntime runs what PyTorch runs
    assert stages["fit"]["executed_fraction"] <= 0.5 + 1e-3   # the reuse schedule's target
    assert 0 < stages["quality"]["executed_fraction"] < 1
    teacher = stages["quality"]["scores"]["teacher"]
    assert teacher["colour_accuracy"] > 0.9 and teacher["direction_adherence"] > 0.9
    assert (out / "onnx" / "model.onnx").is_file()
    printed = capsys.readouterr().out
    assert all(f"✓ {name}" in printed for name in STAGES)


def test_demo_refuses_a_file_as_its_output_folder(tmp_path, capsys):
    target = tmp_path / "report"
    target.write_text("not a folder")
    assert main(["demo", "--quick", "-o", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "not a folder"


def test_calibration_inputs_are_noised_training_clips():
    graph, config = capture_teacher()
    inputs = calibration_inputs(config)
    assert [float(x["timestep"][0]) for x in inputs] == [875.0, 625.0, 375.0, 125.0]
    clean = calibration_inputs(config, timesteps=(0.0,))[0]["hidden_states"]
    palette = torch.from_numpy(config.palette())
    pixels = clean.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    assert torch.cdist(pixels, palette).min(dim=1).values.max() < 1e-6   # s = 0: exactly the clips
    with torch.no_grad():
        out = graph(**inputs[0])[0]
    assert out.shape == inputs[0]["hidden_states"].shape and torch.isfinite(out).all()
