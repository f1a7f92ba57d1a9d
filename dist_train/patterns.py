"""Name patterns in configs (`optim.param_groups[].match`, `compress.prune_exclude`): globs, or
regular expressions with a `re:` prefix, matched against the bare model's parameter/module names.

- `head.*`, `*.bias`, `blocks.0.*`: a shell glob (fnmatch, case-sensitive) on the whole name;
  `*` also crosses dots.
- `re:attn\\.(q|k)`: a Python regular expression searched anywhere in the name (anchor it with `^`
  and `$` to match the whole name).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from .errors import UserError

REGEX_PREFIX = "re:"

# Segments that wrappers insert into names; rules are written against the bare model's names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_PRUNED = "weight_orig"  # compress.prune reparametrises `weight` as `weight_orig` x `weight_mask`
# compress.qat fuses a BatchNorm into the conv before it: {"<conv>.bn.": "<its own name>."}, on the model
FUSED_NAMES = "qat_renames"


def compile_pattern(pattern: str, where: str) -> Callable[[str], bool]:
    """A predicate on names for a glob or `re:` pattern; a bad regular expression is a UserError."""
    if not isinstance(pattern, str) or not pattern or pattern == REGEX_PREFIX:
        raise UserError(f"`{where}` must be a non-empty glob or `re:<regex>` string, got {pattern!r}")
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX) :])
        except (re.error, OverflowError, RecursionError) as err:  # `a{4294967296}`: "repetition number too large"
            raise UserError(f"`{where}`: bad regular expression {pattern!r}: {err}") from None
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def canonical_name(name: str, fused: dict[str, str] | None = None) -> str:
    """The bare model's name for a parameter: wrapper segments dropped, a fused BatchNorm's `<conv>.bn.`
    back under its own name (`fused`: the model's FUSED_NAMES), pruning's `weight_orig` -> `weight`."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    for prefix, original in (fused or {}).items():
        if name.startswith(prefix):
            name = original + name[len(prefix) :]
            break
    head, _, last = name.rpartition(".")
    if last == _PRUNED:
        name = f"{head}.weight" if head else "weight"
    return name
