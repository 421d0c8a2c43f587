"""fuse()'s last pass: an expand ConvBNAct (a 1x1 conv with stride 1 and no padding) whose output
goes only to a JointBlock over its channels becomes, together with that block, one InvertedResidual
in the expand's slot (the block's slot then holds nn.Identity), so that the pair runs as one native
call that never writes the expanded tensor whole (docs/fuse.md). The pairs are found

- in containers that run their children in order (nn.Sequential's forward): the expand, then the
  next child that is not nn.Identity, which is the JointBlock or a container whose only non-Identity
  child is the JointBlock (torchvision's Conv2dNormActivation after fuse() put the block in it);
- in traced owners (GraphModules fuse() made of blocks with a residual add): a call of the expand
  whose only user is the JointBlock's call; the block's residual argument stays the pair's. timm's
  blocks call their expand as two modules, a 1x1 conv and a BatchNormAct2d (norm and activation in
  one module): that pair of calls becomes a ConvBNAct (the conv, a plain BatchNorm2d sharing the
  norm's tensors, its activation) inside the InvertedResidual.

The two modules' state_dict keys move under the InvertedResidual (``<expand>.0.*``, ``<expand>.1.*``);
report.key_map() maps the original keys to them."""
from __future__ import annotations

import collections
from typing import Dict, Optional, Tuple

from torch import fx, nn

from .block import JointBlock
from .conv_bn_act import ConvBNAct
from .fuse_patterns import is_norm_module, norm_activation, plain_batchnorm_sharing
from .inverted_residual import InvertedResidual


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    owner, _, attr = dotted.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, module)


