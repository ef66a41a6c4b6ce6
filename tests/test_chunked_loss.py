"""Chunked logits + cross-entropy (`execution.loss_chunks`): against the unchunked megatron path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_memory import MemoryTracker
from conftest import free_port

from megalong.config import ConfigError, config_from_dict, validate
from megalong.model.chunked_loss import ChunkedLossGPTModel, attach_chunked_loss
from megalong.model.gpt import build_model, position_ids_for
from megalong.parallel.distributed import initialize, shutdown

SEQ, BATCH = 16, 2


@pytest.fixture(scope="module")
def one_process():
    initialize(1)
    yield
    shutdown()


def _cfg(loss_chunks: int, seq: int = SEQ, hidden: int = 32, heads: int = 4, layers: int = 2, **model):
    cfg = config_from_dict({"model": {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                                      "max_position_embeddings": seq, "attention_layers": [[["global"], layers]],
                                      **model}, "execution": {"loss_chunks": loss_chunks}})
    validate(cfg, check_paths=False)
    return cfg


def _run(chunks: int, tie: bool, tokens: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Per-token losses, every parameter's gradient (of a weighted sum of the losses, so that each
    token's gradient counts differently) and the row counts the output layer saw, float64 model."""
    torch.manual_seed(0)
    model = build_model(_cfg(chunks, tie_embeddings=tie), 50).double()
    assert isinstance(model, ChunkedLossGPTModel) == (chunks > 1)
    rows = []
    hook = model.output_layer.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    loss = model(tokens, position_ids_for(tokens), None, labels=labels)
    (loss * weights).sum().backward()
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return model, loss.detach(), grads, rows


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_unchunked_losses_and_gradients(one_process, tie):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 50, (BATCH, SEQ), generator=g)
    weights = torch.rand(BATCH, SEQ, generator=g, dtype=torch.float64)
    model, ref, ref_grads, ref_rows = _run(1, tie, tokens, labels, weights)
    assert ref_rows == [SEQ]
    # the unchunked path against cross-entropy written out from the model's own final hidden states
    with torch.no_grad():
        logits = model(tokens, position_ids_for(tokens), None)  # [b, s, v], labels=None path
        by_hand = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(ref, by_hand.view(BATCH, SEQ), rtol=1e-6, atol=1e-6)
    if tie:
        assert "output_layer.weight" not in ref_grads  # the gradient lands in the word embeddings
    for chunks in (2, 4, SEQ):  # SEQ: one token per chunk
        chunked, loss, grads, rows = _run(chunks, tie, tokens, labels, weights)
        # megatron's cross-entropy runs in float32 on float64 logits: the per-token losses are
        # bit-identical; gradients differ by float64 rounding of the summation order only
        torch.testing.assert_close(loss, ref, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-12, msg=name)
        # forward, then the per-chunk recomputation in backward: the output layer never saw more
        # than one chunk of the sequence
        assert rows == [SEQ // chunks] * (2 * chunks)
        # without labels (inference, export) the full logits come back as before
        with torch.no_grad():
            torch.testing.assert_close(chunked(tokens, position_ids_for(tokens), None), logits, rtol=0, atol=0)


def test_logits_memory_shrinks_with_the_chunk_count(one_process):
    """Tracked allocations of one forward + backward (float32, vocabulary-heavy shape): the bytes
    still alive after the forward (kept for backward) lose the whole [s, b, v] float32 softmax, and
    the peak's logits-sized part is one chunk's logits, L / n."""
    seq, batch, vocab = 64, 4, 1024
    logits_bytes = seq * batch * vocab * 4
    tokens = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(0))
    kept, peak, largest = {}, {}, {}
    for n in (1, 2, 4, 8):
        torch.manual_seed(0)
        model = build_model(_cfg(n, seq=seq, hidden=16, heads=2, layers=1, vocab_size=vocab), 50)
        tracker = MemoryTracker()
        with tracker:
            loss = model(tokens, position_ids_for(tokens), None, labels=tokens)
            kept[n] = tracker.current
            loss.mean().backward()
            del loss
        peak[n], largest[n] = tracker.peak, tracker.largest
    assert kept[1] - kept[2] >= logits_bytes, kept  # the saved softmax is gone
    assert kept[2] == kept[4] == kept[8], kept  # and nothing logits-sized replaced it
    for n in (1, 2, 4, 8):
        assert largest[n] == seq * batch * vocab // n, largest  # never the whole logits, even briefly
    for n in (2, 4):  # peak(n) - peak(8) = L / n - L / 8
        assert abs((peak[n] - peak[8]) - (logits_bytes / n - logits_bytes / 8)) <= 0.05 * logits_bytes, peak
    assert peak[1] - peak[8] >= 0.8 * logits_bytes, peak


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="execution.loss_chunks: 3 does not divide the sequence length 16"):
        _cfg(3)
    with pytest.raises(ConfigError, match="execution.loss_chunks: must be >= 1, got 0"):
        _cfg(0)
    with pytest.raises(ValueError, match="execution.loss_chunks: must be an integer >= 1"):
        attach_chunked_loss(torch.nn.Linear(1, 1), 0)


# ---- tensor parallelism: one spawned 2-process job, chunked against unchunked at TP=2 ---------


def _tp_worker(path: str) -> None:
    """At TP=2 (vocabulary split over the ranks), loss_chunks 4 against 1, tied and untied: this
    rank's per-token losses and its shard of every gradient; the largest differences to `path`."""
    initialize(2)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 128, (BATCH, SEQ), generator=g)  # targets in both halves of the padded 128
    weights = torch.rand(BATCH, SEQ, generator=g, dtype=torch.float64)
    diffs = {}
    for tie in (True, False):
        _, ref, ref_grads, _ = _run(1, tie, tokens, labels, weights)
        _, loss, grads, rows = _run(4, tie, tokens, labels, weights)
        assert rows == [SEQ // 4] * 8, rows
        diffs[f"loss tie={tie}"] = (loss - ref).abs().max().item()
        diffs[f"grad tie={tie}"] = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        diffs[f"grad norm tie={tie}"] = sum(v.pow(2).sum().item() for v in ref_grads.values())
    Path(f"{path}.{torch.distributed.get_rank()}").write_text(json.dumps(diffs))
    shutdown()


def test_tensor_parallel_two_chunked_equals_unchunked(tmp_path):
    out = tmp_path / "tp2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", "2", "--master_port", str(free_port()), __file__, "--tp-worker", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        diffs = json.loads(Path(f"{out}.{rank}").read_text())
        for tie in (True, False):
            assert diffs[f"loss tie={tie}"] == 0.0, diffs
            assert diffs[f"grad tie={tie}"] <= 1e-12, diffs
            assert diffs[f"grad norm tie={tie}"] > 0, diffs


if __name__ == "__main__" and sys.argv[1:2] == ["--tp-worker"]:
    _tp_worker(sys.argv[2])
