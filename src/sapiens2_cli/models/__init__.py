"""Model definitions: the Sapiens2 backbone, task heads, and the person detector."""