def _runs_in_order(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_expand(module: nn.Module) -> bool:
    if not isinstance(module, ConvBNAct):
        return False
    conv = module[0]
    return tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (0, 0)


def _block_in(module: nn.Module, path: str) -> Optional[Tuple[JointBlock, str]]:
    """The JointBlock `module` runs on its input and nothing else, with its path."""
    if isinstance(module, JointBlock):
        return module, path
    if _runs_in_order(module):
        rest = [(n, c) for n, c in module.named_children() if not isinstance(c, nn.Identity)]
        if len(rest) == 1 and isinstance(rest[0][1], JointBlock):
            return rest[0][1], _join(path, rest[0][0])
    return None


class _Converter:
    def __init__(self, model: nn.Module, report) -> None:
        self.model = model
        self.report = report
        self.counts = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.moves: Dict[str, str] = {}  # module path -> new path (the same module)
        self.key_moves: Dict[str, str] = {}  # further state_dict key prefixes -> new prefixes

    def movable(self, *modules: nn.Module) -> bool:
        return all(self.counts[id(m)] == 1 and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)

    def pair(self, expand: ConvBNAct, block: JointBlock, expand_path: str, block_path: str,
             new_expand: bool = False) -> Optional[InvertedResidual]:
        """The InvertedResidual of `expand` and `block` for the expand's slot, with the moves recorded;
        None when they do not chain or may not move. (`new_expand`: made here of moved modules.)"""
        if block.depthwise.in_channels != expand[0].out_channels \
                or not self.movable(*((block,) if new_expand else (expand, block))):
            return None
        ir = InvertedResidual.from_modules(expand, block, skip=False)
        ir.training = expand.training
        self.moves[expand_path] = f"{expand_path}.0"
        self.moves[block_path] = f"{expand_path}.1"
        self.report.inverted_residuals.append(expand_path)
        return ir

    def visit(self, module: nn.Module, path: str) -> None:
        if isinstance(module, fx.GraphModule):
            self.convert_in_graph(module, path)
            return
        for name, child in list(module.named_children()):
            self.visit(child, _join(path, name))
        if _runs_in_order(module):
            self.convert_runs(module, path)

    def convert_runs(self, seq: nn.Sequential, path: str) -> None:
        names = [n for n, _ in seq.named_children()]
        for i, name in enumerate(names):
            expand = seq._modules[name]
            if not _is_expand(expand):
                continue
            j = next((k for k in range(i + 1, len(names)) if not isinstance(seq._modules[names[k]], nn.Identity)), None)
            if j is None:
                continue
            found = _block_in(seq._modules[names[j]], _join(path, names[j]))
            if found is None:
                continue
            block, block_path = found
            ir = self.pair(expand, block, _join(path, name), block_path)
            if ir is not None:
                _set(self.model, block_path, nn.Identity())
                setattr(seq, name, ir)

    def convert_in_graph(self, gm: fx.GraphModule, path: str) -> None:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
                continue
            if getattr(node, "_erased", False):  # (by an earlier match)
                continue
            if self.convert_conv_norm_act_call(gm, path, node):
                changed = True
                continue
            user = next(iter(node.users))
            if user.op != "call_module" or not user.args or user.args[0] is not node or node in user.args[1:] \
                    or any(node is v for v in user.kwargs.values()):
                continue
            try:
                expand, block = gm.get_submodule(node.target), gm.get_submodule(user.target)
            except AttributeError:
                continue
            if not (_is_expand(expand) and isinstance(block, JointBlock)):
                continue
            ir = self.pair(expand, block, _join(path, node.target), _join(path, user.target))
            if ir is None:
                continue
            _set(gm, user.target, nn.Identity())
            _set(gm, node.target, ir)
            with gm.graph.inserting_after(user):
                call = gm.graph.call_module(node.target, (node.args[0],) + tuple(user.args[1:]), dict(user.kwargs))
            user.replace_all_uses_with(call)
            gm.graph.erase_node(user)
            gm.graph.erase_node(node)
            changed = True
        if changed:
            gm.graph.lint()
            gm.recompile()

    def convert_conv_norm_act_call(self, gm: fx.GraphModule, path: str, conv_node: fx.Node) -> bool:
        """conv -> norm-with-activation -> JointBlock calls (timm's expand): one InvertedResidual call."""
        norm_node = next(iter(conv_node.users))
        if norm_node.op != "call_module" or norm_node.args != (conv_node,) or norm_node.kwargs \
                or len(norm_node.users) != 1:
            return False
        user = next(iter(norm_node.users))
        if user.op != "call_module" or not user.args or user.args[0] is not norm_node or norm_node in user.args[1:]:
            return False
        try:
            conv, norm, block = (gm.get_submodule(n.target) for n in (conv_node, norm_node, user))
        except AttributeError:
            return False
        if not isinstance(conv, nn.Conv2d) or not isinstance(block, JointBlock) or not is_norm_module(norm):
            return False
        act, problem = norm_activation(norm)
        if act is None or problem is not None or not self.movable(conv, norm):
            return False
        try:
            expand = ConvBNAct.from_modules(conv, plain_batchnorm_sharing(norm), act)
        except ValueError:  # not a convolution ConvBNAct runs (grouped, padded, ...)
            return False
        conv_path, norm_path = _join(path, conv_node.target), _join(path, norm_node.target)
        if not _is_expand(expand):
            return False
        expand.training = conv.training
        ir = self.pair(expand, block, conv_path, _join(path, user.target), new_expand=True)
        if ir is None:
            return False
        self.moves[conv_path] = f"{conv_path}.0.0"  # (pair() recorded the ConvBNAct's own slot)
        self.key_moves[norm_path] = f"{conv_path}.0.1"  # (its keys; the module is a plain twin)
        self.report.inverted_residual_norms[norm_path] = f"{conv_path}.0.1"
        _set(gm, user.target, nn.Identity())
        _set(gm, norm_node.target, nn.Identity())
        _set(gm, conv_node.target, ir)
        with gm.graph.inserting_after(user):
            call = gm.graph.call_module(conv_node.target, (conv_node.args[0],) + tuple(user.args[1:]),
                                        dict(user.kwargs))
        user.replace_all_uses_with(call)
        for n in (user, norm_node, conv_node):
            gm.graph.erase_node(n)
        return True

    def relocate(self, key: str) -> str:
        for old, new in {**self.moves, **self.key_moves}.items():
            if key.startswith(old + "."):
                return new + key[len(old):]
        return key

    def record_keys(self, before: Dict[str, None]) -> None:
        """Old keys -> new keys: existing mappings follow the moves; keys the earlier passes left in
        place (a ConvBNAct container's) get a mapping now."""
        mapped = set()
        for chain in self.report.fused:
            for k, v in chain.key_map.items():
                chain.key_map[k] = self.relocate(v)
                mapped.add(v)
        for k, v in self.report.moved_keys.items():
            self.report.moved_keys[k] = self.relocate(v)
            mapped.add(v)
        for k, v in self.report.conv_bn_act_moves.items():
            self.report.conv_bn_act_moves[k] = self.relocate(v)
        for key in before:
            new = self.relocate(key)
            if new != key and key not in mapped:
                self.report.moved_keys[key] = new


def convert_inverted_residuals(model: nn.Module, report) -> nn.Module:
    """Pairs every expand ConvBNAct with the JointBlock it feeds (see the module docstring); records
    them in report.inverted_residuals and their keys in report.moved_keys."""
    before = dict.fromkeys(model.state_dict(keep_vars=True))
    converter = _Converter(model, report)
    converter.visit(model, "")
    if converter.moves:
        converter.record_keys(before)
        report.inverted_residual_moves.update(converter.moves)
    return model
