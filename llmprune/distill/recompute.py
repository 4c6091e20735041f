"""Keep a recipe instead of the activations that are cheaper to compute again than to hold until backward.

Of what a decoder keeps for backward, more than half are outputs of elementwise products and SiLU: each RMSNorm's
normalised states (x * 1/rms) and outputs (weight * normalised), the gated MLP's activation silu(gate) and product
silu(gate) * up — for SmolLM2's 84M student 3,840 of the 7,200 floats kept per token and layer. Every one of them is
the product or SiLU of tensors autograd keeps anyway (the norm's input and 1/rms, the norm weight, the gate and up
projections). Inside `recompute_products()` such a tensor is not kept: its autograd node is, and when backward asks
for the tensor the node's op runs again on the node's saved inputs. The same op on the same inputs gives the same
bits, so values and gradients are exactly those of the plain step (tests/test_recompute.py); backward does a few
elementwise passes more, no matmul (unlike gradient checkpointing, which runs whole layers again).

Under autocast, each linear layer keeps its own low-precision copy of its input: q, k and v projections three copies
of the same norm output, the gate and up projections two (for SmolLM2's student in bfloat16, 131 MB of the 450 MB a
step keeps). Such a copy is a cast of a recomputable product, so it is made again the same way: the product, then the
cast, shared by the copies that backward asks for one after another.

Which tensors qualify is read from the autograd graph, not from module names: a saved tensor that is (a view of) the
whole output of a `MulBackward0` or `SiluBackward0` node whose inputs all require gradients (so the node saved both),
or of a cast (`ToCopyBackward0`) of such a node's output. The inputs are alive when backward unpacks the recipe: the
node that made a tensor runs after every node that uses it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

# the ops run again from what their node saved; both are elementwise, so a contiguous output of contiguous inputs
RECOMPUTE = {
    "MulBackward0": lambda node: node._saved_self * node._saved_other,
    "SiluBackward0": lambda node: F.silu(node._saved_self),
}
VIEWS = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}  # reshapes of a whole contiguous tensor
CAST = "ToCopyBackward0"  # .to(dtype or device), autocast's casts


class Recipe(NamedTuple):
    node: object  # the autograd node whose op made the tensor (or the tensor it is a cast of)
    shape: torch.Size  # the saved tensor's shape (a view of the node's output)
    dtype: torch.dtype  # the saved tensor's dtype and device: the node's output's, or a cast's
    device: torch.device


def _whole(t: torch.Tensor) -> bool:
    """True when `t` is contiguous and spans its whole storage, as a fresh elementwise output (or a reshape of it)."""
    spans = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and spans


def recipe(t: torch.Tensor) -> Recipe | None:
    """How to make `t` again from what autograd keeps anyway, or None when it is to be kept."""
    if not _whole(t):
        return None
    node = t.grad_fn
    while node is not None and node.name() in VIEWS:
        node = node.next_functions[0][0]
    if node is not None and node.name() == CAST:  # the cast's input is the whole output of the node before it
        node = node.next_functions[0][0]
    if node is None or node.name() not in RECOMPUTE or any(fn is None for fn, _ in node.next_functions):
        return None  # a leaf, another op, or an input without gradient (then the node did not save it)
    return Recipe(node, t.shape, t.dtype, t.device)


def pack(t: torch.Tensor):
    return recipe(t) or t


class Unpacker:
    """Backward's side: makes a recipe's tensor again, and remembers the last few it made, so the consumers of one
    tensor (a norm's output feeds the q, k and v projections) that backward reaches one after another share one
    recomputation."""

    def __init__(self, remember: int = 4):
        self.remember = remember
        # (id(node), dtype, device) -> (node, its output so cast); oldest first
        self.made: dict[tuple, tuple[object, torch.Tensor]] = {}

    def __call__(self, saved):
        if not isinstance(saved, Recipe):
            return saved
        key = id(saved.node), saved.dtype, saved.device
        if key in self.made:
            out = self.made.pop(key)[1]
        else:  # .to() is the tensor itself where nothing was cast
            out = RECOMPUTE[saved.node.name()](saved.node).to(saved.device, saved.dtype)
            if len(self.made) >= self.remember:
                del self.made[next(iter(self.made))]
        self.made[key] = (saved.node, out)  # the node with it: its id cannot be reused while remembered
        return out.view(saved.shape)


@contextmanager
def recompute_products(enabled: bool = True):
    """Within the block, autograd keeps recipes for products and SiLU outputs instead of the tensors (see above)."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(pack, Unpacker()):
        yield
