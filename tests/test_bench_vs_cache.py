"""tools/bench_vs_cache.py: graphopt's deployed reuse schedule against diffusers + FirstBlockCache,
whole sampling runs in one process. Tiny settings: 1 condition, 2 steps, 1 repeat."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROW_FIELDS = {"name", "seconds", "times", "ratio_to_fbc", "flops", "psnr_db", "aggregate"}


def _tool():
    """The script as a module (tools/ is not a package)."""
    if "bench_vs_cache" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "tools" / "bench_vs_cache.py"
        spec = importlib.util.spec_from_file_location("bench_vs_cache", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_vs_cache"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_vs_cache"]


def _schedule(tmp_path, computes) -> Path:
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"computes": computes}))
    return path


def _check_rows(result: dict, backends: list[str]) -> dict:
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["diffusers eager", "diffusers + FirstBlockCache 0.3"] + [f"graphopt {b}" for b in backends]
    for row in rows.values():
        assert ROW_FIELDS <= set(row)
        assert row["seconds"] > 0 and len(row["times"]) == result["repeats"]
        assert 0 < row["flops"] <= 1.0 + 1e-9 and 0 <= row["aggregate"] <= 1
    assert rows["diffusers eager"]["flops"] == 1.0 and rows["diffusers eager"]["aggregate"] == 1.0
    assert rows["diffusers + FirstBlockCache 0.3"]["ratio_to_fbc"] == 1.0
    return rows


def test_runs_end_to_end_with_a_given_schedule(tmp_path):
    # Step 0 computes every block (nothing is cached yet); step 1 reuses the deep half.
    computes = [[True] * 8, [True] * 4 + [False] * 4]
    out = tmp_path / "rows.json"
    _tool().main(["--backends", "torch", "--clips", "1", "--steps", "2", "--repeats", "1",
                  "--schedule", str(_schedule(tmp_path, computes)), "--json", str(out)])
    result = json.loads(out.read_text())
    rows = _check_rows(result, ["torch"])
    assert result["computes"] == computes and result["steps"] == 2
    # Half the blocks reused at one of two steps: the run executes clearly less than the teacher's.
    assert rows["graphopt torch"]["flops"] < 0.85
    assert len(result["load_average"]) == 3


def test_a_schedule_of_the_wrong_shape_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(["--backends", "torch", "--clips", "1", "--steps", "3", "--repeats", "1",
                      "--schedule", str(_schedule(tmp_path, [[True] * 8] * 2))])
    assert exit_info.value.code == 2
    assert "'computes' is [2, 8], expected steps × blocks [3, 8]" in capsys.readouterr().err


@pytest.mark.slow
def test_fits_and_exports_every_backend(tmp_path):
    out = tmp_path / "rows.json"
    _tool().main(["--clips", "1", "--steps", "3", "--repeats", "1", "--fit-clips", "1", "--reuse-target", "0.7",
                  "--json", str(out)])
    result = json.loads(out.read_text())
    rows = _check_rows(result, ["torch", "onnxruntime", "aoti"])
    # Every backend runs the same schedule: the same clips as eager, to float tolerance.
    for backend in ("onnxruntime", "aoti"):
        assert rows[f"graphopt {backend}"]["psnr_db"] > 60
    assert result["fraction"] <= 0.7
