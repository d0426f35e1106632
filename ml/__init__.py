"""Framework-free machine learning code: imaging, preprocessing, model, predictor, Grad-CAM."""
