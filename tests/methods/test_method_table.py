"""Every method under ``--method``: each stage's schedule, score model and learning rates against
the README's table ("The baselines, stage by stage"), so the documentation and the code cannot drift."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreamflow.methods.registry import METHOD_NAMES
from dreamflow.pipeline.components import lora_settings
from dreamflow.pipeline.config import build_config

README = Path(__file__).resolve().parents[2] / "README.md"
STAGES = {"nerf": "stage1", "geometry": "geometry", "texture": "texture", "refine": "refine"}
#: Representation learning-rate names in the table -> the stage config's field.
LR_FIELDS = {"grid": "lr_grid", "mlp": "lr_mlp", "background": "lr_background", "mesh": "lr"}


def readme_rows() -> list[dict[str, str]]:
    lines = README.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| method | stage | rule | t schedule"))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def schedule_text(s) -> str:
    """The README's wording of a schedule."""
    if s.kind == "decreasing":
        return f"decreasing {s.t_start:g} -> {s.t_end:g}, {s.curve}, l = {s.views_per_t}".replace(" 1 ->", " 1.0 ->") \
            .replace("-> 0,", "-> 0.0,")
    if s.kind == "uniform":
        return f"U({s.t_end:g}, {s.t_start:g})"
    return f"U({s.t_end:g}, {s.t_start:g}) -> U({s.t_end:g}, {s.anneal_t_max:g}) at {round(100 * s.anneal_at, 1):g}%"


def test_readme_table_has_every_method_and_stage():
    rows = readme_rows()
    assert {(r["method"], r["stage"]) for r in rows} == {(m, s) for m in METHOD_NAMES for s in STAGES}


@pytest.mark.parametrize("row", readme_rows(), ids=lambda r: f"{r['method']}-{r['stage']}")
def test_method_stage_matches_readme(row):
    cfg = build_config("paper", method=row["method"])
    stage = getattr(cfg, STAGES[row["stage"]])
    m = stage.method
    assert m.name == row["rule"]
    assert schedule_text(m.schedule) == row["t schedule"]
    assert m.guidance == float(row["guidance"])
    assert m.score_model == row["D_phi"]
    if m.score_model == "lora":
        # What the stage builds its LoRA with (pipeline/components.py).
        lr, camera = lora_settings(SimpleNamespace(config=cfg), m)
        assert lr == float(row["LoRA lr"])
        assert camera == (row["camera embedding"] == "on")
    else:
        assert row["LoRA lr"] == "-" and row["camera embedding"] == "-"
    rates = dict(re.fullmatch(r"(\w+) (\S+)", part.strip()).groups() for part in row["representation lr"].split(","))
    assert {LR_FIELDS[k]: float(v) for k, v in rates.items()} == {
        f: getattr(stage, f) for f in (LR_FIELDS[k] for k in rates)}
    expected = {"stage1": {"lr_grid", "lr_mlp", "lr_background"}, "geometry": {"lr"},
                "texture": {"lr_grid", "lr_mlp"}, "refine": {"lr_grid", "lr_mlp"}}[STAGES[row["stage"]]]
    assert {LR_FIELDS[k] for k in rates} == expected


def test_vsd_anneals_within_a_short_stage():
    """The annealing point is a fraction of the stage, so a 4000-step stage reaches it (at 800)."""
    plan = build_config("paper", method="vsd").stage1.method.schedule.plan(4000, seed=0)
    assert max(p.t for p in plan[:800]) > 0.5 and max(p.t for p in plan[800:]) <= 0.5


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_keeps_declared_ranges(method):
    """A baseline's own settings (VSD's LoRA learning rate, the annealing point) are ranged too."""
    from dreamflow.config import check_ranges, unranged_numbers

    cfg = build_config("paper", method=method)
    check_ranges(cfg)
    assert unranged_numbers(cfg) == []
