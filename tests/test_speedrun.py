"""The speedrun end to end at its tiny scale: every stage leaves a loadable HF checkpoint, and the report card has
every section and plot. (The default scale's report card is committed under docs/.)"""
import json
import os
import subprocess
import sys

from nanoqwen.checkpoint import load_model
from nanoqwen.speedrun import SCALES, recipe
from nanoqwen.checkpoint import latest_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["## Stages", "## Pre-training", "Held-out completion accuracy", "Long context", "## Post-training",
            "ThinkFollow", "thinking budget", "## Strong-to-weak distillation vs RL", "## Dense vs MoE",
            "## The report's findings"]


def test_tiny_speedrun(tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "nanoqwen", "speedrun", "--scale", "tiny", "--out", out], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"report card: {out}/report.md" in run.stdout

    steps = recipe(out, SCALES["tiny"], [])
    trained = [s for s in steps if not s.name.startswith("eval")]
    assert {s.name for s in trained} >= {"teacher-s1", "teacher-s2", "teacher-s3", "coldstart", "rl", "fusion", "rm",
                                         "general", "student-s1", "student-s2", "distill-off", "distill-on",
                                         "student-rl", "moe-s1"}
    for step in trained:
        folder = os.path.dirname(step.done)
        checkpoint = latest_checkpoint(folder)
        assert checkpoint, step.name
        files = os.listdir(checkpoint)
        assert "config.json" in files and ("model.safetensors" in files or "model.safetensors.index.json" in files)
        load_model(checkpoint)
    for step in steps:
        assert os.path.exists(step.done), step.name

    report = open(os.path.join(out, "report.md")).read()
    for section in SECTIONS:
        assert section in report, section
    for png in ("pretraining", "posttraining", "accuracy", "budget", "distill_vs_rl", "moe"):
        assert f"({png}.png)" in report and os.path.getsize(os.path.join(out, f"{png}.png")) > 5000, png
    timings = json.load(open(os.path.join(out, "timings.json")))
    assert set(timings) == {s.name for s in steps}
    assert "n/a" not in report.split("## Post-training")[1].split("## Strong")[0]  # every stage was evaluated

    # a second run finds every stage done and only rewrites the report
    again = subprocess.run([sys.executable, "-m", "nanoqwen", "speedrun", "--scale", "tiny", "--out", out], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == len(steps)
