"""Rows of different personas in one forward pass: every LoRA adapter applied per row, stacked.

PEFT can mix adapters in a batch (`adapter_names=`), but it registers a hook on every LoRA layer
at every call and, in every layer, gathers each adapter's rows, runs that adapter and scatters the
result back. Here each LoRA layer gets one hook for good, and the adapters' A matrices (and B
matrices) are stacked once: a mixed batch costs two matrix products per layer whatever the number
of personas, with a per-row mask that keeps each row's own adapter block and its scaling. A batch
whose rows all use one adapter takes that adapter's own weights, in PEFT's order of operations, so
its output is PEFT's. Embedded base, 8 rows of two personas, one decoding step on a busy CPU:
PEFT's mixed batch 180 ms, one hook per layer 167 ms, two batches of one persona 2 x 100 ms.

Only plain LoRA on linear layers qualifies (no DoRA or other variant, no LoRA bias);
`MixedLora.for_model` returns None otherwise and the caller batches one persona at a time.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


def lora_layers(model: Any) -> list[Any]:
    """The layers of a PeftModel that hold the adapters' weights (none on a model without adapters)."""
    if not hasattr(model, "peft_config"):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class _Layer:
    """One LoRA layer's adapters, stacked: A (sum of ranks x in), B (out x sum of ranks)."""

    def __init__(self, module: Any, names: list[str]):
        import torch

        self.names = [n for n in names if n in module.lora_A]
        self.a = {n: module.lora_A[n].weight for n in self.names}
        self.b = {n: module.lora_B[n].weight for n in self.names}
        self.scaling = {n: module.scaling[n] for n in self.names}
        self.stacked_a = torch.cat([self.a[n] for n in self.names]) if self.names else None
        self.stacked_b = torch.cat([self.b[n] for n in self.names], dim=1) if self.names else None
        self.key = tuple((n, self.a[n].shape[0], float(self.scaling[n])) for n in self.names)


class MixedLora:
    """Hooks on every LoRA layer of a PeftModel that add each row's own adapter; `rows()` says whose
    adapter each row of the next forward passes uses (None: the base alone)."""

    def __init__(self, model: Any, layers: list[tuple[Any, _Layer]]):
        self.model = model
        self.layers = layers
        self.single: str | None = None  # every row uses this adapter
        self.masks: dict[tuple, Any] | None = None  # rows of several adapters: per layer kind, (rows, 1, sum of ranks)
        self.active = False
        for module, layer in layers:
            module.register_forward_hook(self._hook(layer))

    @classmethod
    def for_model(cls, model: Any) -> MixedLora | None:
        """Hooks on `model`'s LoRA layers with PEFT's own LoRA switched off for good; None (nothing
        changed) unless every adapter is plain LoRA on linear layers."""
        if not hasattr(model, "peft_config"):
            return None
        import torch

        names = list(model.peft_config)
        modules = lora_layers(model)
        for m in modules:
            for n in names:
                if n not in getattr(m, "lora_A", {}):
                    continue
                plain = (isinstance(m.lora_A[n], torch.nn.Linear) and isinstance(m.lora_B[n], torch.nn.Linear)
                         and m.lora_B[n].bias is None and n not in getattr(m, "lora_variant", {})
                         and not getattr(m, "use_dora", {}).get(n, False) and not getattr(m, "merged", False))
                if not plain:
                    return None
        model.base_model.disable_adapter_layers()  # the hooks add the adapters from now on
        return cls(model, [(m, _Layer(m, names)) for m in modules])

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None]) -> Iterator[Any]:
        """The model with row i of the next forward passes using `adapters[i]`."""
        import torch

        kinds = {layer.key: layer for _, layer in self.layers}
        if len(set(adapters)) == 1:
            self.single, self.masks = adapters[0], None
        else:
            self.single, self.masks = None, {}
            for key, layer in kinds.items():
                blocks = [torch.zeros(len(adapters), layer.a[n].shape[0], dtype=layer.stacked_a.dtype, device=layer.stacked_a.device)
                          for n in layer.names]
                for row, name in enumerate(adapters):
                    if name in layer.names:
                        blocks[layer.names.index(name)][row] = layer.scaling[name]
                self.masks[key] = torch.cat(blocks, dim=1)[:, None, :] if blocks else None
        self.active = True
        try:
            yield self.model
        finally:
            self.active = False

    def _hook(self, layer: _Layer) -> Any:
        import torch.nn.functional as F

        def add_adapters(module: Any, args: tuple, output: Any) -> Any:
            if not self.active or not layer.names:
                return None
            x = args[0]
            if self.masks is None:
                if self.single not in layer.a:  # the base, or a persona that left this layer alone
                    return None
                a = layer.a[self.single]
                delta = F.linear(F.linear(x.to(a.dtype), a), layer.b[self.single]) * layer.scaling[self.single]
            else:
                mask = self.masks[layer.key]
                delta = F.linear(F.linear(x.to(layer.stacked_a.dtype), layer.stacked_a) * mask, layer.stacked_b)
            return (output + delta).to(output.dtype)

        return add_adapters
