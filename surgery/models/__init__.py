"""Models as files: loading (Hub, directory, Lightning checkpoint), the measured LN-free test, the recipes and
checkpoints shipped inside the package, and cache locations."""
