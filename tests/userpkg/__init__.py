"""User-side model and dataset factories that tests load by import path (`userpkg.module:factory`)."""
