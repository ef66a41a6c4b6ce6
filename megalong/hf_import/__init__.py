"""`megalong import HF_DIR OUT_DIR`: Hugging Face models as megalong checkpoints.

folder.py     the folder read without running code (config.json, safetensors; pickles refused)
hf_keys.py    config.json's values, refused by key where megalong cannot represent them
families.py   which architectures import, dispatching to gpt_neo.py, llama.py (Llama, Mistral,
              Qwen2, Mixtral) and megalong_class.py (megalong's own export)
write.py      the step-0 checkpoint and the editable megalong.yaml
"""
