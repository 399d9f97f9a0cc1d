"""Plans of what a layout costs, predicted without running it."""
