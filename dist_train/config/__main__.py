"""`python -m dist_train.config` prints the README's config reference table."""

from .schema import config_reference

print(config_reference())
