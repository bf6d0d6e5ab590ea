"""Package data shipped with layerwatch (the demo's corpus)."""
