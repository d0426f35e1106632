"""Image bytes: originals, browser previews and Grad-CAM heatmaps."""
