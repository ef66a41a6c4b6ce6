"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.
No file of a checkpoint is a pickle: loading one never runs code.

    <save_dir>/latest                     name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step_00000100/
        config.yaml                       the resolved config of the run
        meta.json                         format_version, step, parallel layout, vocab sizes, TP
                                          partition dims, the optimizer's param-group
                                          hyper-parameters; written last: marks completeness
        model_tp00.safetensors ...        weights of each tensor-parallel rank (model_tp00_pp01...
                                          with pipeline stages), under the whole model's names
                                          (global layer numbers), without the experts when they
                                          are split over expert-parallel ranks
        experts_ep00.safetensors ...      with expert parallelism: each expert-parallel rank's experts
        optim_tp00.safetensors ...        Adam's exp_avg, exp_avg_sq and step per parameter
                                          ("<name>/exp_avg"), split and named like the weights
        optim_experts_ep00.safetensors    (and like the experts)
        rng_rank000.safetensors ...       every process's RNG states: torch's (and CUDA's) as uint8
                                          tensors, Python's and numpy's as JSON in its metadata
        tokenizer.model                   the SentencePiece model the run trained with

The data position and the learning-rate schedule follow from the step. Loading merges the parts
into the one-process state and takes the loading rank's slice, so a checkpoint saved at one layout
(tensor x pipeline x expert x data) loads at any other, with its optimizer state (this costs one
whole copy of the model and its Adam state per process while loading). With
`train.checkpoint_format: megatron` the model and optimizer files are replaced by `dist/`,
megatron-core's distributed checkpoint, from which each rank reads only its slice
(megalong/checkpoint/dist.py; its pickled files are read through megalong/train/library_loads.py);
meta.json's "format" says which a checkpoint holds. With `train.engine: deepspeed` the step
directory also holds `deepspeed/`, DeepSpeed's own files (megalong/train/deepspeed_checkpoint.py).

A process killed while saving leaves only `.step_XXXX.tmp`, never a half-written `step_XXXX`,
and `latest` keeps naming the previous complete checkpoint. Checkpoints of the old pickled .pt
format are refused with the command that converts them (megalong/checkpoint/convert.py).

Modules: layout.py (the save_dir: step directory names, `latest`, keep_last; torch-free),
step.py (save and load of one step directory, the compatibility check), format.py (the
`CheckpointFormat` interface and its two implementations' names), native.py (megalong's own
format), dist.py (megatron's), names.py (global parameter names, the tied-embedding alias, expert
keys, the pipeline layer offset), model_state.py (a rank's state under those names, and back),
files.py (checked readers and writers of each file), ranks.py (the collectives), convert.py (the
old .pt format).
"""
