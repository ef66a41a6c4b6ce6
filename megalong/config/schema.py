"""The config's sections as dataclasses, and the values derived from them.

`model` is the architecture's identity (what a checkpoint's weights mean); `execution` says how
that model runs (kernels, chunking, recompute, precision, compile) and may change between a
checkpoint and its resumption. The loader (load.py) fills these from YAML, checking every key's
type; validate.py checks the values and how they fit together.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from megalong.attention.options import ATTENTION_OPTIONS, AttentionOptions, ModelShape
from megalong.config.layers import expand_layer_pattern
from megalong.moe.options import MoEOptions


@dataclass
class AxialPositionConfig:
    """Axial position embeddings (model.position_embedding: axial): position p is (p // cols,
    p % cols) of `shape` [rows, cols]; a row and a column embedding, summed (`sum`, each of the
    hidden size) or concatenated (`concat`, hidden_size // 2 and the rest)."""

    shape: list | None = None
    mode: Literal["sum", "concat"] = "sum"


@dataclass
class ModelConfig:
    """The architecture: every key here changes what the weights mean."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    # Grouped-query attention: key/value heads, each shared by num_attention_heads / num_query_groups
    # query heads (None: one per query head, multi-head attention). Not with lsh (shared QK).
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None  # default 4 * hidden_size (Config.ffn_hidden_size)
    max_position_embeddings: int = 256
    # Per-layer attention kinds as (pattern, repeat) pairs, as GPT-Neo writes them:
    # [[["global", "local"], 6]] is 12 layers alternating global and local.
    attention_layers: list = field(default_factory=lambda: [[["global"], 2]])
    # Options per attention kind, e.g. {"local": {"window": 256}}; typed at load time (one
    # megalong/attention/options.py object per kind given).
    attention: dict[str, AttentionOptions] = field(default_factory=dict,
                                                   metadata={"options_by_kind": ATTENTION_OPTIONS})
    # Per-layer MLP kinds, "dense" or "moe", in the same (pattern, repeat) form; default all dense.
    mlp_layers: list | None = None
    moe: MoEOptions = field(default_factory=MoEOptions)  # megalong/moe/options.py
    alibi: bool = False  # ALiBi biases in every layer; needs position_embedding: none
    position_embedding: Literal["learned", "rope", "none", "axial"] = "learned"
    axial_position: AxialPositionConfig = field(default_factory=AxialPositionConfig)
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu_tanh", "gelu", "swiglu"] = "gelu_tanh"
    scale_attention: bool = True  # scores / sqrt(head_dim); GPT-Neo does not scale
    qkv_bias: bool = False
    linear_bias: bool = True  # bias of the output projection and the MLP
    tie_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    vocab_size: int | None = None  # default: the tokenizer's
    make_vocab_size_divisible_by: int = 128
    # Reversible residual pairs (megalong/model/reversible.py), whose two streams start as the
    # embedding and are merged before the final norm by `reversible_merge` (mean: (y1 + y2) / 2;
    # split: streams start as e / 2, merged y1 + y2; second: y2).
    reversible: bool = False
    reversible_merge: Literal["mean", "split", "second"] = "mean"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads (num_query_groups, or one per query head)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def gated_mlp(self) -> bool:
        """A gated linear unit MLP (SwiGLU): three weight matrices instead of two."""
        return self.activation == "swiglu"


@dataclass
class ExecutionConfig:
    """How the model runs, not what it is: a checkpoint resumes with any of these changed."""

    # Triton kernels (megalong/kernels): auto runs them on CUDA where they apply; reference forces
    # the torch path everywhere. On the CPU the torch path always runs.
    kernels: Literal["auto", "reference"] = "auto"
    loss_chunks: int = 1  # logits + cross-entropy over n sequence slices, recomputed in backward (chunked_loss.py)
    ffn_chunks: int = 1  # the dense MLP run over n slices of the sequence (chunked_ffn.py)
    # megatron-core's activation recompute (granularity full|selective; method uniform|block and
    # num_layers for full)
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast
    # torch.compile each transformer layer (megalong/model/compile.py); the first steps compile
    compile: bool = False


@dataclass
class DatasetEntry:
    path: str = ""  # megatron .bin/.idx prefix
    weight: float = 1.0
    name: str | None = None  # its held-out metrics' name (valid/<name>/loss); default the prefix's file name


@dataclass
class DataConfig:
    tokenizer: str | None = None  # SentencePiece .model
    train: list = field(default_factory=list)  # list of DatasetEntry (or plain prefixes)
    split: str = "98,2,0"  # train, valid, test shares of the documents
    seq_length: int | None = None  # default model.max_position_embeddings
    cache_dir: str | None = None  # megatron dataset index cache; default <save_dir>/data_cache
    # Packed documents (megalong/attention/segments.py), all off by default: a sample is then one
    # sequence, as megatron-core's GPTDataset gives it, and runs made before these keys compute
    # what they did. document_mask: no token attends to another document of its sample (every
    # attention kind; linear/FAM state restarts); reset_position_ids: positions restart at 0 in
    # every document; eod_mask_loss: no loss where the input token is EOD (its target is the next
    # document's first token), as megatron's flag of that name.
    document_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases logging of every metric the run logs (rank 0; `pip install wandb`): on when
    `project` is set and `mode` is not disabled. The run id is stored in each checkpoint, so a
    resumed run continues the same W&B run."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None  # the run's display name (default: W&B's)
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class ProfileConfig:
    """A torch profiler trace of steps start_step .. start_step + steps - 1 (numbered as the log
    numbers them, from 1), one file per process in `dir` (default <save_dir>/profile)."""

    start_step: int | None = None  # None: no profile
    steps: int = 1
    dir: str | None = None


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8  # micro_batch_size * data_parallel * accumulation steps
    train_steps: int = 100
    stop_at_step: int | None = None  # stop early (the schedule still spans train_steps)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay_steps: int | None = None  # default train_steps
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 5
    log_interval: int = 10
    save_dir: str | None = None
    save_interval: int | None = None  # default: only at the end
    load: str | None = None  # checkpoint directory to resume from ("auto": save_dir)
    # a fresh run starts from these weights only: a megalong checkpoint or a Hugging Face folder,
    # matched by name and shape into this config (megalong/checkpoint/init_from.py)
    init_from: str | None = None
    # A fresh run (no train.load) refuses a save_dir holding checkpoints unless this is true; then
    # they are deleted when the run starts (megalong/checkpoint/layout.py)
    overwrite: bool = False
    keep_last: int | None = None  # keep only the newest N checkpoints (and the one resumed from)
    tensorboard_dir: str | None = None
    # megatron: megalong's own step (torch or megatron-core DDP); deepspeed: DeepSpeed's engine
    # with ZeRO (the `deepspeed:` section, megalong/train/deepspeed_engine.py)
    engine: Literal["megatron", "deepspeed"] = "megatron"
    # megalong: per-rank torch files merged and re-split on load; megatron: megatron-core's
    # distributed checkpoint (dist_checkpointing, each rank reads its slice). Both load at any layout.
    checkpoint_format: Literal["megalong", "megatron"] = "megalong"
    peak_tflops: float = 989.0  # per device, for MFU (H100 SXM bf16 dense)
    progress_bar: bool = True
    # A step whose loss or gradient norm is not finite (NaN/inf): `stop` ends the run with an error
    # naming the step, before anything is saved after it; `skip` drops the step's update (no
    # optimizer step, no change of Adam's moments or of MoE router biases), counts and logs it, and
    # stops the run after `max_skipped_steps` skipped steps in a row.
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # With several data.train entries: the held-out loss of each one too, at every evaluation
    # (valid/<name>/loss, megalong/eval/per_dataset.py)
    eval_per_dataset: bool = True
    # lm-evaluation-harness tasks run on the model being trained (needs lm-eval: the `eval` extra),
    # every eval_tasks_interval steps (default: at the end only), at most eval_tasks_limit
    # documents per task, task YAML files also read from eval_tasks_include_path
    eval_tasks: list = field(default_factory=list)
    eval_tasks_interval: int | None = None
    eval_tasks_limit: int | None = None
    eval_tasks_include_path: str | None = None


@dataclass
class ParallelConfig:
    tensor: int = 1
    expert: int = 1  # expert-parallel ranks: each holds model.moe.num_experts / expert experts
    pipeline: int = 1  # pipeline stages (megatron-core's 1F1B schedule)
    context: int = 1  # context-parallel ranks: each holds 1/context of every sequence (parallel/context.py)
    # How a sequence is cut over them: contiguous chunks, or zigzag (pieces r and 2N-1-r of 2N,
    # balancing causal ring attention; every attention layer global)
    context_layout: Literal["contiguous", "zigzag"] = "contiguous"
    virtual_stages: int = 1  # model chunks per pipeline rank (> 1: interleaved 1F1B)
    # Optional uneven split: [layers on the first stage, layers on the last stage]; the others are
    # shared evenly by the middle stages (megatron's num_layers_in_first/last_pipeline_stage).
    pipeline_layers: list[int] | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Data parallelism (megatron-core DDP and optimizer, megalong/train/megatron_dp.py):
    distributed_optimizer: bool = False  # Adam state and update sharded over data-parallel ranks
    overlap_grad_reduce: bool = False  # reduce gradient buckets while the backward still runs
    ddp_bucket_size: int | None = None  # elements per gradient bucket (None: megatron's choice)


@dataclass
class DeepSpeedConfig:
    """Used with train.engine: deepspeed. Batch sizes, clipping, precision and the optimizer come
    from the train and execution sections; `config` adds other DeepSpeed JSON keys (e.g.
    zero_optimization.reduce_bucket_size) to the DeepSpeed config megalong derives."""
    zero_stage: int = 1  # 1: optimizer state, 2: + gradients, 3: + weights sharded over data-parallel ranks
    offload_optimizer: bool = False  # optimizer state and step in CPU memory (ZeRO-Offload)
    config: dict = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    # ---- derived values, computed from the fields above ----
    @property
    def seq_length(self) -> int:
        return self.data.seq_length or self.model.max_position_embeddings

    @property
    def ffn_hidden_size(self) -> int:
        return self.model.ffn_hidden_size or 4 * self.model.hidden_size

    def layer_kinds(self) -> list[str]:
        """The attention kind of every layer, in order."""
        return expand_layer_pattern(self.model.attention_layers, "model.attention_layers")

    def mlp_kinds(self) -> list[str]:
        """"dense" or "moe" for every layer, in order."""
        if self.model.mlp_layers is None:
            return ["dense"] * self.model.num_layers
        return expand_layer_pattern(self.model.mlp_layers, "model.mlp_layers")

    def moe_options(self) -> MoEOptions:
        return self.model.moe

    def attention_options(self, kind: str) -> AttentionOptions:
        """The typed options of `kind` (its defaults when the config gives none)."""
        options = self.model.attention.get(kind)
        return options if options is not None else ATTENTION_OPTIONS[kind]()

    def model_shape(self) -> ModelShape:
        """What attention options are checked against (sequence length, heads, TP size)."""
        m = self.model
        return ModelShape(seq_length=self.seq_length, num_heads=m.num_attention_heads,
                          head_dim=m.head_dim, tensor_parallel=self.parallel.tensor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
