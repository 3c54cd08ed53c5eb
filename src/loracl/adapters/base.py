"""The common shape of an adapter wrapper: a frozen base layer plus a delta that can be merged into it."""

from __future__ import annotations

import torch
from torch import nn

from loracl.errors import LoraclError

SUPPORTED_BASE_TYPES = (nn.Linear, nn.Conv2d)


def names_module(name: str, key: str) -> bool:
    """PEFT's list semantics: `key` is the module's full name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def swap_module(model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    """Put `replacement` where the submodule `name` is; returns the module it replaced."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    replaced = getattr(parent, child_name)
    setattr(parent, child_name, replacement)
    return replaced


def check_base_layer(base_layer: nn.Module, name: str = "") -> None:
    """Refuse layer types an adapter cannot wrap, naming the module."""
    label = f"module `{name}`" if name else "module"
    if not isinstance(base_layer, SUPPORTED_BASE_TYPES):
        raise LoraclError(f"{label} is a {type(base_layer).__name__}; adapters wrap nn.Linear and nn.Conv2d only")
    if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
        raise LoraclError(f"{label}: grouped convolutions (groups={base_layer.groups}) are not supported")


class AdapterLayer(nn.Module):
    """A frozen nn.Linear/nn.Conv2d with a trainable delta; subclasses define the delta."""

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        check_base_layer(base_layer, name)
        self.base_layer = base_layer
        self.module_name = name
        self.disabled = False  # True: the layer is its base layer alone (PEFT's disable_adapters), merged or not
        self._weight_before_merge: torch.Tensor | None = None
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels if self.is_conv else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels if self.is_conv else self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `layer.weight` keeps working after injection."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def served_delta(self) -> torch.Tensor | None:
        """The weight delta this layer adds to W0 as it serves now (shaped like W0, no gradient), or None when
        the delta depends on the input and no fixed weight can stand for it."""
        raise NotImplementedError

    def bypassed(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's own output, for a disabled layer (disabling a merged layer is refused upstream)."""
        if self.merged:
            raise LoraclError(f"module `{self.module_name}`: unmerge before disabling its adapter")
        return self.base_layer(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the served delta into the base weight (outputs unchanged up to rounding), keeping W0 so that
        unmerge restores it bit for bit; refused for a delta that depends on the input."""
        if self.merged:
            return
        delta = self.served_delta()
        if delta is None:
            raise LoraclError(f"module `{self.module_name}`: its delta depends on the input, so it cannot be merged")
        self._weight_before_merge = self.base_layer.weight.detach().clone()
        self.base_layer.weight.add_(delta.to(self.base_layer.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 from the copy kept at merge time (no subtraction, so no drift)."""
        if self._weight_before_merge is None:
            return
        self.base_layer.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None

    @property
    def merged(self) -> bool:
        return self._weight_before_merge is not None


class MultiBranchLayer(AdapterLayer):
    """A frozen layer plus named additive branches (one per task or per adapter), each mergeable into W0.

        y = W0 x + b0 + sum over active branches of branch(drop(x))

    `drop` is one dropout mask shared by every branch (O-LoRA's and OA-Adapter's code); a branch may add its own.
    Subclasses create branches (`add_branch`) and may re-weight them (`branch_output`, `branch_delta`). A branch
    is a module with `forward(x)`, `delta_weight()` shaped like W0, and a `dtype` property.
    """

    branch_kind = "adapter"

    def __init__(self, base_layer: nn.Module, name: str = "", dropout: float = 0.0) -> None:
        super().__init__(base_layer, name)
        self.branches = nn.ModuleDict()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_branches: list[str] = []
        self.disabled_branches: set[str] = set()

    def register_branch(self, branch_name: str, branch: nn.Module) -> nn.Module:
        """Add a built branch under a new name; refused while merged, since unmerge could not remove it."""
        if branch_name in self.branches:
            raise LoraclError(f"module `{self.module_name}` already has a {self.branch_kind} branch named {branch_name!r}")
        if self.merged_branches:
            raise LoraclError(f"module `{self.module_name}`: unmerge before adding branches")
        self.branches[branch_name] = branch
        return branch

    def active_branches(self) -> list[tuple[str, nn.Module]]:
        """Branches that add to the output and are not already inside the base weight."""
        return [
            (name, branch)
            for name, branch in self.branches.items()
            if name not in self.merged_branches and name not in self.disabled_branches
        ]

    def branch_output(self, branch_name: str, branch: nn.Module, dropped: torch.Tensor) -> torch.Tensor:
        """One branch's additive output for the dropped-out input."""
        return branch(dropped.to(branch.dtype))

    def branch_delta(self, branch_name: str) -> torch.Tensor:
        """One branch's weight delta, shaped like W0."""
        return self.branches[branch_name].delta_weight() * self.branch_scale(branch_name)

    def branch_scale(self, branch_name: str) -> torch.Tensor | float:
        """A factor the layer applies to a branch on top of the branch's own scaling (1 unless a subclass
        re-weights branches, e.g. SD-LoRA's magnitudes)."""
        return 1.0

    def enabled_branches(self) -> list[str]:
        """Names of the branches that serve (merged or not): all but the disabled ones."""
        return [name for name in self.branches if name not in self.disabled_branches]

    def served_delta(self) -> torch.Tensor | None:
        with torch.no_grad():
            return self.delta_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.bypassed(x)
        result = self.base_layer(x)
        active = self.active_branches()
        if not active:
            return result
        dropped = self.dropout(x)
        for name, branch in active:
            result = result + self.branch_output(name, branch, dropped).to(result.dtype)
        return result

    def delta_weight(self, branch_names: list[str] | None = None) -> torch.Tensor:
        """Sum of the named (default: all enabled) branches' deltas, shaped like W0."""
        if branch_names is None:
            branch_names = self.enabled_branches()
        total = torch.zeros_like(self.base_layer.weight)
        for name in branch_names:
            total = total + self.branch_delta(name).to(total.dtype)
        return total

    @torch.no_grad()
    def merge(self, branch_names: list[str] | None = None) -> None:
        """Fold the named (default: all active) branches into W0; inference then costs the base layer's. W0 is
        kept at the first merge, so unmerge restores it bit for bit however the branches change meanwhile."""
        names = [name for name, _ in self.active_branches()] if branch_names is None else branch_names
        for name in names:
            if name in self.merged_branches:
                continue
            if self._weight_before_merge is None:
                self._weight_before_merge = self.base_layer.weight.detach().clone()
            self.base_layer.weight.add_(self.branch_delta(name).to(self.base_layer.weight.dtype))
            self.merged_branches.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Every merged branch out again: W0 restored from the copy kept at the first merge."""
        super().unmerge()
        self.merged_branches = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_branches)
