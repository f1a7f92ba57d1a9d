"""Typed, nested run configuration: YAML file + dotted `section.key=value` overrides.

schema.py holds the sections and their documented keys, checks.py the type and value checks,
loading.py the way in (file, overrides) and out (the resolved config.yaml).
"""

from .checks import validate
from .loading import apply_overrides, dump_yaml, from_dict, load_config, parse_overrides, to_dict
from .schema import CUDA_GRAPH_MODES, Config, config_reference

__all__ = [
    "CUDA_GRAPH_MODES",
    "Config",
    "apply_overrides",
    "config_reference",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
    "validate",
]
