"""lm-evaluation-harness over megalong's own model (megalong/eval/harness.py): on local YAML tasks
(a jsonl the test writes; nothing downloaded), its log-likelihoods, rolling log-likelihoods and
greedy generations equal those of the exported Hugging Face model run through lm-eval's own `hf`
model; at TP=2 and at PP=2 on two gloo processes they equal one process's; `megalong eval --tasks`
and `train.eval_tasks` log the task metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, tiny_overrides

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = [
    {"q": "Return the number of", "choices": [" items in the list", " bytes", " the"], "label": 0,
     "text": "The module provides functions to create and manage temporary files."},
    {"q": "The function", "choices": [" returns", " raises an exception if the file", " is"], "label": 1,
     "text": "If the argument is omitted, the default value is used; see the documentation of the "
             "class for the list of the options it takes, and of the methods it has."},
    {"q": "import os\nimport", "choices": [" sys", " re", " json"], "label": 2, "text": "x = 1"},
]
TASKS = {
    "tiny_choice": """output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
    "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
    "tiny_generate": """output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")
    return folder


def requests():
    """The requests of the three task types (lm-eval Instances), as plain arguments."""
    from lm_eval.api.instance import Instance

    def inst(kind, args, i):
        return Instance(request_type=kind, doc={}, arguments=args, idx=i)

    ll = [inst("loglikelihood", (d["q"], c), i) for i, d in enumerate(DOCS) for c in d["choices"]]
    ll.append(inst("loglikelihood", ("", "The function returns"), 0))  # empty context: EOD first
    rolling = [inst("loglikelihood_rolling", (d["text"] * 3,), i) for i, d in enumerate(DOCS)]  # > max_length
    gen = [inst("generate_until", (d["q"], {"until": ["."], "max_gen_toks": 6, "do_sample": False}), i)
           for i, d in enumerate(DOCS)]
    return ll, rolling, gen


def answers(lm) -> dict:
    ll, rolling, gen = requests()
    return {"loglikelihood": [list(a) for a in lm.loglikelihood(ll)],
            "rolling": lm.loglikelihood_rolling(rolling), "generate": lm.generate_until(gen)}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A GPT-Neo-shaped checkpoint (global + local layers) trained 3 steps, and its export."""
    from megalong.config import load_config
    from megalong.export.hf import export_checkpoint
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    root = tmp_path_factory.mktemp("harness")
    args = tiny_overrides(tiny_data, root / "run", 3, **{"train.lr": 3e-3})
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    export_checkpoint(root / "run", root / "hf")
    return root


def test_scores_equal_the_exported_model_through_lm_evals_hf_model(trained, monkeypatch):
    """Every request type, batched (4) against the hf model at batch 1, and the task metrics."""
    # A DeepSpeed run earlier in this process leaves LOCAL_RANK=0 (megalong/compat/deepspeed_cpu.py);
    # accelerate, under lm-eval's HFLM, then starts a torch.distributed group that has no RANK.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    from lm_eval.models.huggingface import HFLM

    from megalong.eval.harness import MegalongLM, run_tasks
    from megalong.eval.model import load_eval_model
    from megalong.parallel.distributed import shutdown

    from transformers import AutoTokenizer

    # megalong's documents follow an end-of-document token: it is the prefix of an empty context
    eod = AutoTokenizer.from_pretrained(trained / "hf").eos_token_id
    hf = HFLM(pretrained=str(trained / "hf"), batch_size=1, max_length=64, device="cpu", prefix_token_id=eod)
    theirs = answers(hf)
    tasks = write_tasks(trained / "tasks")
    their_metrics = run_tasks(hf, sorted(TASKS), str(tasks))
    try:
        lm = MegalongLM(load_eval_model(trained / "run"), batch_size=4)
        assert lm.max_length == 64
        ours = answers(lm)
        our_metrics = run_tasks(lm, sorted(TASKS), str(tasks))
    finally:
        shutdown()
    assert len(ours["loglikelihood"]) == 10
    for (a, ga), (b, gb) in zip(ours["loglikelihood"], theirs["loglikelihood"]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)) and ga == gb
    for a, b in zip(ours["rolling"], theirs["rolling"]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))
    assert ours["generate"] == theirs["generate"] and any(ours["generate"])
    assert our_metrics.keys() == set(TASKS)
    for task, metrics in their_metrics.items():
        for key, value in metrics.items():
            assert our_metrics[task][key] == pytest.approx(value, rel=1e-4), (task, key)


