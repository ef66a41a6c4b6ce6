"""The README's main job, end to end (with fewer training steps)."""
import json
import subprocess
import sys

from conftest import REPO


def test_demo_runs_end_to_end_and_beats_the_unigram_entropy(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "megalong.cli", "demo", "--workdir", str(workdir),
                           "--steps", "60", "--set", "train.eval_interval=30", "--set", "train.log_interval=20"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    # A model that ignores context cannot do better than the unigram entropy; this one must.
    assert summary["held_out_loss"] < summary["unigram_entropy"] - 0.5, summary
    assert summary["final_train_loss"] < summary["unigram_entropy"] - 0.5, summary
    assert summary["sample"].startswith("The") and len(summary["sample"]) > 10
    assert (workdir / "hf" / "model.safetensors").is_file()
    assert (workdir / "hf" / "tokenizer.json").is_file()
    for stage in ("1/6 corpus", "2/6 tokenizer", "3/6 preprocess", "4/6 train", "5/6 export", "6/6 sample",
                  "tokens/s", "MFU", "ETA", "held-out loss"):
        assert stage in proc.stdout, stage
