"""reconciler: decides each preference's state from both sides' changes; its sweep and history retention."""