EVAL_DRIVER = """
import json, sys
from megatron.core import parallel_state
from megalong.eval.harness import MegalongLM
from megalong.eval.model import load_eval_model
from megalong.parallel.distributed import shutdown
sys.path.insert(0, {tests!r})
from test_eval_harness import answers
out = {{}}
for tensor, pipeline in [(2, 1), (1, 2)]:
    lm = MegalongLM(load_eval_model({ckpt!r}, tensor, pipeline), batch_size=2)
    out[f"tp{{tensor}}pp{{pipeline}}"] = answers(lm)
    parallel_state.destroy_model_parallel()
import torch.distributed as dist
if dist.get_rank() == 0:
    open({out!r}, "w").write(json.dumps(out))
shutdown()
"""


def test_tp2_and_pp2_equal_one_process(trained, tmp_path):
    from megalong.eval.harness import MegalongLM
    from megalong.eval.model import load_eval_model
    from megalong.parallel.distributed import shutdown

    script = tmp_path / "driver.py"
    script.write_text(EVAL_DRIVER.format(tests=str(REPO / "tests"), ckpt=str(trained / "run"),
                                         out=str(tmp_path / "out.json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    try:
        one = answers(MegalongLM(load_eval_model(trained / "run"), batch_size=2))
    finally:
        shutdown()
    for name, got in json.loads((tmp_path / "out.json").read_text()).items():
        for (a, ga), (b, gb) in zip(got["loglikelihood"], one["loglikelihood"]):
            assert abs(a - b) < 1e-4 * max(1.0, abs(b)) and ga == gb, name
        for a, b in zip(got["rolling"], one["rolling"]):
            assert abs(a - b) < 1e-4 * max(1.0, abs(b)), name
        assert got["generate"] == one["generate"], name


def test_readme_torchrun_eval_line_equals_one_process(trained, tmp_path):
    """The README's `torchrun --nproc_per_node N --no-python megalong eval CKPT --tasks ... --tensor T
    --pipeline P` on two gloo processes (TP=2): the task metrics it writes equal one process's."""
    import shutil

    from megalong.cli import main
    from megalong.parallel.distributed import shutdown

    torchrun, megalong = shutil.which("torchrun"), shutil.which("megalong")
    assert torchrun and megalong, "torchrun and the megalong console script come with `pip install -e .`"
    tasks = write_tasks(tmp_path / "tasks")
    common = ["--tasks", "tiny_choice", "tiny_rolling", "--include-path", str(tasks)]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python", megalong,
           "eval", str(trained / "run"), *common, "--tensor", "2", "--pipeline", "1",
           "--output", str(tmp_path / "tp2.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    try:
        assert main(["eval", str(trained / "run"), *common, "--output", str(tmp_path / "one.jsonl")]) == 0
    finally:
        shutdown()

    def metrics(name):
        lines = (tmp_path / name).read_text().splitlines()
        return {k: v for line in lines for k, v in json.loads(line).items() if k.startswith("eval/")}

    one, tp2 = metrics("one.jsonl"), metrics("tp2.jsonl")
    assert "eval/tiny_rolling/word_perplexity" in one and "eval/tiny_choice/acc" in one
    assert tp2.keys() == one.keys()
    for key, value in one.items():
        assert tp2[key] == pytest.approx(value, rel=1e-4), key
