"""Which Hugging Face class an export writes (`megalong export --target`): each target's refusal
(None: it represents the model exactly), and `auto`, the plainest stock class that fits, with
the reasons the plainer ones did not."""
from __future__ import annotations

from typing import Callable, Optional

from megalong.config import Config

# Plainest first: stock classes that serving stacks accept, then megalong's own.
TARGETS = ("llama", "mistral", "qwen2", "gpt_neo", "mixtral", "megalong")
CLASS_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt_neo": "GPTNeoForCausalLM", "mixtral": "MixtralForCausalLM", "megalong": "MegalongForCausalLM"}


def megalong_refusal(cfg: Config) -> Optional[str]:
    """Why even megalong's own Hugging Face class cannot hold this model (None when it can)."""
    from megalong.export.hf_layers import export_refusal

    if (reason := export_refusal(cfg)) is not None:
        return reason
    if "moe" in cfg.mlp_kinds() and cfg.moe_options().router == "expert_choice":
        return ("model.moe.router is 'expert_choice': experts choose among all tokens of the batch, "
                "so a token's output depends on later tokens and generation cannot reproduce training")
    return None


def _refusals() -> dict[str, Callable[[Config], Optional[str]]]:
    from megalong.export import llama
    from megalong.export.gpt_neo import gpt_neo_refusal
    from megalong.export.mixtral import mixtral_refusal

    return {"llama": lambda c: llama.refusal(c, "llama"), "mistral": lambda c: llama.refusal(c, "mistral"),
            "qwen2": lambda c: llama.refusal(c, "qwen2"), "gpt_neo": gpt_neo_refusal,
            "mixtral": mixtral_refusal, "megalong": megalong_refusal}


def choose_target(cfg: Config, target: str) -> tuple[Optional[str], dict[str, str]]:
    """(the target to write, or None when none fits; {plainer or requested target: why not})."""
    refusals = _refusals()
    candidates = TARGETS if target == "auto" else (target,)
    why_not: dict[str, str] = {}
    for name in candidates:
        reason = refusals[name](cfg)
        if reason is None:
            return name, why_not
        why_not[name] = reason
    return None, why_not


def describe_refusals(why_not: dict[str, str]) -> str:
    """`not as A (why), nor B (why)`."""
    parts = [f"{CLASS_NAMES[name]} ({reason})" for name, reason in why_not.items()]
    return "not as " + ", nor ".join(parts)
