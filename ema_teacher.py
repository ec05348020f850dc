"""The EMA teacher (`teacher=ema`, an ablation; deviation 1 of selfdistill.py): the teacher's
weights are the base plus an exponential moving average of the student's LoRA *update*
ΔW = s·BA, kept dense per adapted matrix (an EMA of A and B separately would not be an EMA of their
product), and saved in checkpoints. selfdistill.teacher_weights switches the adapter off and adds
x·ΔW_Tᵀ to each adapted layer's output with `added`.
"""
import contextlib

import torch
import torch.nn.functional as F


def lora_modules(model):
    """(name, module) of every LoRA-adapted layer of the default adapter."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "get_delta_weight")
            and "default" in getattr(m, "lora_A", {})]


@torch.no_grad()
def ema_update(ema, model, rate):
    """ΔW_T ← (1 − rate)·ΔW_T + rate·ΔW_θ for every adapted matrix (an EMA of s·BA, not of A, B)."""
    for name, module in lora_modules(model):
        delta = module.get_delta_weight("default").float()
        if name not in ema:
            ema[name] = torch.zeros_like(delta)
        ema[name].mul_(1 - rate).add_(delta, alpha=rate)


@contextlib.contextmanager
def added(model, ema):
    """Inside the block, x·ΔW_Tᵀ is added to the output of each adapted layer's base layer (call it
    with the adapter switched off); {} adds nothing."""
    hooks = []
    for name, module in lora_modules(model) if ema else []:
        if name in ema:
            def hook(layer, args, output, delta=ema[name]):
                return output + F.linear(args[0].to(delta.dtype), delta).to(output.dtype)
            hooks.append(module.base_layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
