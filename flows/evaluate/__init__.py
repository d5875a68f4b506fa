"""The evaluate stage: the FlagOS stack against the native stack, item by item, with a statistical gate."""
